"""Tokenizers behind one small interface, selected by Megatron's ``--tokenizer-type`` names.

Every tokenizer has ``vocab_size`` (ids are ``0 .. vocab_size - 1``), ``tokenize(text) ->
list[int]``, ``detokenize(ids) -> str`` and ``eod`` (the end-of-document id that
``preprocess_data.py --append-eod`` writes after each document).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

TOKENIZER_TYPES = (
    "CharacterTokenizer",
    "SentencePieceTokenizer",
    "Llama2Tokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
)

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
        import sentencepiece

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
        try:
            import tiktoken
        except ImportError:
            raise ImportError("GPT2BPETokenizer needs tiktoken: pip install tiktoken") from None
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
) -> Tokenizer:
    """Build a tokenizer by Megatron's ``--tokenizer-type`` name.

    CharacterTokenizer reads ``vocab_file`` (JSON list of characters); SentencePieceTokenizer
    and Llama2Tokenizer read ``tokenizer_model``; GPT2BPETokenizer optionally reads
    ``vocab_file`` + ``merge_file``; NullTokenizer needs ``vocab_size``.
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
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("NullTokenizer needs vocab_size")
        return NullTokenizer(vocab_size)
    raise ValueError(
        f"unknown tokenizer_type {tokenizer_type!r}; choose one of {list(TOKENIZER_TYPES)}"
    )


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
