"""tools/preprocess_data.py end to end on small temp corpora."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moecore.data import IndexedDataset, build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "preprocess_data.py")


@pytest.fixture(scope="module")
def preprocess():
    spec = importlib.util.spec_from_file_location("preprocess_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_data"] = module  # worker processes unpickle Encoder by this name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["preprocess_data"]


DOCS = [
    {"text": "First document.\nIt has two lines.", "title": "one"},
    {"text": "", "title": "empty text"},
    {"text": "Second: ÄÖÜ café", "title": "two"},
    {"text": "third", "title": "three"},
] * 5


def test_jsonl_char_workers(tmp_path, preprocess, capsys):
    src = tmp_path / "corpus.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n\n", encoding="utf-8")
    vocab = tmp_path / "vocab.json"
    outs = {}
    for workers in (1, 2):
        prefix = str(tmp_path / f"out{workers}")
        outs[workers] = preprocess.main(
            [
                "--input",
                str(src),
                "--json-keys",
                "text",
                "title",
                "--output-prefix",
                prefix,
                "--tokenizer-type",
                "CharacterTokenizer",
                "--vocab-file",
                str(vocab),
                "--append-eod",
                "--workers",
                str(workers),
                "--chunk-size",
                "3",
            ]
        )
    # The vocab was created from both keys' characters on the first run, reused on the second.
    tok = build_tokenizer("CharacterTokenizer", vocab_file=str(vocab))
    all_text = "".join(d["text"] + d["title"] for d in DOCS)
    assert set(tok.chars) == set(all_text)
    for key in ("text", "title"):
        prefix = outs[1][key]
        assert prefix == str(tmp_path / f"out1_{key}_document")
        ds = IndexedDataset(prefix)
        assert ds.dtype == np.uint16
        want = [tok.tokenize(d[key]) + [tok.eod] for d in DOCS if d[key]]
        assert len(ds) == len(want)
        for i, ids in enumerate(want):
            assert ds[i].tolist() == ids
        # One entry per document, empty documents included (they own no sequence).
        assert len(ds.document_indices) == len(DOCS) + 1
        for ext in (".bin", ".idx"):
            a = open(prefix + ext, "rb").read()
            assert a == open(outs[2][key] + ext, "rb").read(), f"workers changed {key}{ext}"
    err = capsys.readouterr().err
    assert "done: 20 docs" in err and "%" in err


def test_text_input_documents(tmp_path, preprocess):
    src = tmp_path / "plain.txt"
    src.write_text("alpha beta\ngamma\n\n\ndelta\n  \nepsilon\n", encoding="utf-8")
    common = [
        "--input",
        str(src),
        "--input-format",
        "text",
        "--tokenizer-type",
        "CharacterTokenizer",
        "--quiet",
    ]
    one = preprocess.main(common + ["--output-prefix", str(tmp_path / "one")])["text"]
    tok = build_tokenizer("CharacterTokenizer", vocab_file=str(tmp_path / "one_vocab.json"))
    ds = IndexedDataset(one)
    assert len(ds) == 1 and len(ds.document_indices) == 2
    assert tok.detokenize(ds[0].tolist()) == src.read_text(encoding="utf-8")
    many = preprocess.main(
        common
        + [
            "--output-prefix",
            str(tmp_path / "many"),
            "--split-docs-on-blank-line",
            "--vocab-file",
            str(tmp_path / "one_vocab.json"),
            "--append-eod",
        ]
    )["text"]
    ds = IndexedDataset(many)
    texts = [tok.detokenize(ds[i].tolist()) for i in range(len(ds))]
    assert texts == ["alpha beta\ngamma", "delta", "epsilon"]
    assert all(ds[i][-1] == tok.eod for i in range(len(ds)))


def test_cli_script_sentencepiece(tmp_path):
    import sentencepiece

    corpus = tmp_path / "c.txt"
    lines = ["the cat sat on the mat", "a dog and a cat", "mats and hats"] * 30
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40, model_type="bpe"
    )
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in lines[:3]) + "\n", "utf-8")
    result = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--input",
            str(src),
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer-type",
            "Llama2Tokenizer",
            "--tokenizer-model",
            str(tmp_path / "sp.model"),
            "--append-eod",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "done: 3 docs" in result.stderr
    tok = build_tokenizer("Llama2Tokenizer", tokenizer_model=str(tmp_path / "sp.model"))
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    for i, text in enumerate(lines[:3]):
        ids = ds[i].tolist()
        assert ids == tok.tokenize(text) + [tok.eod]
        assert tok.detokenize(ids) == text


def test_cli_rejects_bad_arguments(tmp_path, preprocess, capsys):
    base = ["--input", "x.jsonl", "--output-prefix", str(tmp_path / "x")]
    with pytest.raises(SystemExit):
        preprocess.main(base + ["--tokenizer-type", "BertTokenizer"])
    assert "GPT2BPETokenizer" in capsys.readouterr().err  # the error lists the choices
    with pytest.raises(SystemExit):
        preprocess.main(base + ["--tokenizer-type", "NullTokenizer", "--workers", "0"])
    assert "--workers must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("split_blank", [False, True])
def test_out_of_vocab_ids_refused(tmp_path, preprocess, split_blank):
    """An id >= the tokenizer's vocabulary is refused, naming the document and its input line
    (before: written to the .bin, to crash training with a bare IndexError)."""
    texts = ["1 2 3", "4 5", "6 300 7", "8"]
    if split_blank:
        src = tmp_path / "ids.txt"
        src.write_text("1 2\n3\n\n4 5\n\n\n6\n300 7\n\n8\n", encoding="utf-8")
        fmt, line = ["--input-format", "text", "--split-docs-on-blank-line"], 7
    else:
        src = tmp_path / "ids.jsonl"
        src.write_text("\n".join(json.dumps({"text": t}) for t in texts[:2]) + "\n\n"
                       + "\n".join(json.dumps({"text": t}) for t in texts[2:]) + "\n")
        fmt, line = [], 4
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "ids"), "--tokenizer-type",
            "NullTokenizer", "--vocab-size", "256", "--append-eod", "--quiet"] + fmt
    for workers in ("1", "2"):
        with pytest.raises(ValueError) as info:
            preprocess.main(argv + ["--workers", workers, "--chunk-size", "1"])
        assert str(info.value) == (
            f"{src}: document 2 (line {line}, key 'text'): token id 300 is outside the "
            "vocabulary [0, 257); the tokenizer produced an id the model cannot embed; check "
            "--tokenizer-type/--tokenizer-model/--vocab-size")
    src.write_text(src.read_text().replace("300", "255"))
    prefix = preprocess.main(argv)["text"]
    assert IndexedDataset(prefix)[2].tolist() == [6, 255, 7, 256]
