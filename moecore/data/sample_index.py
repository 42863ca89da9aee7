"""Sample-boundary and blending indices, compiled helper with a pure-numpy fallback.

``build_sample_idx`` reproduces Megatron-LM's ``helpers.build_sample_idx``: the documents of
every epoch are laid end to end in ``doc_idx`` order and cut into samples of ``seq_length + 1``
tokens that overlap by one token (the last label of sample ``i`` is the first input of sample
``i + 1``). Row ``i`` of the result is ``(index into doc_idx, token offset in that document)``
where sample ``i`` starts; sample ``i`` ends (inclusive) at row ``i + 1``.

``build_blending_indices`` reproduces Megatron's greedy error-minimising blend.

The compiled versions live in ``csrc/helpers.cpp`` (``moecore.data._helpers``); when the
extension has not been built the numpy references below are used, after a one-time warning.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

try:
    from moecore.data import _helpers
except ImportError:  # the extension is optional: numpy gives identical results, only slower
    _helpers = None

_warned_missing = False


def helpers_available() -> bool:
    """True when the compiled ``moecore.data._helpers`` extension is importable."""
    return _helpers is not None


def _warn_missing_once() -> None:
    global _warned_missing
    if not _warned_missing:
        _warned_missing = True
        logger.warning(
            "moecore.data._helpers is not built; using the slower numpy fallback for dataset "
            "indices (run pip install -e . to build moecore.data._helpers)"
        )


def _check_sample_args(seq_length: int, num_epochs: int, tokens_per_epoch: int) -> None:
    for name, value in (
        ("seq_length", seq_length),
        ("num_epochs", num_epochs),
        ("tokens_per_epoch", tokens_per_epoch),
    ):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def build_sample_idx_reference(
    sizes: np.ndarray,
    doc_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
) -> np.ndarray:
    """Pure-numpy ``build_sample_idx``; same contract and output as the compiled helper.

    Args:
        sizes: int32 [num_docs], tokens per document (indexed by document id).
        doc_idx: int32/int64 [num_epochs * docs_per_epoch], document ids in reading order.
        seq_length: tokens per sample input; each sample holds ``seq_length + 1`` tokens.
        num_epochs: epochs laid out in ``doc_idx``.
        tokens_per_epoch: tokens in one epoch of the selected documents.

    Returns:
        int64 [num_samples + 1, 2] with num_samples = (num_epochs*tokens_per_epoch - 1) //
        seq_length.
    """
    _check_sample_args(seq_length, num_epochs, tokens_per_epoch)
    sizes = np.asarray(sizes)
    doc_idx = np.asarray(doc_idx)
    if doc_idx.size and (doc_idx.min() < 0 or doc_idx.max() >= sizes.shape[0]):
        raise ValueError(
            f"doc_idx holds ids in [{doc_idx.min()}, {doc_idx.max()}] but sizes has "
            f"{sizes.shape[0]} documents"
        )
    num_samples = (int(num_epochs) * int(tokens_per_epoch) - 1) // int(seq_length)
    # doc_start[j] = global position of the first token of doc_idx[j] in the token stream.
    doc_start = np.zeros(doc_idx.shape[0] + 1, dtype=np.int64)
    np.cumsum(sizes[doc_idx].astype(np.int64), out=doc_start[1:])
    # Row k (k >= 1) is the document holding stream position k * seq_length: sample k-1 ends
    # there and sample k starts there. side="right" skips empty documents, as the C++ walk does.
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * int(seq_length)
    if num_samples and positions[-1] >= doc_start[-1]:
        raise ValueError(
            f"ran past the end of doc_idx (length {doc_idx.shape[0]}, {doc_start[-1]} tokens): "
            f"tokens_per_epoch * num_epochs = {num_epochs * tokens_per_epoch} exceeds it"
        )
    rows = np.searchsorted(doc_start, positions, side="right") - 1
    sample_idx = np.zeros((num_samples + 1, 2), dtype=np.int64)
    sample_idx[1:, 0] = rows
    sample_idx[1:, 1] = positions - doc_start[rows]
    return sample_idx


def build_sample_idx(
    sizes: np.ndarray,
    doc_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
) -> np.ndarray:
    """Sample boundaries int64 [num_samples + 1, 2]; compiled helper, numpy fallback.

    See ``build_sample_idx_reference`` for the arguments.
    """
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    doc_idx = np.ascontiguousarray(doc_idx)
    if doc_idx.dtype not in (np.int32, np.int64):
        doc_idx = doc_idx.astype(np.int64)
    if _helpers is None:
        _warn_missing_once()
        return build_sample_idx_reference(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    return _helpers.build_sample_idx(
        sizes, doc_idx, int(seq_length), int(num_epochs), int(tokens_per_epoch)
    )


def build_blending_indices_reference(
    weights: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pure-python Megatron greedy blend (same results as the compiled helper).

    Args:
        weights: float64 [num_datasets], normalised to sum to 1.
        size: number of blended samples.

    Returns:
        dataset_index int16 [size] and dataset_sample_index int64 [size]: blended sample ``i``
        is sample ``dataset_sample_index[i]`` of dataset ``dataset_index[i]``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or weights.shape[0] < 1:
        raise ValueError(f"weights must be a non-empty 1-D array, got shape {weights.shape}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    current = np.zeros(weights.shape[0], dtype=np.int64)
    for i in range(size):
        # Python floats keep the same IEEE arithmetic as the C++ loop; argmax takes the first
        # maximum, matching the strict ">" there.
        errors = weights * float(max(i, 1)) - current
        best = int(np.argmax(errors))
        dataset_index[i] = best
        dataset_sample_index[i] = current[best]
        current[best] += 1
    return dataset_index, dataset_sample_index


def build_blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blend indices; compiled helper, python fallback. See the reference for details."""
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if _helpers is None:
        _warn_missing_once()
        return build_blending_indices_reference(weights, size)
    return _helpers.build_blending_indices(weights, int(size))
