"""Global batch size ramp-up (Megatron's ``--rampup-batch-size START INCREMENT SAMPLES``).

The global batch starts at ``START`` samples and grows by ``INCREMENT`` every
``SAMPLES / ((global_batch_size - START) / INCREMENT)`` consumed samples until it reaches
``--global-batch-size``; after ``SAMPLES`` consumed samples it stays there. The size is a function
of the consumed samples only, so a resumed run continues the same ramp. Sample-based training
(``--train-samples``) only, as in Megatron.

The ramp returns sizes; the training loop asks it for each step's global batch size and number
of micro-batches (Megatron-Core's ``num_microbatches_calculator``). Below ``arguments`` (which
validates the flag) and ``training``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchSizeRampup:
    """``start``, ``increment``, ``samples`` as the flag gives them; ``global_batch_size`` the
    final size; ``unit`` = micro-batch size x data-parallel size (every size is a multiple)."""

    start: int
    increment: int
    samples: int
    global_batch_size: int
    unit: int

    def __post_init__(self):
        flag = f"--rampup-batch-size {self.start} {self.increment} {self.samples}"
        if self.start <= 0 or self.increment <= 0 or self.samples < 0:
            raise ValueError(f"{flag}: start and increment must be > 0 and samples >= 0")
        if self.start > self.global_batch_size:
            raise ValueError(f"{flag}: start is larger than --global-batch-size "
                             f"{self.global_batch_size}")
        if (self.global_batch_size - self.start) % self.increment:
            raise ValueError(f"{flag}: --global-batch-size {self.global_batch_size} minus start "
                             f"{self.start} is not a multiple of the increment")
        if self.start % self.unit or self.increment % self.unit:
            raise ValueError(f"{flag}: start and increment must be multiples of --micro-batch-size"
                             f" x data-parallel size = {self.unit}, so every step's batch splits "
                             "into whole micro-batches")

    def sizes(self) -> list[int]:
        """Every global batch size the ramp goes through, smallest first."""
        return list(range(self.start, self.global_batch_size + 1, self.increment))

    def global_batch_size_at(self, consumed_samples: int) -> int:
        """The global batch size of the step that starts after ``consumed_samples``."""
        steps = (self.global_batch_size - self.start) // self.increment
        if consumed_samples > self.samples or steps == 0:
            return self.global_batch_size
        per_increment = self.samples / steps
        size = self.start + self.increment * int(consumed_samples / per_increment)
        return min(size, self.global_batch_size)

    def num_microbatches_at(self, consumed_samples: int) -> int:
        """Micro-batches (per data-parallel rank) of the step that starts after
        ``consumed_samples``."""
        return self.global_batch_size_at(consumed_samples) // self.unit

    def train_iters(self, train_samples: int) -> int:
        """Iterations that ``train_samples`` take (Megatron's ``update_train_iters``): the ramp's
        steps while at most ``samples`` are consumed, then whole full-size batches."""
        iterations = consumed = 0
        while consumed <= self.samples and consumed < train_samples:
            consumed += self.global_batch_size_at(consumed)
            iterations += 1
        return iterations + max(train_samples - consumed, 0) // self.global_batch_size


def rampup_from_args(args) -> BatchSizeRampup | None:
    """The ramp of ``--rampup-batch-size`` (None without the flag), for validated ``args``."""
    if not args.rampup_batch_size:
        return None
    start, increment, samples = (int(v) for v in args.rampup_batch_size)
    return BatchSizeRampup(start, increment, samples, args.final_global_batch_size,
                           args.micro_batch_size * args.data_parallel_size)


@dataclass(frozen=True)
class ConstantBatchSize:
    """The global batch without a ramp: the same sizes at every step."""

    global_batch_size: int
    unit: int

    def global_batch_size_at(self, consumed_samples: int) -> int:
        return self.global_batch_size

    def num_microbatches_at(self, consumed_samples: int) -> int:
        return self.global_batch_size // self.unit


def batch_sizes_from_args(args) -> BatchSizeRampup | ConstantBatchSize:
    """What the training loop asks each step's global batch size and micro-batch count."""
    ramp = rampup_from_args(args)
    if ramp is not None:
        return ramp
    return ConstantBatchSize(args.global_batch_size,
                             args.micro_batch_size * args.data_parallel_size)
