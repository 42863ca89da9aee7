"""Train/valid/test datasets from Megatron's ``--data-path``, ``--split`` and sample counts."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch

from moecore.data.blended_dataset import BlendedDataset, normalize_weights
from moecore.data.gpt_dataset import GPTDataset
from moecore.data.indexed_dataset import IndexedDataset
from moecore.data.mock import MockGPTDataset

SPLIT_NAMES = ("train", "valid", "test")
# Megatron over-samples each blended component by 0.5 % so rounding never leaves one short.
_BLEND_SURPLUS = 0.005


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` (or ``"98/2/0"``, ``"1"``) -> three fractions summing to 1."""
    values = [float(x) for x in re.findall(r"[.0-9]+", split)]
    if not values or len(values) > 3:
        raise ValueError(
            f"--split {split!r} must give 1 to 3 non-negative numbers (train,valid,test), "
            "e.g. '969,30,1'"
        )
    values += [0.0] * (3 - len(values))
    total = sum(values)
    if total <= 0:
        raise ValueError(f"--split {split!r} sums to 0; give at least one positive part")
    return [v / total for v in values]


def split_indices(split: str, num_documents: int) -> list[int]:
    """Document boundaries [4]: split ``s`` owns documents ``[idx[s], idx[s + 1])``.

    Megatron's rounding: each part is rounded, then every boundary is shifted by the overshoot
    so the last one lands exactly on ``num_documents``.
    """
    bounds = [0]
    for fraction in parse_split(split):
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    diff = bounds[-1] - num_documents
    return [bounds[0]] + [b - diff for b in bounds[1:]]


def parse_data_path(data_path: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Megatron ``--data-path`` forms: ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]``."""
    data_path = [str(p).strip() for p in data_path]
    if len(data_path) == 0:
        raise ValueError("--data-path is empty; give a prefix or 'w1 prefix1 w2 prefix2 ...'")
    if len(data_path) == 1:
        return data_path, None
    if len(data_path) % 2 == 0:
        try:
            weights = [float(w) for w in data_path[0::2]]
        except ValueError:
            weights = None
        if weights is not None:
            if min(weights) <= 0:
                raise ValueError(
                    f"--data-path weights must be > 0, got {weights}; drop a prefix instead of "
                    "giving it weight 0"
                )
            return data_path[1::2], list(normalize_weights(weights))
    raise ValueError(
        f"--data-path {data_path} holds several prefixes without weights; write it as "
        "'w1 prefix1 w2 prefix2 ...' (weights need not sum to 1)"
    )


def _gpt_splits(
    prefix: str,
    split: str,
    seq_length: int,
    num_samples: Sequence[int],
    seed: int,
    eod_token: int,
    eod_mask_loss: bool,
    vocab_size: int | None,
) -> list[GPTDataset]:
    indexed = IndexedDataset(prefix)
    bounds = split_indices(split, len(indexed))
    return [
        GPTDataset(
            indexed,
            np.arange(bounds[s], bounds[s + 1], dtype=np.int64),
            int(num_samples[s]),
            seq_length,
            seed,
            eod_token,
            eod_mask_loss,
            name=f"{prefix}:{SPLIT_NAMES[s]}",
            vocab_size=vocab_size,
        )
        for s in range(3)
    ]


def build_train_valid_test_datasets(
    data_path: list[str] | None,
    split: str,
    seq_length: int,
    train_valid_test_num_samples: Sequence[int],
    seed: int,
    mock: bool,
    vocab_size: int | None,
    eod_token: int,
    eod_mask_loss: bool = False,
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train, valid, test) datasets; a split with no documents or 0 samples is empty.

    With ``mock`` the data comes from ``MockGPTDataset`` (``vocab_size`` ids; the three splits
    use different seeds). Otherwise ``data_path`` is ``[prefix]`` (one ``.bin/.idx``) or
    ``[w1, prefix1, ...]`` (a ``BlendedDataset`` of exactly the requested size per split; each
    component is built with ``ceil(n * w * 1.005)`` samples, as Megatron does). Real data is
    checked to hold only ids below ``vocab_size``, per sample as it is read (``GPTDataset``).
    """
    if len(train_valid_test_num_samples) != 3:
        raise ValueError(
            f"train_valid_test_num_samples needs 3 counts, got {train_valid_test_num_samples}"
        )
    counts = [int(n) for n in train_valid_test_num_samples]
    if min(counts) < 0:
        raise ValueError(f"sample counts must be >= 0, got {counts}")
    if mock:
        return tuple(
            MockGPTDataset(counts[s], seq_length, vocab_size, seed + s, eod_token, eod_mask_loss)
            for s in range(3)
        )
    if not data_path:
        raise ValueError("no --data-path given; pass one or use mock data (--mock-data)")
    prefixes, weights = parse_data_path(data_path)
    if weights is None:
        return tuple(
            _gpt_splits(prefixes[0], split, seq_length, counts, seed, eod_token, eod_mask_loss,
                        vocab_size)
        )
    per_prefix = []
    for prefix, weight in zip(prefixes, weights):
        sizes = [int(math.ceil(n * weight * (1 + _BLEND_SURPLUS))) for n in counts]
        per_prefix.append(
            _gpt_splits(prefix, split, seq_length, sizes, seed, eod_token, eod_mask_loss,
                        vocab_size)
        )
    blended = []
    for s in range(3):
        components = [datasets[s] for datasets in per_prefix]
        empty = [p for p, d in zip(prefixes, components) if len(d) == 0]
        size = counts[s] if len(empty) < len(components) else 0
        if size and empty:
            raise ValueError(
                f"{SPLIT_NAMES[s]} split of blend {prefixes} needs {counts[s]} samples but "
                f"--split {split!r} leaves no documents in {empty}; give every split a share "
                "of each dataset or request 0 samples for this split"
            )
        blended.append(BlendedDataset(components, weights, size, seed))
    return tuple(blended)


def build_per_split_datasets(
    paths: Sequence[list[str] | None],
    seq_length: int,
    train_valid_test_num_samples: Sequence[int],
    seed: int,
    eod_token: int,
    eod_mask_loss: bool = False,
    vocab_size: int | None = None,
) -> tuple[torch.utils.data.Dataset | None, ...]:
    """Megatron's ``--train-data-path`` / ``--valid-data-path`` / ``--test-data-path``: each
    split from its own prefix or weight/prefix list, using every document of it (no
    ``--split``); a split without a path (or asked for 0 samples) is None. Ids are checked
    against ``vocab_size`` as in :func:`build_train_valid_test_datasets`."""
    if len(paths) != 3:
        raise ValueError(f"paths needs (train, valid, test) entries, got {len(paths)}")
    out = []
    for s, path in enumerate(paths):
        count = int(train_valid_test_num_samples[s])
        if not path or count == 0:
            out.append(None)
            continue
        only = [0, 0, 0]
        only[s] = count
        whole = ",".join("1" if i == s else "0" for i in range(3))  # every document to split s
        out.append(build_train_valid_test_datasets(
            path, whole, seq_length, only, seed, False, vocab_size, eod_token, eod_mask_loss)[s])
    return tuple(out)
