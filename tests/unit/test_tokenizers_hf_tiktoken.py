"""HuggingFaceTokenizer and TikTokenizer: semantics, flags, preprocessing, missing packages.

Every tokenizer here is built in the test (no downloads): a tiny byte-level BPE trained with
``tokenizers`` and saved through ``transformers``, and a tiny BPE rank file for tiktoken.
"""

import base64
import importlib.util
import io
import json
import math
import os
import sys

import pytest

from moecore.arguments import parse_args
from moecore.data import IndexedDataset
from moecore.data.tokenizers import (
    TIKTOKEN_PATTERNS,
    TikTokenizer,
    build_tokenizer,
    load_bpe_ranks,
)
from moecore.training import builders, pretrain
from tests.cli import BASE, parse_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = ["the quick brown fox jumps over the lazy dog", "the rain in spain stays in the plain",
          "to be or not to be that is the question"] * 20
TEXT = "the rain in spain </s> ünïcode, 42!"

# ---- Hugging Face ------------------------------------------------------------------------------


def _save_hf(root, bos_template: bool):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos_template:  # a Llama-style post-processor that prepends BOS
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|tool|>"])
    fast.save_pretrained(str(root))
    return str(root)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return _save_hf(root / "plain", False), _save_hf(root / "bos", True)


def test_hf_semantics(hf_dirs):
    plain, with_bos = hf_dirs
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=plain)
    assert tok.vocab_size == len(tok.hf) and 256 < tok.vocab_size <= 301  # + the added token
    assert (tok.bos, tok.eod, tok.eos, tok.pad) == (0, 1, 1, 2)  # trainer's special ids
    assert tok.special_tokens["</s>"] == tok.eod and "<|tool|>" in tok.special_tokens
    ids = tok.tokenize(TEXT)
    assert all(0 <= i < tok.vocab_size for i in ids) and len(ids) < len(TEXT.encode())
    assert ids[0] != tok.bos and tok.detokenize(ids) == TEXT
    # Special-token text is the special token (the Hugging Face tokenizer's own rule).
    assert tok.eod in ids
    # Megatron's: the text alone, unless --tokenizer-hf-include-special-tokens, which adds what
    # the tokenizer's post-processor adds (a BOS here); detokenize keeps special tokens.
    tok2 = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=with_bos)
    assert tok2.tokenize("the lazy dog") == tok.tokenize("the lazy dog")
    tok3 = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=with_bos,
                           hf_include_special_tokens=True)
    ids3 = tok3.tokenize("the lazy dog")
    assert ids3[0] == tok3.bos and ids3[1:] == tok.tokenize("the lazy dog")
    assert tok3.detokenize(ids3) == "<s>the lazy dog"
    plain_with_specials = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=plain,
                                          hf_include_special_tokens=True)
    assert plain_with_specials.tokenize(TEXT) == ids  # no post-processor: nothing added


def test_hf_flags_reach_the_tokenizer(hf_dirs, monkeypatch):
    transformers = pytest.importorskip("transformers")
    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(name, **kwargs):
        calls.append(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    args = parse_args(BASE + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                              hf_dirs[1], "--tokenizer-hf-include-special-tokens",
                              "--tokenizer-hf-use-fast", "--trust-remote-code"])
    assert args.noop_flags_given == ["--tokenizer-hf-use-fast"]
    tok = builders.build_tokenizer_from_args(args)
    assert calls == [{"trust_remote_code": True}]
    assert tok.include_special_tokens and tok.tokenize("dog")[0] == tok.bos
    assert args.padded_vocab_size == 384


def test_hf_unloadable_name_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    missing = str(tmp_path / "no" / "such" / "tokenizer")
    with pytest.raises(ValueError) as err:
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=missing)
    msg = str(err.value)
    assert msg.startswith(f"--tokenizer-model {missing}: no Hugging Face tokenizer") and \
        "\n" not in msg
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer")


def test_hf_without_eos_is_refused(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2},
                                                           unk_token="[UNK]"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]") \
        .save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="has no eos_token"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))


def test_missing_transformers_is_a_one_line_error(monkeypatch, capsys, preprocess, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # "import transformers" fails
    with pytest.raises(ImportError, match="^HuggingFaceTokenizer needs the transformers "
                                          "package: pip install transformers$"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model="x")
    err = parse_error(BASE + ["--tokenizer-type", "HuggingFaceTokenizer",
                              "--tokenizer-model", "x"], capsys)
    assert "--tokenizer-type HuggingFaceTokenizer needs the transformers package: pip install " \
           "transformers" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        preprocess.main(["--input", "x", "--output-prefix", str(tmp_path / "x"),
                         "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "x"])
    assert "pip install transformers" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    err = parse_error(BASE + ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "x",
                              "--tiktoken-pattern", "v2"], capsys)
    assert "needs the tiktoken package: pip install tiktoken" in err


# ---- TikTokenizer ------------------------------------------------------------------------------
MERGES = [b"th", b"he", b"the", b" t", b"in", b" in", b"ai", b"ain"]


def _rank_files(root):
    """The same ranks (256 bytes in order, then MERGES) as Megatron's .json and .tiktoken."""
    tokens = [bytes([b]) for b in range(256)] + MERGES
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode(),
                "token_str": t.decode("utf-8", "replace")} for i, t in enumerate(tokens)]
    (root / "vocab.json").write_text(json.dumps(entries), encoding="utf-8")
    lines = [f"{base64.b64encode(t).decode()} {i}" for i, t in enumerate(tokens)]
    (root / "vocab.tiktoken").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(root / "vocab.json"), str(root / "vocab.tiktoken")


def test_tiktoken_patterns_are_megatrons():
    assert TIKTOKEN_PATTERNS["v1"] == (r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++"
                                       r"[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
    assert TIKTOKEN_PATTERNS["v2"].endswith(r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def test_tiktoken_semantics(tmp_path):
    pytest.importorskip("tiktoken")
    json_file, tt_file = _rank_files(tmp_path)
    assert load_bpe_ranks(json_file) == load_bpe_ranks(tt_file)
    tok = build_tokenizer("TikTokenizer", tokenizer_model=json_file, tiktoken_pattern="v2",
                          tiktoken_num_special_tokens=10)
    n = 10  # special tokens first: <unk> <s> </s> <SPECIAL_3> .. <SPECIAL_9>
    assert tok.vocab_size == n + 256 + len(MERGES)
    assert (tok.unk, tok.bos, tok.eod, tok.eos) == (0, 1, 2, 2)
    assert tok.special_tokens["<SPECIAL_9>"] == 9 and len(tok.special_tokens) == n
    ids = tok.tokenize(TEXT)
    rank = {t: n + 256 + i for i, t in enumerate(MERGES)}
    assert ids[:4] == [rank[b"the"], ord(" ") + n, ord("r") + n, rank[b"ain"]]
    assert tok.eod not in ids  # "</s>" in a corpus is ordinary text, as in Megatron
    assert tok.detokenize(ids) == TEXT and max(ids) < tok.vocab_size
    same = build_tokenizer("TikTokenizer", tokenizer_model=tt_file, tiktoken_pattern="v2",
                           tiktoken_num_special_tokens=10)
    assert same.tokenize(TEXT) == ids
    # Custom special tokens keep their order; --vocab-size cuts the BPE ranks (Megatron's).
    cut = build_tokenizer("TikTokenizer", tokenizer_model=json_file, tiktoken_pattern="v1",
                          vocab_size=4 + 256 + 1, tiktoken_num_special_tokens=4,
                          tiktoken_special_tokens=["<pad>", "</s>", "<s>", "<unk>"])
    assert (cut.eod, cut.bos, cut.unk, cut.vocab_size) == (1, 2, 3, 261)
    assert cut.tokenize("the") == [4 + 256, ord("e") + 4]  # "th" kept, "the" cut


def test_tiktoken_errors(tmp_path):
    pytest.importorskip("tiktoken")
    json_file, _ = _rank_files(tmp_path)
    with pytest.raises(ValueError, match="--vocab-size 300 .* has 264; pass --vocab-size <= 267"):
        TikTokenizer(json_file, "v2", vocab_size=300, num_special_tokens=3)
    with pytest.raises(ValueError, match="lack single bytes"):
        TikTokenizer(json_file, "v2", vocab_size=3 + 200, num_special_tokens=3)
    with pytest.raises(ValueError, match="must include"):
        TikTokenizer(json_file, "v2", special_tokens=["<s>", "</s>"])
    with pytest.raises(FileNotFoundError, match="--tokenizer-model .*missing.json"):
        TikTokenizer(str(tmp_path / "missing.json"), "v2")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"rank": 1, "token_bytes": "AA==", "token_str": ""}]))
    with pytest.raises(ValueError, match="not a BPE rank file"):
        TikTokenizer(str(bad), "v2")
    with pytest.raises(ValueError, match="--tiktoken-pattern"):
        build_tokenizer("TikTokenizer", tokenizer_model=json_file)


# ---- flags ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, match", [
    (["--tokenizer-type", "HuggingFaceTokenizer"],
     "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model"),
    (["--tokenizer-type", "TikTokenizer"], "--tokenizer-type TikTokenizer needs --tokenizer-model"),
    (["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "v.json"],
     "needs --tiktoken-pattern v1 or v2"),
    (["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "v.json", "--tiktoken-pattern",
      "v1", "--tiktoken-special-tokens", "<s>", "</s>"], "--tiktoken-special-tokens must include"),
    (["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "v.json", "--tiktoken-pattern",
      "v1", "--tiktoken-num-special-tokens", "2"], "--tiktoken-num-special-tokens 2 is smaller"),
    (["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "v.json", "--tiktoken-pattern",
      "v1", "--tiktoken-num-special-tokens", "100"], "--vocab-size 100 leaves no ids"),
    (["--tokenizer-type", "SentencePieceTokenizer"], "needs --tokenizer-model"),
    (["--tokenizer-type", "CharacterTokenizer"], "CharacterTokenizer needs --vocab-file"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "e.json"], "--merge-file"),
])
def test_tokenizer_flags_that_do_not_fit(extra, match, capsys):
    err = parse_error(BASE + extra, capsys)
    assert match in err and err.count("error:") == 1


def test_hf_missing_local_directory(tmp_path, capsys):
    missing = str(tmp_path / "tok")
    err = parse_error(BASE + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                              missing], capsys)
    assert f"--tokenizer-model {missing}: no such directory" in err
    # A hub-like name is left to the loader (it may be downloadable or cached).
    args = parse_args(BASE + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                              "org/name"])
    assert args.tokenizer_model == "org/name"


def test_null_tokenizer_needs_vocab_size(capsys):
    argv = [a for a in BASE if a not in ("--vocab-size", "100")]
    assert "NullTokenizer needs --vocab-size" in parse_error(
        argv + ["--tokenizer-type", "NullTokenizer"], capsys)


def test_trainer_builds_tiktokenizer_from_flags(tmp_path):
    pytest.importorskip("tiktoken")
    json_file, _ = _rank_files(tmp_path)
    argv = [a for a in BASE if a not in ("--vocab-size", "100")]
    args = parse_args(argv + ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", json_file,
                              "--tiktoken-pattern", "v2", "--tiktoken-num-special-tokens", "16",
                              "--make-vocab-size-divisible-by", "64"])
    tok = builders.build_tokenizer_from_args(args)
    assert isinstance(tok, TikTokenizer) and tok.vocab_size == 16 + 264
    assert args.padded_vocab_size == 320 and tok.eod == 2


# ---- preprocess_data.py ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preprocess():
    script = os.path.join(ROOT, "tools", "preprocess_data.py")
    spec = importlib.util.spec_from_file_location("preprocess_data", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_data"] = module  # worker processes unpickle Encoder by this name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["preprocess_data"]


def _preprocess_round_trip(preprocess, tmp_path, tok_flags, workers):
    docs = [TEXT, "the lazy dog", "", "in spain"]
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8")
    prefix = str(tmp_path / "out")
    out = preprocess.main(["--input", str(src), "--output-prefix", prefix, "--append-eod",
                           "--workers", str(workers), *tok_flags])
    args = preprocess.get_args(["--input", str(src), "--output-prefix", prefix, *tok_flags])
    preprocess.Encoder(args).initializer()
    tok = preprocess.Encoder.tokenizer
    ds = IndexedDataset(out["text"])
    want = [d for d in docs if d]
    assert len(ds) == len(want)
    for i, text in enumerate(want):
        ids = ds[i].tolist()
        assert ids == tok.tokenize(text) + [tok.eod]
        assert tok.detokenize(ids[:-1]) == text
    return tok


def test_preprocess_hf_then_train(preprocess, tmp_path, hf_dirs):
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dirs[0]]
    tok = _preprocess_round_trip(preprocess, tmp_path, flags, 2)
    assert tok.eod == 1
    lines = []
    out = pretrain(["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
                    "--seq-length", "8", "--micro-batch-size", "2", "--lr", "1e-3",
                    "--train-iters", "2", "--device", "cpu", "--split", "100,0,0",
                    "--eval-iters", "0",
                    "--data-path", str(tmp_path / "out_text_document"), *flags],
                   log=lines.append)
    assert out["iterations"] == [1, 2] and all(math.isfinite(x) for x in out["lm_loss"])
    assert any(f"tokenizer HuggingFaceTokenizer: vocab {tok.vocab_size} padded to 384" in line
               for line in lines)
    # --tokenizer-hf-include-special-tokens puts the tokenizer's BOS before each document.
    out = preprocess.main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix",
                           str(tmp_path / "bos"), "--append-eod", "--tokenizer-type",
                           "HuggingFaceTokenizer", "--tokenizer-model", hf_dirs[1],
                           "--tokenizer-hf-include-special-tokens"])
    ds = IndexedDataset(out["text"])
    assert ds[1].tolist() == [tok.bos, *tok.tokenize("the lazy dog"), tok.eod]


def test_preprocess_tiktoken(preprocess, tmp_path, capsys):
    pytest.importorskip("tiktoken")
    json_file, _ = _rank_files(tmp_path)
    tok = _preprocess_round_trip(preprocess, tmp_path, [
        "--tokenizer-type", "TikTokenizer", "--tokenizer-model", json_file, "--tiktoken-pattern",
        "v2", "--tiktoken-num-special-tokens", "8"], 1)
    assert tok.eod == 2 and tok.vocab_size == 8 + 264
    err = capsys.readouterr().err
    assert "done: 4 docs" in err and "docs/s" in err
    with pytest.raises(SystemExit):
        preprocess.main(["--input", "x", "--output-prefix", str(tmp_path / "x"),
                         "--tokenizer-type", "TikTokenizer", "--tokenizer-model", json_file])
    assert "needs --tiktoken-pattern" in capsys.readouterr().err


def test_progress_reports_documents_per_second(preprocess):
    stream = io.StringIO()
    progress = preprocess.Progress(100, stream=stream)
    for _ in range(3):
        progress.update(10, 5)
    progress.close()
    text = stream.getvalue()
    assert "1 docs 5 tokens" in text and "docs/s" in text
    assert "done: 3 docs, 15 tokens" in text and text.rstrip().endswith("docs/s)")
