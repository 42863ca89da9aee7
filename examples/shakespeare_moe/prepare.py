"""Turn the tiny-Shakespeare text into a character-level indexed dataset (.bin/.idx).

Source, first that works: ``--input PATH``; ``$SHAKESPEARE_PATH``; the corpus shipped beside a
moecore checkout (``../shared/data/tinyshakespeare/input.txt``); a download from ``--url`` (by
default the char-rnn copy; ``--url ''`` never downloads). Prints
the data prefix on the last line, or ``MOCK`` (with a message on stderr) when no text is
reachable, so the caller can fall back to ``--mock-data``.

The text is cut at line ends into 10 contiguous documents with no EOD between them, so
``--split 90,10,0`` gives nanoGPT's cut: the first 90% trains, the last 10% validates as one
contiguous piece. (Smaller documents, such as paragraphs, would be shuffled by the dataset, and
a validation stream of shuffled paragraphs is harder to predict than the play's own order.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
               "tinyshakespeare/input.txt")


NUM_CHUNKS = 10
DOWNLOAD_TIMEOUT_S = 20


def write_chunks(text: str, path: Path, n: int) -> None:
    """Write ``text`` as ``n`` contiguous JSON-lines documents, cut after a newline."""
    cuts = [0]
    for i in range(1, n):
        nl = text.find("\n", len(text) * i // n)
        cuts.append(len(text) if nl < 0 else nl + 1)
    cuts.append(len(text))
    with open(path, "w", encoding="utf-8") as f:
        for a, b in zip(cuts[:-1], cuts[1:]):
            f.write(json.dumps({"text": text[a:b]}) + "\n")


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
            with urllib.request.urlopen(args.url, timeout=DOWNLOAD_TIMEOUT_S) as r:
                dest.write_bytes(r.read())
            return dest
        except OSError as e:  # offline, DNS failure, timeout, HTTP error
            print(f"could not download {args.url}: {e}", file=sys.stderr)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", help="path to tinyshakespeare input.txt")
    p.add_argument("--url", default=DEFAULT_URL,
                   help="where to download the text when no local copy is found ('' = never)")
    p.add_argument("--out-dir", default=str(REPO / "data" / "shakespeare_char"))
    args = p.parse_args()
    out = Path(args.out_dir)
    prefix = out / "shakespeare"
    if Path(f"{prefix}_text_document.idx").exists() and (out / "chunks.jsonl").exists() \
            and not args.input:
        print(f"{prefix}_text_document")  # prepared earlier
        return
    text = find_text(args)
    if text is None:
        print("no Shakespeare text found and none could be downloaded (offline?): pass --input "
              "PATH or set SHAKESPEARE_PATH; training on --mock-data instead", file=sys.stderr)
        print("MOCK")
        return
    out.mkdir(parents=True, exist_ok=True)
    vocab = out / "vocab.json"
    chunks = out / "chunks.jsonl"
    write_chunks(text.read_text(encoding="utf-8"), chunks, NUM_CHUNKS)
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"),
                    "--input", str(chunks), "--input-format", "jsonl", "--json-keys", "text",
                    "--output-prefix", str(prefix),
                    "--tokenizer-type", "CharacterTokenizer", "--vocab-file", str(vocab),
                    "--workers", "1"], check=True)
    print(f"{prefix}_text_document")


if __name__ == "__main__":
    main()
