"""Tokenizers behind one small interface, selected by Megatron's ``--tokenizer-type`` names.

Every tokenizer has ``vocab_size`` (ids are ``0 .. vocab_size - 1``), ``tokenize(text) ->
list[int]``, ``detokenize(ids) -> str`` and ``eod`` (the end-of-document id that
``preprocess_data.py --append-eod`` writes after each document). HuggingFaceTokenizer needs
``transformers``; TikTokenizer and GPT2BPETokenizer need ``tiktoken`` (optional dependencies,
see :func:`missing_package`).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

TOKENIZER_TYPES = (
    "CharacterTokenizer",
    "SentencePieceTokenizer",
    "Llama2Tokenizer",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "TikTokenizer",
    "NullTokenizer",
)

# The optional package each tokenizer imports, and the pip name that installs it.
_PACKAGES = {
    "SentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece",
    "GPT2BPETokenizer": "tiktoken",
    "HuggingFaceTokenizer": "transformers",
    "TikTokenizer": "tiktoken",
}

# Megatron's --tiktoken-pattern choices (megatron/training/tokenizer/tokenizer.py).
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
        r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}
# TikTokenizer's required special tokens (unk, bos, eos = EOD) and Megatron's defaults.
TIKTOKEN_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
TIKTOKEN_DEFAULT_VOCAB_SIZE = 2**17


def missing_package(tokenizer_type: str) -> str | None:
    """``"<package>"`` when the optional package ``tokenizer_type`` imports is not installed."""
    package = _PACKAGES.get(tokenizer_type)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return package

# GPT-2's pre-tokenisation regex, as tiktoken's "gpt2"/r50k encodings use it.
_GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
_GPT2_EOD = "<|endoftext|>"


class Tokenizer(ABC):
    """The subset of Megatron's MegatronTokenizer that training and preprocessing use."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eod(self) -> int: ...

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...


class CharacterTokenizer(Tokenizer):
    """One id per character; the EOD id is appended after the characters (``len(chars)``).

    The vocab file is a JSON list of the characters, in id order.
    """

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"character vocab entries must be single characters, got {bad[:5]}")
        if len(set(chars)) != len(chars):
            raise ValueError("character vocab holds duplicate characters")
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, texts: str | Iterable[str]) -> CharacterTokenizer:
        """Vocab of the sorted distinct characters of ``texts`` (one string or several)."""
        seen: set[str] = set()
        for text in [texts] if isinstance(texts, str) else texts:
            seen.update(text)
        return cls(sorted(seen))

    @classmethod
    def from_file(cls, vocab_file: str) -> CharacterTokenizer:
        with open(vocab_file, encoding="utf-8") as f:
            chars = json.load(f)
        if not isinstance(chars, list):
            raise ValueError(f"{vocab_file} must hold a JSON list of characters")
        return cls(chars)

    def save(self, vocab_file: str) -> None:
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(self.chars, f, ensure_ascii=False)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def eod(self) -> int:
        return len(self.chars)

    def tokenize(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in the {len(self.chars)}-character vocab; "
                "rebuild the vocab from a corpus that contains it"
            ) from None

    def detokenize(self, ids: Sequence[int]) -> str:
        # EOD has no character; it marks a document boundary.
        return "".join(self.chars[i] for i in ids if i != self.eod)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model, as Megatron's GPTSentencePieceTokenizer: EOD is the model's EOS.

    A model trained without an EOS piece gets an extra EOD id after its vocabulary.
    """

    def __init__(self, model_file: str) -> None:
        sentencepiece = _import("SentencePieceTokenizer")
        if not os.path.exists(model_file):
            raise FileNotFoundError(f"sentencepiece model {model_file} not found")
        self.model_file = model_file
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self._n = int(self.sp.vocab_size())
        eos = int(self.sp.eos_id())
        self._eod = eos if eos >= 0 else self._n
        self.bos = int(self.sp.bos_id())
        self.pad = int(self.sp.pad_id())

    @property
    def vocab_size(self) -> int:
        return self._n + (1 if self._eod == self._n else 0)

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) < self._n])


class Llama2Tokenizer(SentencePieceTokenizer):
    """Llama-2's sentencepiece tokenizer: ``tokenize`` prepends BOS, EOD is EOS (Megatron's)."""

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file)
        if self.bos < 0 or int(self.sp.eos_id()) < 0:
            raise ValueError(
                f"{model_file} has no BOS/EOS pieces (bos_id={self.bos}, "
                f"eos_id={self.sp.eos_id()}); Llama2Tokenizer needs both, use "
                "SentencePieceTokenizer for this model"
            )

    def tokenize(self, text: str) -> list[int]:
        return [self.bos, *self.sp.encode(text)]


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE through tiktoken.

    With ``vocab_file`` (encoder.json) and ``merge_file`` (vocab.bpe) the files are read
    locally; otherwise tiktoken's built-in "gpt2" encoding is used (it must be downloadable or
    already in tiktoken's cache).
    """

    def __init__(self, vocab_file: str | None = None, merge_file: str | None = None) -> None:
        tiktoken = _import("GPT2BPETokenizer")
        if (vocab_file is None) != (merge_file is None):
            raise ValueError(
                "GPT2BPETokenizer takes both vocab_file (encoder.json) and merge_file "
                "(vocab.bpe), or neither to use tiktoken's built-in gpt2 encoding"
            )
        if vocab_file is None:
            self.enc = tiktoken.get_encoding("gpt2")
        else:
            from tiktoken.load import data_gym_to_mergeable_bpe_ranks

            ranks = data_gym_to_mergeable_bpe_ranks(merge_file, vocab_file)
            with open(vocab_file, encoding="utf-8") as f:
                eod_id = json.load(f).get(_GPT2_EOD, len(ranks))
            self.enc = tiktoken.Encoding(
                "gpt2-local",
                pat_str=_GPT2_PAT_STR,
                mergeable_ranks=ranks,
                special_tokens={_GPT2_EOD: eod_id},
            )
        self._eod = self.enc.eot_token

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        # Special-token text in a corpus is ordinary text, as in Megatron's GPT-2 tokenizer.
        return self.enc.encode_ordinary(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.enc.decode([int(i) for i in ids])


def _import(tokenizer_type: str):
    """The optional package of ``tokenizer_type``; a one-line ImportError when missing."""
    package = _PACKAGES[tokenizer_type]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(
            f"{tokenizer_type} needs the {package} package: pip install {package}"
        ) from None


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer (``transformers.AutoTokenizer``), as Megatron's.

    ``tokenize`` encodes the text alone; with ``include_special_tokens``
    (``--tokenizer-hf-include-special-tokens``) it also adds what the tokenizer's post-processor
    adds, e.g. a BOS (Megatron's legacy tokenizer always did). Special-token text in the input
    (e.g. ``</s>``) becomes the special token. ``detokenize`` is ``decode`` (special tokens stay
    in the text), ``vocab_size`` is ``len(tokenizer)`` (added tokens included) and EOD is the
    EOS token.
    """

    def __init__(self, name_or_path: str, include_special_tokens: bool = False,
                 trust_remote_code: bool = False) -> None:
        transformers = _import("HuggingFaceTokenizer")
        self.include_special_tokens = include_special_tokens
        try:
            self.hf = transformers.AutoTokenizer.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"--tokenizer-model {name_or_path}: no Hugging Face tokenizer there ({first}); "
                "pass a local directory holding tokenizer.json / tokenizer_config.json, or a "
                "hub name that is downloadable or in the Hugging Face cache"
            ) from None
        if self.hf.eos_token_id is None:
            raise ValueError(
                f"--tokenizer-model {name_or_path} has no eos_token, which "
                "HuggingFaceTokenizer uses as EOD; set eos_token in its tokenizer_config.json"
            )

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eod(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def eos(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def bos(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad(self) -> int | None:
        return self.hf.pad_token_id

    @property
    def special_tokens(self) -> dict[str, int]:
        """``{token text: id}`` of every special token (bos/eos/pad/unk/... and added ones)."""
        return dict(zip(self.hf.all_special_tokens, self.hf.all_special_ids))

    def tokenize(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=self.include_special_tokens)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids])


def load_bpe_ranks(path: str) -> dict[bytes, int]:
    """``{token bytes: rank}`` of a BPE rank file; ranks must be ``0 .. n - 1``.

    ``*.json`` is Megatron's (NeMo's) TikTokenizer vocab: a list of ``{"rank", "token_bytes"
    (base64), "token_str"}`` in rank order, the first 256 being the single bytes 0..255.
    Anything else is tiktoken's ``.tiktoken`` format: one ``<base64 token> <rank>`` per line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--tokenizer-model {path}: BPE rank file not found")
    ranks: dict[bytes, int] = {}
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)
            for i, entry in enumerate(entries):
                token = base64.b64decode(entry["token_bytes"])
                if entry["rank"] != i or (i < 256 and token != bytes([i])):
                    raise ValueError(f"entry {i} has rank {entry['rank']} / bytes {token!r}")
                ranks[token] = i
        else:
            with open(path, "rb") as f:
                for line in f.read().splitlines():
                    if line.strip():
                        token, rank = line.split()
                        ranks[base64.b64decode(token)] = int(rank)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--tokenizer-model {path} is not a BPE rank file: {err}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"--tokenizer-model {path}: BPE ranks must be distinct and 0 .. n - 1")
    return ranks


class TikTokenizer(Tokenizer):
    """Megatron's TikTokenizer (CustomTikTokenizer): a BPE rank file through tiktoken.

    The ``num_special_tokens`` special tokens take ids ``0 .. num_special_tokens - 1``:
    ``special_tokens`` (must include ``<unk> <s> </s>``) first, then ``<SPECIAL_i>`` fillers;
    the BPE ranks follow, shifted by ``num_special_tokens`` and cut to ``vocab_size``. EOD is
    ``</s>``. ``tokenize`` treats special-token text as ordinary text. ``vocab_size`` defaults
    to Megatron's 2**17, or to the file's ranks + special tokens when that is smaller (where
    Megatron stops with an assertion).
    """

    def __init__(
        self,
        path: str,
        pattern: str,
        vocab_size: int | None = None,
        num_special_tokens: int = 1000,
        special_tokens: Sequence[str] | None = None,
    ) -> None:
        tiktoken = _import("TikTokenizer")
        if pattern not in TIKTOKEN_PATTERNS:
            raise ValueError(f"--tiktoken-pattern {pattern!r}: choose v1 or v2")
        specials = list(special_tokens or TIKTOKEN_SPECIAL_TOKENS)
        check_tiktoken_special_tokens(specials, num_special_tokens)
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special_tokens)]
        ranks = load_bpe_ranks(path)
        if vocab_size is None:
            vocab_size = min(TIKTOKEN_DEFAULT_VOCAB_SIZE, len(ranks) + num_special_tokens)
        inner = vocab_size - num_special_tokens
        if not 0 < inner <= len(ranks):
            raise ValueError(
                f"--vocab-size {vocab_size} with --tiktoken-num-special-tokens "
                f"{num_special_tokens} needs {inner} BPE ranks but --tokenizer-model {path} "
                f"has {len(ranks)}; pass --vocab-size <= {len(ranks) + num_special_tokens}"
            )
        mergeable = {t: r + num_special_tokens for t, r in ranks.items() if r < inner}
        missing = [b for b in range(256) if bytes([b]) not in mergeable]
        if missing:
            raise ValueError(
                f"--tokenizer-model {path}: the BPE ranks kept lack single bytes {missing[:8]} "
                "(every byte 0..255 needs a rank for any text to encode)"
            )
        self._ids = {t: i for i, t in enumerate(specials)}
        self._vocab_size = vocab_size
        self.enc = tiktoken.Encoding(
            name=os.path.basename(path), pat_str=TIKTOKEN_PATTERNS[pattern],
            mergeable_ranks=mergeable, special_tokens=self._ids,
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._ids["</s>"]

    @property
    def eos(self) -> int:
        return self._ids["</s>"]

    @property
    def bos(self) -> int:
        return self._ids["<s>"]

    @property
    def unk(self) -> int:
        return self._ids["<unk>"]

    @property
    def special_tokens(self) -> dict[str, int]:
        """``{token text: id}`` of the special tokens, fillers included."""
        return dict(self._ids)

    def tokenize(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.enc.decode([int(i) for i in ids])


def check_tiktoken_special_tokens(special_tokens: Sequence[str], num_special_tokens: int) -> None:
    """Megatron's rules for ``--tiktoken-special-tokens`` / ``--tiktoken-num-special-tokens``."""
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"--tiktoken-special-tokens holds duplicates: {list(special_tokens)}")
    absent = [t for t in TIKTOKEN_SPECIAL_TOKENS if t not in special_tokens]
    if absent:
        raise ValueError(f"--tiktoken-special-tokens must include {list(TIKTOKEN_SPECIAL_TOKENS)}"
                         f"; add {absent}")
    if num_special_tokens < len(special_tokens):
        raise ValueError(f"--tiktoken-num-special-tokens {num_special_tokens} is smaller than "
                         f"the {len(special_tokens)} --tiktoken-special-tokens")


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: text is space-separated ids; EOD = ``vocab_size`` argument.

    ``vocab_size`` (the property) is the argument + 1 so that EOD is a valid id.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError(f"NullTokenizer needs vocab_size >= 1, got {vocab_size}")
        self._eod = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._eod + 1

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tiktoken_pattern: str | None = None,
    tiktoken_num_special_tokens: int = 1000,
    tiktoken_special_tokens: Sequence[str] | None = None,
    hf_include_special_tokens: bool = False,
    trust_remote_code: bool = False,
) -> Tokenizer:
    """Build a tokenizer by Megatron's ``--tokenizer-type`` name.

    CharacterTokenizer reads ``vocab_file`` (JSON list of characters); SentencePieceTokenizer
    and Llama2Tokenizer read ``tokenizer_model``; GPT2BPETokenizer optionally reads
    ``vocab_file`` + ``merge_file``; HuggingFaceTokenizer loads ``tokenizer_model`` (a local
    directory or a hub name) with ``hf_include_special_tokens`` and ``trust_remote_code``;
    TikTokenizer reads the BPE rank file ``tokenizer_model`` with the ``tiktoken_*`` settings
    and optional ``vocab_size``; NullTokenizer needs ``vocab_size``.
    """
    if tokenizer_type == "CharacterTokenizer":
        if vocab_file is None:
            raise ValueError("CharacterTokenizer needs vocab_file (a JSON list of characters)")
        return CharacterTokenizer.from_file(vocab_file)
    if tokenizer_type in ("SentencePieceTokenizer", "Llama2Tokenizer"):
        if tokenizer_model is None:
            raise ValueError(f"{tokenizer_type} needs tokenizer_model (a sentencepiece .model)")
        if tokenizer_type == "SentencePieceTokenizer":
            return SentencePieceTokenizer(tokenizer_model)
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type in ("HuggingFaceTokenizer", "TikTokenizer") and tokenizer_model is None:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model, hf_include_special_tokens, trust_remote_code)
    if tokenizer_type == "TikTokenizer":
        if tiktoken_pattern is None:
            raise ValueError("--tokenizer-type TikTokenizer needs --tiktoken-pattern v1 or v2")
        return TikTokenizer(tokenizer_model, tiktoken_pattern, vocab_size,
                            tiktoken_num_special_tokens, tiktoken_special_tokens)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("NullTokenizer needs vocab_size")
        return NullTokenizer(vocab_size)
    raise ValueError(
        f"unknown tokenizer_type {tokenizer_type!r}; choose one of {list(TOKENIZER_TYPES)}"
    )


_NEEDS_MODEL = {
    "SentencePieceTokenizer": "a sentencepiece .model file",
    "Llama2Tokenizer": "a sentencepiece .model file",
    "HuggingFaceTokenizer": "a local tokenizer directory or a Hugging Face hub name",
    "TikTokenizer": "a BPE rank file",
}


def _is_local_path(name: str) -> bool:
    """Whether ``name`` can only be a filesystem path (hub names are ``name`` or ``org/name``)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def check_tokenizer_args(args) -> None:
    """The flags and the package ``args.tokenizer_type`` needs, before anything is loaded.

    ``args`` holds the tokenizer flags' dests (``pretrain_gpt.py`` and ``preprocess_data.py``
    share them). Raises a one-line ValueError naming the flag and the fix. Files are not
    opened here (a missing file is reported when the tokenizer is built).
    """
    kind = args.tokenizer_type
    package = missing_package(kind)
    if package is not None:
        raise ValueError(f"--tokenizer-type {kind} needs the {package} package: "
                         f"pip install {package}")
    if kind in _NEEDS_MODEL and args.tokenizer_model is None:
        raise ValueError(f"--tokenizer-type {kind} needs --tokenizer-model ({_NEEDS_MODEL[kind]})")
    model = args.tokenizer_model
    if kind == "HuggingFaceTokenizer" and not os.path.isdir(model) and _is_local_path(model):
        raise ValueError(f"--tokenizer-model {model}: no such directory (a local path; a hub "
                         "name looks like org/name)")
    if kind == "CharacterTokenizer" and args.vocab_file is None:
        raise ValueError("--tokenizer-type CharacterTokenizer needs --vocab-file (a JSON list "
                         "of characters)")
    if kind == "GPT2BPETokenizer" and (args.vocab_file is None) != (args.merge_file is None):
        raise ValueError("--tokenizer-type GPT2BPETokenizer takes both --vocab-file "
                         "(encoder.json) and --merge-file (vocab.bpe), or neither")
    if kind == "NullTokenizer" and args.vocab_size is None:
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
    if kind == "TikTokenizer":
        if args.tiktoken_pattern not in TIKTOKEN_PATTERNS:
            raise ValueError(f"--tokenizer-type TikTokenizer needs --tiktoken-pattern v1 or v2, "
                             f"got {args.tiktoken_pattern}")
        n = args.tiktoken_num_special_tokens
        check_tiktoken_special_tokens(args.tiktoken_special_tokens or TIKTOKEN_SPECIAL_TOKENS, n)
        if args.vocab_size is not None and args.vocab_size <= n:
            raise ValueError(f"--vocab-size {args.vocab_size} leaves no ids for BPE tokens after "
                             f"--tiktoken-num-special-tokens {n}; raise --vocab-size")


def vocab_size_with_padding(
    orig_vocab_size: int,
    make_vocab_size_divisible_by: int = 128,
    tensor_model_parallel_size: int = 1,
) -> int:
    """Megatron's padded vocab: round up to a multiple of divisible_by * tp (embedding shards)."""
    multiple = int(make_vocab_size_divisible_by) * int(tensor_model_parallel_size)
    if multiple < 1:
        raise ValueError(
            f"make_vocab_size_divisible_by * tensor_model_parallel_size must be >= 1, got "
            f"{make_vocab_size_divisible_by} * {tensor_model_parallel_size}"
        )
    return -(-int(orig_vocab_size) // multiple) * multiple
