"""Tokenize a corpus into Megatron ``.bin/.idx`` files (``{prefix}_{key}_document``).

Megatron-LM's tools/preprocess_data.py, trimmed to what moecore trains on:

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --output-prefix data/corpus --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model tok.model --append-eod --workers 4

    python tools/preprocess_data.py --input input.txt --input-format text \\
        --output-prefix data/shakespeare --tokenizer-type CharacterTokenizer \\
        --vocab-file data/shakespeare_vocab.json --append-eod

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/tokenizer_dir \\
        --append-eod --workers 8      # or a hub name; needs transformers

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type TikTokenizer --tokenizer-model vocab.json --tiktoken-pattern v2 \\
        --append-eod

A jsonl line is one document per ``--json-keys`` key; a plain text file is one document, or
one per blank-line-separated block with ``--split-docs-on-blank-line``. For
CharacterTokenizer a missing ``--vocab-file`` is created from the corpus's characters.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator

try:
    import moecore  # noqa: F401
except ImportError:  # run from a checkout without pip install -e .
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moecore.data.indexed_dataset import (  # noqa: E402
    DataFileError,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
    optimal_dtype,
)
from moecore.data.tokenizers import (  # noqa: E402
    TOKENIZER_TYPES,
    CharacterTokenizer,
    build_tokenizer,
    check_tokenizer_args,
)


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="jsonl file, or a text file (--input-format)")
    g.add_argument("--input-format", choices=("jsonl", "text"), default="jsonl")
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="jsonl keys to tokenize (one output per key); names the text output",
    )
    g.add_argument(
        "--split-docs-on-blank-line",
        action="store_true",
        help="text input: each blank-line-separated block is a document",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument(
        "--tokenizer-model",
        default=None,
        help="sentencepiece model file, Hugging Face tokenizer directory or hub name "
        "(HuggingFaceTokenizer), or BPE rank file (TikTokenizer)",
    )
    g.add_argument(
        "--tokenizer-hf-include-special-tokens",
        action="store_true",
        help="HuggingFaceTokenizer adds its own special tokens (e.g. BOS) to each document",
    )
    g.add_argument("--trust-remote-code", action="store_true", help="HuggingFaceTokenizer")
    g.add_argument(
        "--tokenizer-hf-use-fast", action="store_true", help="accepted; the fast backend is used"
    )
    g.add_argument("--tiktoken-pattern", default=None, choices=("v1", "v2"))
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=1000)
    g.add_argument("--tiktoken-special-tokens", nargs="+", default=None)
    g.add_argument(
        "--vocab-file",
        default=None,
        help="CharacterTokenizer JSON vocab (created when missing; default "
        "{output_prefix}_vocab.json) or GPT-2 encoder.json",
    )
    g.add_argument("--merge-file", default=None, help="GPT-2 vocab.bpe merges")
    g.add_argument(
        "--vocab-size", type=int, default=None, help="NullTokenizer / TikTokenizer vocab size"
    )
    g.add_argument("--append-eod", action="store_true", help="append EOD after each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True)
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--chunk-size", type=int, default=32, help="documents per worker task")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.input_format == "text" and len(args.json_keys) != 1:
        p.error("--input-format text takes one --json-keys name (it names the output)")
    if args.tokenizer_type == "CharacterTokenizer" and args.vocab_file is None:
        args.vocab_file = args.output_prefix + "_vocab.json"
    try:
        check_tokenizer_args(args)
    except ValueError as err:
        p.error(str(err))
    return args


def documents_with_lines(args: argparse.Namespace) -> Iterator[tuple[int, bytes]]:
    """(1-based first line, raw bytes) of each document: jsonl lines, or text documents."""
    with open(args.input, "rb") as f:
        if args.input_format == "jsonl":
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line
        elif not args.split_docs_on_blank_line:
            yield 1, f.read()
        else:
            block: list[bytes] = []
            first = 1
            for number, line in enumerate(f, 1):
                if line.strip():
                    if not block:
                        first = number
                    block.append(line)
                elif block:
                    yield first, b"".join(block)
                    block = []
            if block:
                yield first, b"".join(block)


def read_documents(args: argparse.Namespace) -> Iterator[bytes]:
    """Raw documents as bytes: jsonl lines, or text documents."""
    return (raw for _, raw in documents_with_lines(args))


def document_line(args: argparse.Namespace, index: int) -> int:
    """First input line of document ``index`` (0-based); re-reads the input (error path only)."""
    return next(itertools.islice(documents_with_lines(args), index, None))[0]


def document_texts(args: argparse.Namespace, raw: bytes) -> dict[str, str]:
    """``{key: text}`` of one raw document."""
    if args.input_format == "text":
        text = raw.decode("utf-8")
        return {args.json_keys[0]: text.rstrip("\n") if args.split_docs_on_blank_line else text}
    record = json.loads(raw)
    missing = [k for k in args.json_keys if k not in record]
    if missing:
        raise ValueError(f"jsonl record lacks keys {missing}: {raw[:120]!r}")
    return {k: record[k] for k in args.json_keys}


class Encoder:
    """Per-process tokenizer; ``encode`` turns a raw document into ids per key."""

    tokenizer = None

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def initializer(self) -> None:
        a = self.args
        Encoder.tokenizer = build_tokenizer(
            a.tokenizer_type,
            a.tokenizer_model,
            a.vocab_size,
            a.vocab_file,
            a.merge_file,
            a.tiktoken_pattern,
            a.tiktoken_num_special_tokens,
            a.tiktoken_special_tokens,
            a.tokenizer_hf_include_special_tokens,
            a.trust_remote_code,
        )

    def encode(self, raw: bytes) -> tuple[dict[str, tuple[list[int], list[int]]], int]:
        """({key: (ids, sequence lengths)}, bytes read); empty text gives an empty document."""
        out = {}
        for key, text in document_texts(self.args, raw).items():
            ids = Encoder.tokenizer.tokenize(text)
            lengths = [len(ids)] if ids else []
            if ids and self.args.append_eod:
                ids.append(Encoder.tokenizer.eod)
                lengths[-1] += 1
            out[key] = (ids, lengths)
        return out, len(raw)


class Progress:
    """One-line text progress bar on stderr, redrawn at most every 0.2 s."""

    def __init__(self, total_bytes: int, enabled: bool = True, stream=None) -> None:
        self.total = max(total_bytes, 1)
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.start = self.last = time.time()
        self.docs = self.bytes = self.tokens = 0

    def update(self, nbytes: int, ntokens: int) -> None:
        self.docs += 1
        self.bytes += nbytes
        self.tokens += ntokens
        now = time.time()
        if self.enabled and (self.docs == 1 or now - self.last >= 0.2):
            self.last = now
            frac = min(self.bytes / self.total, 1.0)
            bar = "#" * int(30 * frac)
            elapsed = max(now - self.start, 1e-9)
            self.stream.write(
                f"\r[{bar:<30}] {100 * frac:5.1f}% {self.docs} docs {self.tokens} tokens "
                f"{self.docs / elapsed:.1f} docs/s {self.bytes / elapsed / 2**20:.2f} MB/s"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            elapsed = time.time() - self.start
            self.stream.write(
                f"\rdone: {self.docs} docs, {self.tokens} tokens, {self.bytes / 2**20:.2f} MB "
                f"in {elapsed:.1f} s ({self.docs / max(elapsed, 1e-9):.1f} docs/s){' ' * 20}\n"
            )
            self.stream.flush()


def ensure_char_vocab(args: argparse.Namespace) -> None:
    """Create the CharacterTokenizer vocab from the corpus when the file does not exist."""
    if args.tokenizer_type != "CharacterTokenizer" or os.path.exists(args.vocab_file):
        return
    chars: set[str] = set()
    for raw in read_documents(args):
        for text in document_texts(args, raw).values():
            chars.update(text)
    CharacterTokenizer(sorted(chars)).save(args.vocab_file)
    if not args.quiet:
        print(f"wrote {len(chars)}-character vocab to {args.vocab_file}", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict[str, str]:
    """Run the conversion; returns ``{key: output prefix}``."""
    args = get_args(argv)
    ensure_char_vocab(args)
    encoder = Encoder(args)
    encoder.initializer()
    dtype = optimal_dtype(Encoder.tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    prefixes = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    vocab = Encoder.tokenizer.vocab_size
    builders = {k: IndexedDatasetBuilder(get_bin_path(p), dtype, vocab)
                for k, p in prefixes.items()}
    progress = Progress(os.path.getsize(args.input), enabled=not args.quiet)
    pool = None
    if args.workers > 1:
        pool = multiprocessing.Pool(args.workers, initializer=encoder.initializer)
        encoded = pool.imap(encoder.encode, read_documents(args), args.chunk_size)
    else:
        encoded = map(encoder.encode, read_documents(args))
    try:
        for index, (docs, nbytes) in enumerate(encoded):
            for key, (ids, lengths) in docs.items():
                try:
                    builders[key].add_document(ids, lengths)
                except DataFileError as err:
                    raise DataFileError(
                        f"{args.input}: document {index} (line {document_line(args, index)}, "
                        f"key {key!r}): {err}; check --tokenizer-type/--tokenizer-model/"
                        "--vocab-size") from None
            progress.update(nbytes, sum(len(ids) for ids, _ in docs.values()))
    except BaseException:
        if pool is not None:
            pool.terminate()  # a worker's error must not wait for the remaining documents
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for key, builder in builders.items():
        builder.finalize(get_idx_path(prefixes[key]))
    progress.close()
    return prefixes


if __name__ == "__main__":
    try:
        main()
    except DataFileError as err:
        sys.exit(f"error: {err}")
