"""Megatron .bin/.idx format: round trip and byte-level layout."""

import struct

import numpy as np
import pytest
import torch

from moecore.data import GPTDataset, build_per_split_datasets, build_train_valid_test_datasets
from moecore.data.indexed_dataset import (
    DTYPE_CODES,
    DataFileError,
    IndexedDataset,
    IndexedDatasetBuilder,
    code_from_dtype,
    optimal_dtype,
)

# Megatron-LM's DType enum values, written out independently of the module under test.
MEGATRON_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}


def _build(tmp_path, docs, dtype, name="ds"):
    """docs: list of documents, each a list of sequences (lists of ids)."""
    prefix = str(tmp_path / name)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d, doc in enumerate(docs):
        if d % 2 == 0:
            for seq in doc:
                builder.add_item(torch.tensor(seq, dtype=torch.int64))
            builder.end_document()
        else:
            flat = np.array([t for seq in doc for t in seq], dtype=np.int64)
            builder.add_document(flat, [len(seq) for seq in doc])
    builder.finalize(prefix + ".idx")
    return prefix


def test_dtype_codes_match_megatron():
    for dtype, code in MEGATRON_CODES.items():
        assert code_from_dtype(dtype) == code
        assert DTYPE_CODES[code] is dtype
    assert optimal_dtype(65499) is np.uint16
    assert optimal_dtype(65500) is np.int32
    assert optimal_dtype(None) is np.int32
    with pytest.raises(ValueError, match="no Megatron .idx code"):
        code_from_dtype(np.complex64)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [
        [list(rng.integers(0, 60000, size=int(rng.integers(0, 20)))) for _ in range(k)]
        for k in (1, 3, 0, 2, 1, 1)
    ]
    prefix = _build(tmp_path, docs, dtype)
    ds = IndexedDataset(prefix)
    seqs = [seq for doc in docs for seq in doc]
    assert len(ds) == len(seqs)
    assert ds.dtype == np.dtype(dtype)
    for i, seq in enumerate(seqs):
        np.testing.assert_array_equal(ds[i], np.array(seq, dtype=dtype))
        assert ds.sequence_lengths[i] == len(seq)
        if len(seq) >= 3:
            np.testing.assert_array_equal(ds.get(i, 1, 2), np.array(seq[1:3], dtype=dtype))
            np.testing.assert_array_equal(ds.get(i, 2), np.array(seq[2:], dtype=dtype))
    np.testing.assert_array_equal(ds[-1], np.array(seqs[-1], dtype=dtype))
    assert [list(x) for x in ds[1:4]] == [list(np.array(s, dtype=dtype)) for s in seqs[1:4]]
    boundaries = np.cumsum([0] + [len(doc) for doc in docs])
    np.testing.assert_array_equal(ds.document_indices, boundaries)
    assert IndexedDataset.exists(prefix)
    with pytest.raises(IndexError):
        ds[len(seqs)]
    with pytest.raises(ValueError, match="exceeds"):
        ds.get(1, 0, 10_000)


def test_byte_layout(tmp_path):
    docs = [[[5, 6, 7], [8]], [[9, 10]], []]
    prefix = _build(tmp_path, docs, np.uint16)
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17]) == (1,)
    assert raw[17] == 8  # uint16
    assert struct.unpack("<Q", raw[18:26]) == (3,)  # sequences
    assert struct.unpack("<Q", raw[26:34]) == (4,)  # documents + 1
    off = 34
    assert struct.unpack("<3i", raw[off : off + 12]) == (3, 1, 2)
    off += 12
    # Byte pointers: uint16 is 2 bytes per token.
    assert struct.unpack("<3q", raw[off : off + 24]) == (0, 6, 8)
    off += 24
    assert struct.unpack("<4q", raw[off : off + 32]) == (0, 2, 3, 3)
    assert len(raw) == off + 32
    data = open(prefix + ".bin", "rb").read()
    assert data == struct.pack("<6H", 5, 6, 7, 8, 9, 10)

    prefix32 = _build(tmp_path, [[[70000, 1]]], np.int32, name="wide")
    raw = open(prefix32 + ".idx", "rb").read()
    assert raw[17] == 4
    assert open(prefix32 + ".bin", "rb").read() == struct.pack("<2i", 70000, 1)


def test_builder_rejects_bad_input(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match="do not fit uint16"):
        builder.add_item(np.array([1, 70000]))
    with pytest.raises(ValueError, match="lengths sum to 4"):
        builder.add_document([1, 2, 3], [2, 2])
    with pytest.raises(ValueError, match="no Megatron .idx code"):
        IndexedDatasetBuilder(str(tmp_path / "y.bin"), dtype=np.uint32)


def test_reader_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess_data.py"):
        IndexedDataset(str(tmp_path / "missing"))
    prefix = _build(tmp_path, [[[1, 2]]], np.uint16)
    raw = bytearray(open(prefix + ".idx", "rb").read())
    raw[0:1] = b"X"
    open(prefix + ".idx", "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="not a Megatron .idx"):
        IndexedDataset(prefix)


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "empty")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert len(ds) == 0
    np.testing.assert_array_equal(ds.document_indices, [0])


def _rewrite(path, edit):
    raw = bytearray(open(path, "rb").read())
    open(path, "wb").write(bytes(edit(raw)))


def test_reader_checks_bin_against_idx(tmp_path):
    """A truncated .bin, an .idx of another corpus, a truncated/corrupt .idx: refused at open
    with the files and the mismatch named (before: a crash many samples in, or silently
    misaligned documents)."""
    docs = [[[1, 2, 3], [4]], [[5, 6]], [[7, 8, 9, 10]]]
    prefix = _build(tmp_path, docs, np.uint16)
    other = _build(tmp_path, [[[1, 2]], [[3, 4, 5, 6, 7]]], np.uint16, name="other")
    good_bin, good_idx = open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()

    def restore():
        open(prefix + ".bin", "wb").write(good_bin)
        open(prefix + ".idx", "wb").write(good_idx)

    _rewrite(prefix + ".bin", lambda raw: raw[:-2])
    with pytest.raises(ValueError, match=r"ds\.bin and .*ds\.idx do not match: the \.idx counts "
                                         r"10 tokens x 2 bytes \(uint16\) = 20 bytes but the "
                                         r"\.bin has 18"):
        IndexedDataset(prefix)
    restore()
    open(prefix + ".idx", "wb").write(open(other + ".idx", "rb").read())
    with pytest.raises(ValueError, match="counts 7 tokens .* the .bin has 20"):
        IndexedDataset(prefix)
    restore()
    _rewrite(prefix + ".idx", lambda raw: raw[:-8])
    with pytest.raises(ValueError, match=r"ds\.idx has 106 bytes but its header .* needs 114"):
        IndexedDataset(prefix)
    restore()
    _rewrite(prefix + ".idx", lambda raw: raw[:9] + struct.pack("<Q", 2) + raw[17:])
    with pytest.raises(ValueError, match="index version 2"):
        IndexedDataset(prefix)
    restore()
    _rewrite(prefix + ".idx", lambda raw: raw[:17] + b"\x09" + raw[18:])
    with pytest.raises(ValueError, match="ds.idx: unknown .idx dtype code 9"):
        IndexedDataset(prefix)
    restore()
    _rewrite(prefix + ".idx", lambda raw: raw[:17] + b"\x04" + raw[18:])  # int32: half the tokens
    with pytest.raises(ValueError, match=r"x 4 bytes \(int32\) = 40 bytes but the .bin has 20"):
        IndexedDataset(prefix)
    restore()
    # Lengths that still sum right but do not tile the .bin: [3, 1, 2, 4] -> [4, 0, 2, 4].
    _rewrite(prefix + ".idx", lambda raw: raw[:34] + struct.pack("<4i", 4, 0, 2, 4) + raw[50:])
    with pytest.raises(ValueError, match="pointers/lengths do not tile the .bin"):
        IndexedDataset(prefix)
    restore()
    _rewrite(prefix + ".idx", lambda raw: raw[:-8] + struct.pack("<q", 5))  # a 5th sequence
    with pytest.raises(ValueError, match="document indices must rise from 0 to at most .* 4"):
        IndexedDataset(prefix)
    restore()
    ds = IndexedDataset(prefix)
    assert ds[3].tolist() == [7, 8, 9, 10]
    assert [ds.document_of(i) for i in range(4)] == [0, 0, 1, 2]


def _gpt_prefix(tmp_path, bad_doc, bad_id):
    """40 documents of ids < 100; document ``bad_doc``'s third token is ``bad_id``."""
    rng = np.random.default_rng(1)
    docs = [[list(rng.integers(0, 100, size=int(rng.integers(3, 9))))] for _ in range(40)]
    docs[bad_doc][0][2] = bad_id
    return _build(tmp_path, docs, np.int32, name="gpt")


@pytest.mark.parametrize("bad_id", [256, -1])
def test_out_of_vocab_ids_refused_at_load(tmp_path, bad_id):
    """An id outside [0, vocab) is refused in the sample that reads it, naming the .bin and the
    document; every other sample still loads (before: a bare IndexError in the embedding)."""
    prefix = _gpt_prefix(tmp_path, 17, bad_id)
    train, _, _ = build_train_valid_test_datasets([prefix], "1", 8, [30, 0, 0], 0, False, 256, 0)
    per_split = build_per_split_datasets([[prefix], None, None], 8, [30, 0, 0], 0, 0,
                                         vocab_size=256)[0]
    # The same samples without a vocabulary (library use): nothing is checked, as before.
    plain = GPTDataset(IndexedDataset(prefix), np.arange(40), 30, 8, seed=0, eod_token=0)
    holding = {i for i in range(len(plain)) if bad_id in plain.get_text(i)}
    assert holding
    for ds in (train, per_split):
        failed = {}
        for i in range(len(ds)):
            try:
                assert int(ds[i]["tokens"].max()) < 256 and int(ds[i]["labels"].min()) >= 0
            except DataFileError as err:
                failed[i] = str(err)
        assert set(failed) == holding  # exactly the samples whose text covers that token
        for i, msg in failed.items():
            assert msg.startswith(f"{prefix}.bin: document 17 (sequence 17, read for sample {i})")
            assert f"holds token id {bad_id}, outside the tokenizer's vocabulary [0, 256)" in msg


def test_builder_refuses_out_of_vocab_ids(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "v.bin"), dtype=np.uint16, vocab_size=50)
    builder.add_item(np.array([0, 49]))
    with pytest.raises(DataFileError, match=r"token id 50 is outside the vocabulary \[0, 50\)"):
        builder.add_document([1, 50, 2], [3])
    with pytest.raises(DataFileError, match="token id -3 is outside"):
        builder.add_item(np.array([1, -3]))
    builder.finalize(str(tmp_path / "v.idx"))
    assert IndexedDataset(str(tmp_path / "v"))[0].tolist() == [0, 49]
