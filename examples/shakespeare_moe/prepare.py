"""Turn the tiny-Shakespeare text into a character-level indexed dataset (.bin/.idx).

Source, first that works: ``--input PATH``; ``$SHAKESPEARE_PATH``; the corpus shipped beside a
moecore checkout (``../shared/data/tinyshakespeare/input.txt``); ``--url`` when online. Prints
the data prefix on the last line, or ``MOCK`` (with a message on stderr) when no text is
reachable, so the caller can fall back to ``--mock-data``.

Paragraphs (blank-line separated) become documents with no EOD between them, so the token
stream is the plain text and ``--split 90,10,0`` gives nanoGPT's 90/10 train/val cut.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
               "tinyshakespeare/input.txt")


def find_text(args) -> Path | None:
    candidates = [args.input, os.environ.get("SHAKESPEARE_PATH"),
                  REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    if args.url:
        dest = Path(args.out_dir) / "input.txt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            urllib.request.urlretrieve(args.url, dest)
            return dest
        except OSError as e:
            print(f"could not download {args.url}: {e}", file=sys.stderr)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", help="path to tinyshakespeare input.txt")
    p.add_argument("--url", default=None, help=f"download URL when online (e.g. {DEFAULT_URL})")
    p.add_argument("--out-dir", default=str(REPO / "data" / "shakespeare_char"))
    args = p.parse_args()
    out = Path(args.out_dir)
    prefix = out / "shakespeare"
    if Path(f"{prefix}_text_document.idx").exists() and not args.input:
        print(f"{prefix}_text_document")  # prepared earlier
        return
    text = find_text(args)
    if text is None:
        print("no Shakespeare text found (pass --input PATH, set SHAKESPEARE_PATH, or --url "
              "when online); falling back to --mock-data", file=sys.stderr)
        print("MOCK")
        return
    out.mkdir(parents=True, exist_ok=True)
    vocab = out / "vocab.json"
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"),
                    "--input", str(text), "--input-format", "text",
                    "--split-docs-on-blank-line", "--output-prefix", str(prefix),
                    "--tokenizer-type", "CharacterTokenizer", "--vocab-file", str(vocab),
                    "--workers", "1"], check=True)
    print(f"{prefix}_text_document")


if __name__ == "__main__":
    main()
