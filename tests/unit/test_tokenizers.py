"""Tokenizers: round trips, EOD ids, errors."""

import json
import sys

import pytest

from moecore.data.tokenizers import (
    TOKENIZER_TYPES,
    CharacterTokenizer,
    build_tokenizer,
    vocab_size_with_padding,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "all that glitters is not gold",
    "to be or not to be that is the question",
    "the rain in spain stays mainly in the plain",
] * 40


def test_character_round_trip(tmp_path):
    text = "Hello, world!\nÜber naïve café — ok."
    tok = CharacterTokenizer.from_text([text, "xyz"])
    assert tok.chars == sorted(set(text + "xyz"))
    assert tok.vocab_size == len(tok.chars) + 1 and tok.eod == len(tok.chars)
    ids = tok.tokenize(text)
    assert len(ids) == len(text) and max(ids) < tok.eod
    assert tok.detokenize(ids) == text
    assert tok.detokenize(ids + [tok.eod]) == text
    path = tmp_path / "vocab.json"
    tok.save(str(path))
    assert json.loads(path.read_text(encoding="utf-8")) == tok.chars
    loaded = build_tokenizer("CharacterTokenizer", vocab_file=str(path))
    assert loaded.tokenize(text) == ids and loaded.eod == tok.eod
    with pytest.raises(ValueError, match="'Q' is not in the"):
        tok.tokenize("Q")
    with pytest.raises(ValueError, match="vocab_file"):
        build_tokenizer("CharacterTokenizer")


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
    import sentencepiece

    root = tmp_path_factory.mktemp("sp")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    common = dict(input=str(corpus), vocab_size=60, character_coverage=1.0, model_type="bpe")
    sentencepiece.SentencePieceTrainer.train(model_prefix=str(root / "m"), **common)
    sentencepiece.SentencePieceTrainer.train(model_prefix=str(root / "noeos"), eos_id=-1, **common)
    return str(root / "m.model"), str(root / "noeos.model")


def test_sentencepiece_round_trip(sp_models):
    model, no_eos = sp_models
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    assert tok.vocab_size == 60
    assert tok.eod == tok.sp.eos_id() >= 0
    for text in ["the quick brown fox", "not gold in spain", "to be or not"]:
        ids = tok.tokenize(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    assert len(tok.tokenize("the question")) < len("the question")  # merges happened
    # A model without an EOS piece gets an extra EOD id after its vocabulary.
    tok2 = build_tokenizer("SentencePieceTokenizer", tokenizer_model=no_eos)
    assert tok2.eod == 60 and tok2.vocab_size == 61
    assert tok2.detokenize(tok2.tokenize("the lazy dog") + [tok2.eod]) == "the lazy dog"


def test_llama2_tokenizer(sp_models):
    model, no_eos = sp_models
    tok = build_tokenizer("Llama2Tokenizer", tokenizer_model=model)
    ids = tok.tokenize("the lazy dog")
    assert ids[0] == tok.sp.bos_id() and ids[1:] == tok.sp.encode("the lazy dog")
    assert tok.detokenize(ids) == "the lazy dog"
    assert tok.eod == tok.sp.eos_id()
    with pytest.raises(ValueError, match="no BOS/EOS"):
        build_tokenizer("Llama2Tokenizer", tokenizer_model=no_eos)
    with pytest.raises(ValueError, match="tokenizer_model"):
        build_tokenizer("Llama2Tokenizer")


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tok.vocab_size == 101 and tok.eod == 100
    assert tok.tokenize("3 14 15") == [3, 14, 15]
    assert tok.detokenize([3, 14, 15]) == "3 14 15"
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer("NullTokenizer")


def test_unknown_type_lists_choices():
    with pytest.raises(ValueError) as err:
        build_tokenizer("BertWordPieceCase")
    for name in TOKENIZER_TYPES:
        assert name in str(err.value)


def test_gpt2_without_tiktoken(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes "import tiktoken" fail
    with pytest.raises(ImportError, match="pip install tiktoken"):
        build_tokenizer("GPT2BPETokenizer")


def _gpt2_style_files(tmp_path, merges):
    """encoder.json / vocab.bpe in GPT-2's byte-to-unicode ("data gym") encoding."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    to_gym, extra = {}, 0
    for b in range(256):
        if b in printable:
            to_gym[b] = chr(b)
        else:
            to_gym[b] = chr(256 + extra)
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    encoder = {to_gym[b]: i for i, b in enumerate(order)}
    for a, c in merges:
        encoder[a + c] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    lines = "".join(f"{a} {c}\n" for a, c in merges)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    return str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe"), encoder


def test_gpt2_bpe_local_files(tmp_path):
    pytest.importorskip("tiktoken")
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")]
    vocab, merge, encoder = _gpt2_style_files(tmp_path, merges)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merge)
    assert tok.vocab_size == 256 + len(merges) + 1
    assert tok.eod == encoder["<|endoftext|>"]
    text = "hello world <|endoftext|> ünïcode"
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text
    assert ids[0] == encoder["hell"] and encoder["Ġw"] in ids
    assert tok.eod not in ids  # special-token text in a corpus stays ordinary text
    with pytest.raises(ValueError, match="both vocab_file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab)


def test_vocab_padding():
    assert vocab_size_with_padding(50257, 128, 1) == 50304
    assert vocab_size_with_padding(50257, 128, 8) == 51200
    assert vocab_size_with_padding(256, 128, 2) == 256
