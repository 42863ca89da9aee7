"""Synthetic GPT samples for runs without a corpus (``--mock-data``)."""

from __future__ import annotations

import numpy as np
import torch

from moecore.data.gpt_dataset import gpt_sample_from_text


class MockGPTDataset(torch.utils.data.Dataset):
    """``num_samples`` samples of uniform pseudo-random ids in ``[0, vocab_size)``.

    Sample ``i`` depends only on ``(seed, i)`` (a counter-based Philox stream keyed by both),
    so any rank, worker or resumed run reads identical tokens for the same index. Items have
    the same dict layout as ``GPTDataset``.
    """

    def __init__(
        self,
        num_samples: int,
        seq_length: int,
        vocab_size: int,
        seed: int,
        eod_token: int | None = None,
        eod_mask_loss: bool = False,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if vocab_size is None or vocab_size < 1:
            raise ValueError(f"mock data needs vocab_size >= 1, got {vocab_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 for mock data, got {seed}")
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        self.eod_token = vocab_size - 1 if eod_token is None else int(eod_token)
        self.eod_mask_loss = bool(eod_mask_loss)

    def __len__(self) -> int:
        return self.num_samples

    def get_text(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens int64 of sample ``idx``."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        rng = np.random.Generator(np.random.Philox(key=[self.seed, int(idx)]))
        return rng.integers(0, self.vocab_size, size=self.seq_length + 1, dtype=np.int64)

    def __getitem__(self, idx: int) -> dict:
        return gpt_sample_from_text(self.get_text(idx), self.eod_token, self.eod_mask_loss)
