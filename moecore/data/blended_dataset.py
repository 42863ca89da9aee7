"""Weighted mixture of datasets with Megatron-LM's deterministic greedy blending."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moecore.data.sample_index import build_blending_indices


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights as float64 summing to 1; negative or all-zero weights raise ValueError."""
    w = np.asarray([float(x) for x in weights], dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError("blending needs at least one weight")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights must be >= 0 with a positive sum, got {list(weights)}")
    return w / w.sum()


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    Sample ``i`` is sample ``dataset_sample_index[i]`` of ``datasets[dataset_index[i]]``
    (Megatron's greedy rule: position ``i`` goes to the dataset furthest below its share, so
    every prefix of length ``n`` holds ``weight * n`` samples of each dataset to within one).
    Each dataset is read in its own order from its start, so it needs about
    ``weight * size`` samples. The blend is deterministic; ``seed`` only identifies it (for
    logs and caches), like Megatron's config seed.
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float],
        size: int,
        seed: int = 0,
    ) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"got {len(datasets)} datasets but {len(weights)} weights")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        self.seed = int(seed)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(
            self.weights, self.size
        )
        for d, dataset in enumerate(self.datasets):
            picked = self.dataset_sample_index[self.dataset_index == d]
            need = int(picked.max()) + 1 if picked.size else 0
            if need > len(dataset):
                raise ValueError(
                    f"blended dataset of {self.size} samples needs {need} samples of dataset {d} "
                    f"(weight {self.weights[d]:.4f}) but it has {len(dataset)}; build each "
                    "dataset with at least ceil(weight * size * 1.005) samples"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for {self.size} samples")
        dataset = self.datasets[int(self.dataset_index[idx])]
        return dataset[int(self.dataset_sample_index[idx])]
