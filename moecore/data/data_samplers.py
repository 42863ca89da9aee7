"""Megatron's pretraining sampler: sequential, resumable, sliced across data-parallel ranks."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class MegatronPretrainingSampler:
    """Yields this rank's micro-batch of sample indices from every global micro-batch.

    Samples are read in order ``consumed_samples, consumed_samples + 1, ...``; each run of
    ``micro_batch_size * dp_size`` indices is one global micro-batch, of which DP rank ``r``
    takes ``[r * micro_batch_size, (r + 1) * micro_batch_size)``. Resuming with the saved
    ``consumed_samples`` therefore continues at exactly the next unread sample. An incomplete
    final global micro-batch is dropped unless ``drop_last`` is False.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"no sample to consume: total_samples={total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be in [0, {total_samples}) "
                f"(the dataset has {total_samples} samples); the run already read all of "
                "them, so build the dataset with more samples (train_iters * global batch)"
            )
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        if data_parallel_size <= 0:
            raise ValueError(f"data_parallel_size must be > 0, got {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank={data_parallel_rank} must be in [0, {data_parallel_size})"
            )
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.global_micro_batch = self.micro_batch_size * int(data_parallel_size)
        self.drop_last = drop_last

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.global_micro_batch)
        start = self.data_parallel_rank * self.micro_batch_size
        return full + (1 if rest > start and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        end = start + self.micro_batch_size
        for first in range(self.consumed_samples, self.total_samples, self.global_micro_batch):
            batch = list(range(first, min(first + self.global_micro_batch, self.total_samples)))
            if len(batch) == self.global_micro_batch:
                yield batch[start:end]
            elif not self.drop_last and batch[start:end]:
                yield batch[start:end]


def build_data_loader(
    dataset: torch.utils.data.Dataset | None,
    micro_batch_size: int,
    consumed_samples: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
    drop_last: bool = True,
) -> torch.utils.data.DataLoader | None:
    """DataLoader over ``dataset`` with ``MegatronPretrainingSampler``; None for no/empty data.

    Batches are dicts of stacked item tensors, e.g. ``tokens`` int64 [micro_batch_size, S].
    The loader is finite (one pass from ``consumed_samples``): build datasets with enough
    samples for the run, as Megatron does.
    """
    if dataset is None or len(dataset) == 0:
        return None
    sampler = MegatronPretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size, drop_last
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
