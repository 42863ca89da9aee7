"""build_sample_idx / build_blending_indices: compiled helper vs numpy reference vs brute force."""

import logging

import numpy as np
import pytest

from moecore.data import sample_index as si

needs_helpers = pytest.mark.skipif(
    not si.helpers_available(),
    reason="moecore.data._helpers not built (run pip install -e . to build it)",
)


def _random_case(rng, t):
    num_docs = int(rng.integers(1, 25))
    # Many short documents (often shorter than seq_length), some empty, some long.
    sizes = rng.integers(0, 12 if t % 3 else 90, size=num_docs).astype(np.int32)
    if sizes.sum() == 0:
        sizes[int(rng.integers(num_docs))] = 1 + int(rng.integers(5))
    num_epochs = int(rng.integers(1, 5))
    seq_length = int(rng.integers(1, 70))
    documents = np.arange(num_docs)
    doc_idx = np.concatenate([rng.permutation(documents) for _ in range(num_epochs)])
    doc_idx = doc_idx.astype(np.int32 if t % 2 else np.int64)
    return sizes, doc_idx, seq_length, num_epochs, int(sizes.sum())


def _brute_force_samples(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    """Samples cut directly from the token stream; tokens are (doc position, offset) pairs."""
    stream = [(j, o) for j, d in enumerate(doc_idx) for o in range(sizes[d])]
    n = (num_epochs * tokens_per_epoch - 1) // seq_length
    return [stream[k * seq_length : k * seq_length + seq_length + 1] for k in range(n)]


def _samples_from_index(sample_idx, sizes, doc_idx):
    out = []
    for (j0, o0), (j1, o1) in zip(sample_idx[:-1], sample_idx[1:]):
        tokens = []
        for j in range(j0, j1 + 1):
            start = o0 if j == j0 else 0
            stop = o1 + 1 if j == j1 else sizes[doc_idx[j]]
            tokens += [(j, o) for o in range(start, stop)]
        out.append(tokens)
    return out


def test_reference_matches_brute_force_token_stream():
    rng = np.random.default_rng(1)
    for t in range(60):
        args = _random_case(rng, t)
        ref = si.build_sample_idx_reference(*args)
        num_samples = (args[3] * args[4] - 1) // args[2]
        assert ref.shape == (num_samples + 1, 2) and ref.dtype == np.int64
        got = _samples_from_index(ref, args[0], args[1])
        want = _brute_force_samples(*args)
        assert got == want, f"case {t}"
        assert all(len(s) == args[2] + 1 for s in got)


@needs_helpers
def test_compiled_helper_matches_reference():
    rng = np.random.default_rng(2)
    for t in range(400):
        args = _random_case(rng, t)
        compiled = si._helpers.build_sample_idx(*args)
        ref = si.build_sample_idx_reference(*args)
        assert compiled.dtype == np.int64
        np.testing.assert_array_equal(compiled, ref, err_msg=f"case {t}")
        np.testing.assert_array_equal(si.build_sample_idx(*args), ref)


@needs_helpers
def test_compiled_helper_large_multi_epoch():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 700, size=20000).astype(np.int32)
    doc_idx = np.concatenate([rng.permutation(20000) for _ in range(3)]).astype(np.int32)
    args = (sizes, doc_idx, 1024, 3, int(sizes.sum()))
    np.testing.assert_array_equal(
        si._helpers.build_sample_idx(*args), si.build_sample_idx_reference(*args)
    )


def test_fallback_warns_once_and_matches(monkeypatch, caplog):
    rng = np.random.default_rng(4)
    args = _random_case(rng, 1)
    want = si.build_sample_idx_reference(*args)
    monkeypatch.setattr(si, "_helpers", None)
    monkeypatch.setattr(si, "_warned_missing", False)
    with caplog.at_level(logging.WARNING, logger=si.__name__):
        np.testing.assert_array_equal(si.build_sample_idx(*args), want)
        si.build_sample_idx(*args)
        si.build_blending_indices(np.array([0.5, 0.5]), 10)
    warnings = [r for r in caplog.records if "pip install -e ." in r.getMessage()]
    assert len(warnings) == 1
    assert "moecore.data._helpers" in warnings[0].getMessage()


@pytest.mark.parametrize("use_helpers", [True, False])
def test_bad_inputs_raise_value_error(monkeypatch, use_helpers):
    if use_helpers and not si.helpers_available():
        pytest.skip("moecore.data._helpers not built")
    if not use_helpers:
        monkeypatch.setattr(si, "_helpers", None)
    sizes = np.array([3, 4], dtype=np.int32)
    doc_idx = np.array([0, 1], dtype=np.int32)
    with pytest.raises(ValueError, match="seq_length"):
        si.build_sample_idx(sizes, doc_idx, 0, 1, 7)
    with pytest.raises(ValueError, match="num_epochs"):
        si.build_sample_idx(sizes, doc_idx, 2, 0, 7)
    # Claims more tokens than doc_idx holds.
    with pytest.raises(ValueError, match="past the end of doc_idx"):
        si.build_sample_idx(sizes, doc_idx, 2, 1, 20)
    with pytest.raises(ValueError, match="outside sizes|sizes has"):
        si.build_sample_idx(sizes, np.array([0, 5], dtype=np.int32), 2, 1, 7)


def _check_blend(dataset_index, dataset_sample_index, weights, size):
    assert dataset_index.shape == (size,) and dataset_sample_index.shape == (size,)
    counts = np.zeros(len(weights), dtype=np.int64)
    for i in range(size):
        d = dataset_index[i]
        # Each dataset is read in order from its start.
        assert dataset_sample_index[i] == counts[d]
        counts[d] += 1
        # Megatron's rule picks sample i against the target weight * max(i, 1), so after it
        # every dataset is within one sample of that target (counts lead it by one in total).
        dev = counts - weights * max(i, 1)
        assert np.all(dev > -1.0 - 1e-9) and np.all(dev <= 1.0 + 1e-9), (i, dev)
    # Hence the realised share is within (1 + weight) / size of the weight: the one-sample
    # bound plus the one-position lag of Megatron's target.
    assert np.all(np.abs(counts / size - weights) < (1.0 + weights) / size + 1e-12)


def test_blending_reference_proportions():
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(1, 6))
        weights = rng.random(n) + 0.01
        weights /= weights.sum()
        size = int(rng.integers(1, 400))
        di, dsi = si.build_blending_indices_reference(weights, size)
        assert di.dtype == np.int16 and dsi.dtype == np.int64
        _check_blend(di, dsi, weights, size)


@needs_helpers
def test_blending_compiled_matches_reference():
    rng = np.random.default_rng(6)
    for _ in range(30):
        n = int(rng.integers(1, 8))
        weights = rng.random(n) + 0.001
        weights /= weights.sum()
        size = int(rng.integers(0, 3000))
        c_idx, c_sample = si._helpers.build_blending_indices(weights, size)
        r_idx, r_sample = si.build_blending_indices_reference(weights, size)
        np.testing.assert_array_equal(c_idx, r_idx)
        np.testing.assert_array_equal(c_sample, r_sample)
    di, dsi = si.build_blending_indices(np.array([0.7, 0.2, 0.1]), 5000)
    _check_blend(di, dsi, np.array([0.7, 0.2, 0.1]), 5000)


def test_compiled_helper_is_built_in_ci():
    """CI installs with `pip install -e .`, which must build the pybind11 helper; the skips
    above are only for source trees that were never installed."""
    import os

    if not os.environ.get("CI"):
        pytest.skip("only enforced in CI (CI=true)")
    assert si.helpers_available(), "moecore.data._helpers was not built by pip install -e ."
