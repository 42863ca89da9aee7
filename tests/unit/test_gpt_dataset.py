"""GPTDataset (Megatron index semantics), MockGPTDataset, BlendedDataset, builder, sampler."""

import numpy as np
import pytest
import torch

from moecore.data import (
    BlendedDataset,
    GPTDataset,
    IndexedDataset,
    IndexedDatasetBuilder,
    MockGPTDataset,
    build_data_loader,
    build_train_valid_test_datasets,
    parse_data_path,
    split_indices,
)
from moecore.data.gpt_dataset import build_gpt_indices

EOD = 0


def _make_indexed(tmp_path, name, num_docs, seed, max_len=30, vocab=1000):
    """Documents of random length (some shorter than seq_length), each ending in EOD."""
    rng = np.random.default_rng(seed)
    prefix = str(tmp_path / name)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(num_docs):
        body = rng.integers(1, vocab, size=int(rng.integers(0, max_len)))
        builder.add_item(np.concatenate([body, [EOD]]))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def test_split_indices_megatron_rounding():
    assert split_indices("969,30,1", 1000) == [0, 969, 999, 1000]
    assert split_indices("98/2", 50) == [0, 49, 50, 50]
    assert split_indices("1", 7) == [0, 7, 7, 7]
    # Parts round to 3+3+3 = 9; Megatron shifts every boundary by the shortfall.
    assert split_indices("1,1,1", 10) == [0, 4, 7, 10]
    with pytest.raises(ValueError, match="sums to 0"):
        split_indices("0,0,0", 10)
    with pytest.raises(ValueError, match="1 to 3"):
        split_indices("1,2,3,4", 10)


def test_gpt_dataset_matches_token_stream(tmp_path):
    prefix = _make_indexed(tmp_path, "a", 40, seed=0)
    indexed = IndexedDataset(prefix)
    seq_length = 16
    documents = np.arange(5, 35)
    tokens_per_epoch = int(indexed.sequence_lengths[documents].sum())
    num_samples = 3 * tokens_per_epoch // seq_length  # forces several epochs
    ds = GPTDataset(indexed, documents, num_samples, seq_length, seed=7, eod_token=EOD)
    epochs = len(ds.doc_idx) // len(documents)
    assert epochs >= 3 and len(ds.doc_idx) == epochs * len(documents)
    # Fewest epochs: one less would not hold num_samples samples.
    assert ((epochs - 1) * tokens_per_epoch - 1) // seq_length < num_samples
    assert len(ds) == (epochs * tokens_per_epoch - 1) // seq_length >= num_samples
    # Each document appears once per epoch (the order interleaves epochs, as in Megatron).
    counts = np.bincount(ds.doc_idx, minlength=40)
    assert counts[documents].tolist() == [epochs] * len(documents)
    assert counts.sum() == len(ds.doc_idx)
    np.testing.assert_array_equal(np.sort(ds.shuffle_idx), np.arange(len(ds)))
    stream = np.concatenate([indexed[d] for d in ds.doc_idx]).astype(np.int64)
    for i in range(len(ds)):
        j = int(ds.shuffle_idx[i])
        text = stream[j * seq_length : j * seq_length + seq_length + 1]
        item = ds[i]
        np.testing.assert_array_equal(item["tokens"].numpy(), text[:-1])
        np.testing.assert_array_equal(item["labels"].numpy(), text[1:])
    assert item["tokens"].dtype == torch.int64 and item["labels"].dtype == torch.int64
    assert item["loss_mask"].dtype == torch.float32
    np.testing.assert_array_equal(item["position_ids"].numpy(), np.arange(seq_length))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_megatron_shuffles(tmp_path):
    indexed = IndexedDataset(_make_indexed(tmp_path, "b", 30, seed=1))
    sizes, documents = indexed.sequence_lengths, np.arange(30)
    tpe = int(sizes.sum())
    # One epoch: doc_idx is the documents shuffled by RandomState(seed), then the samples.
    doc_idx, sample_idx, shuffle_idx = build_gpt_indices(sizes, documents, 5, 8, seed=3)
    rng = np.random.RandomState(3)
    want = documents.astype(np.int32)
    rng.shuffle(want)
    np.testing.assert_array_equal(doc_idx, want)
    want_shuffle = np.arange(len(sample_idx) - 1, dtype=np.uint32)
    rng.shuffle(want_shuffle)
    np.testing.assert_array_equal(shuffle_idx, want_shuffle)
    # Two epochs where the second is barely used: it is shuffled separately and so are the
    # samples drawn only from it.
    per_epoch = (tpe - 1) // 8
    doc_idx, sample_idx, shuffle_idx = build_gpt_indices(sizes, documents, per_epoch + 1, 8, 3)
    rng = np.random.RandomState(3)
    first, last = documents.astype(np.int32), documents.astype(np.int32)
    rng.shuffle(first)
    rng.shuffle(last)
    np.testing.assert_array_equal(doc_idx, np.concatenate([first, last]))
    first = np.arange(per_epoch, dtype=np.uint32)
    rest = np.arange(per_epoch, len(sample_idx) - 1, dtype=np.uint32)
    rng.shuffle(first)
    rng.shuffle(rest)
    assert len(rest) >= 1
    np.testing.assert_array_equal(shuffle_idx, np.concatenate([first, rest]))
    # Two epochs both mostly used: one shuffle over both epochs (documents may interleave).
    doc_idx, _, _ = build_gpt_indices(sizes, documents, 2 * per_epoch - 1, 8, 3)
    want = np.tile(documents, 2).astype(np.int32)
    np.random.RandomState(3).shuffle(want)
    np.testing.assert_array_equal(doc_idx, want)
    # Same seed, same indices; another seed, another order.
    a = GPTDataset(indexed, documents, 20, 8, seed=3, eod_token=EOD)
    b = GPTDataset(indexed, documents, 20, 8, seed=3, eod_token=EOD)
    c = GPTDataset(indexed, documents, 20, 8, seed=4, eod_token=EOD)
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(a)))
    assert not np.array_equal(a.doc_idx, c.doc_idx)


def test_eod_mask_and_empty(tmp_path):
    indexed = IndexedDataset(_make_indexed(tmp_path, "c", 20, seed=2, max_len=5))
    ds = GPTDataset(indexed, np.arange(20), 10, 12, seed=0, eod_token=EOD, eod_mask_loss=True)
    plain = GPTDataset(indexed, np.arange(20), 10, 12, seed=0, eod_token=EOD)
    seen_eod = False
    for i in range(len(ds)):
        item = ds[i]
        is_eod = item["tokens"] == EOD
        seen_eod |= bool(is_eod.any())
        assert torch.equal(item["loss_mask"], (~is_eod).float())
        assert torch.equal(plain[i]["loss_mask"], torch.ones(12))
    assert seen_eod
    assert len(GPTDataset(indexed, np.arange(0), 10, 12, seed=0, eod_token=EOD)) == 0
    assert len(GPTDataset(indexed, np.arange(20), 0, 12, seed=0, eod_token=EOD)) == 0
    with pytest.raises(ValueError, match="20 sequences"):
        GPTDataset(indexed, np.arange(25), 10, 12, seed=0, eod_token=EOD)


def test_mock_dataset_deterministic():
    a = MockGPTDataset(50, 32, vocab_size=100, seed=5, eod_token=99)
    b = MockGPTDataset(50, 32, vocab_size=100, seed=5, eod_token=99)
    c = MockGPTDataset(50, 32, vocab_size=100, seed=6, eod_token=99)
    assert len(a) == 50
    for i in (0, 17, 49):
        assert torch.equal(a[i]["tokens"], b[i]["tokens"])
        assert torch.equal(a[i]["labels"][:-1], a[i]["tokens"][1:])
        assert a[i]["tokens"].shape == (32,)
    assert not torch.equal(a[3]["tokens"], a[4]["tokens"])
    assert not torch.equal(a[3]["tokens"], c[3]["tokens"])
    all_tokens = torch.stack([a[i]["tokens"] for i in range(50)])
    assert all_tokens.min() >= 0 and all_tokens.max() <= 99
    assert len(torch.unique(all_tokens)) > 90  # covers the vocab
    with pytest.raises(ValueError, match="vocab_size"):
        MockGPTDataset(5, 8, vocab_size=0, seed=0)


def test_blended_dataset_proportions(tmp_path):
    datasets = [MockGPTDataset(400, 4, 50, seed=s) for s in range(3)]
    weights = [0.5, 0.3, 0.2]
    size = 600
    blend = BlendedDataset(datasets, weights, size, seed=0)
    counts = np.bincount(blend.dataset_index, minlength=3)
    # Megatron's greedy rule lags its target by one position: within (1 + w) / size.
    assert np.all(np.abs(counts / size - np.array(weights)) < (1 + np.array(weights)) / size)
    for i in (0, 1, 2, 599):
        d, j = int(blend.dataset_index[i]), int(blend.dataset_sample_index[i])
        assert torch.equal(blend[i]["tokens"], datasets[d][j]["tokens"])
    with pytest.raises(ValueError, match="needs .* samples of dataset 0"):
        BlendedDataset(datasets, weights, 1000, seed=0)
    with pytest.raises(ValueError, match="3 datasets but 2 weights"):
        BlendedDataset(datasets, weights[:2], 10)


def test_builder_forms(tmp_path):
    p1 = _make_indexed(tmp_path, "p1", 200, seed=3)
    p2 = _make_indexed(tmp_path, "p2", 100, seed=4)
    kw = dict(seq_length=16, seed=1, mock=False, vocab_size=None, eod_token=EOD)
    train, valid, test = build_train_valid_test_datasets(
        [p1], "90,10,0", **kw, train_valid_test_num_samples=(50, 5, 0)
    )
    assert isinstance(train, GPTDataset) and len(train) >= 50 and len(valid) >= 5
    assert len(test) == 0
    assert train.documents.tolist() == list(range(180))
    assert valid.documents.tolist() == list(range(180, 200))
    train, valid, test = build_train_valid_test_datasets(
        ["0.75", p1, "0.25", p2], "90,10,0", **kw, train_valid_test_num_samples=(80, 8, 4)
    )
    assert isinstance(train, BlendedDataset) and (len(train), len(valid), len(test)) == (80, 8, 0)
    np.testing.assert_allclose(train.weights, [0.75, 0.25])
    counts = np.bincount(train.dataset_index, minlength=2)
    assert abs(counts[0] - 60) <= 1
    assert train[0]["tokens"].shape == (16,)
    mock = build_train_valid_test_datasets(None, "1", 16, (10, 2, 0), 0, True, 64, 63)
    assert [len(d) for d in mock] == [10, 2, 0]
    assert parse_data_path(["2", "x", "6", "y"]) == (["x", "y"], [0.25, 0.75])
    with pytest.raises(ValueError, match="without weights"):
        parse_data_path(["x", "y"])
    with pytest.raises(ValueError, match="must be > 0"):
        parse_data_path(["0", "x", "1", "y"])
    with pytest.raises(ValueError, match="no --data-path"):
        build_train_valid_test_datasets(None, "1", 16, (1, 0, 0), 0, False, None, 0)


def test_data_loader_dp_slices_and_resume():
    ds = MockGPTDataset(53, 4, 30, seed=0)
    mbs, dp = 2, 3

    def ids(loader):
        return [tuple(int(x) for x in b["tokens"][:, 0]) for b in loader]

    first_tok = [int(ds[i]["tokens"][0]) for i in range(len(ds))]
    per_rank = [ids(build_data_loader(ds, mbs, 0, r, dp)) for r in range(dp)]
    assert all(len(p) == 53 // (mbs * dp) for p in per_rank)
    for step in range(len(per_rank[0])):
        for r in range(dp):
            start = step * mbs * dp + r * mbs
            assert per_rank[r][step] == tuple(first_tok[start : start + mbs])
    # Resume after 3 global micro-batches continues exactly where the first run was.
    resumed = ids(build_data_loader(ds, mbs, 3 * mbs * dp, 1, dp))
    assert resumed == per_rank[1][3:]
    batch = next(iter(build_data_loader(ds, mbs, 0, 0, dp)))
    assert batch["tokens"].shape == (mbs, 4) and batch["loss_mask"].dtype == torch.float32
    assert build_data_loader(MockGPTDataset(0, 4, 30, 0), mbs, 0, 0, dp) is None
    with pytest.raises(ValueError, match="consumed_samples=53"):
        build_data_loader(ds, mbs, 53, 0, dp)
    with pytest.raises(ValueError, match="data_parallel_rank=3"):
        build_data_loader(ds, mbs, 0, 3, dp)


def test_per_split_data_paths(tmp_path):
    """--train-data-path / --valid-data-path / --test-data-path: each split reads every document
    of its own prefixes; a split without a path is None."""
    from moecore.data import build_per_split_datasets

    a = _make_indexed(tmp_path, "a", 120, seed=5)
    b = _make_indexed(tmp_path, "b", 40, seed=6)
    c = _make_indexed(tmp_path, "c", 60, seed=7)
    train, valid, test = build_per_split_datasets(
        [["0.25", a, "0.75", c], [b], None], 16, (40, 6, 3), seed=1, eod_token=EOD)
    assert test is None
    assert isinstance(train, BlendedDataset) and len(train) == 40
    assert [d.documents.tolist() for d in train.datasets] == [list(range(120)),
                                                             list(range(60))]
    assert isinstance(valid, GPTDataset) and len(valid) >= 6
    assert valid.documents.tolist() == list(range(40))
    assert build_per_split_datasets([[a], [b], [c]], 16, (5, 0, 2), 1, EOD)[1] is None


def test_per_split_data_path_flags(tmp_path, capsys):
    from moecore.arguments import parse_args
    from moecore.training import pretrain
    from tests.cli import BASE, parse_error

    a = _make_indexed(tmp_path, "a", 300, seed=8, vocab=90)
    b = _make_indexed(tmp_path, "b", 50, seed=9, vocab=90)
    no_mock = [x for x in BASE if x != "--mock-data"]
    argv = no_mock + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
                      "--train-data-path", a, "--valid-data-path", b, "--eval-interval", "5",
                      "--eval-iters", "1", "--train-iters", "5"]
    out = pretrain(argv)
    assert len(out["lm_loss"]) == 5 and set(out["val_loss"]) == {5}
    assert out["test_loss"] is None
    assert "replace --data-path" in parse_error(no_mock + ["--data-path", a,
                                                           "--train-data-path", a], capsys)
    assert "replace --data-path" in parse_error(BASE + ["--train-data-path", a], capsys)
    assert "without --train-data-path" in parse_error(no_mock + ["--valid-data-path", b],
                                                      capsys)
    assert parse_args(argv).train_data_path == [a]
