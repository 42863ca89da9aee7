"""``OptimizerConfig``: every optimizer and data-parallel gradient setting, typed, built once
from the flags (:meth:`OptimizerConfig.from_args`) and passed to
:func:`~moecore.optimizer.builder.get_megatron_optimizer`. Field names are the flags' ``dest``
(Megatron-Core's ``OptimizerConfig`` / ``DistributedDataParallelConfig`` names); the defaults
are the parser's, which ``tests/unit/test_config_flags.py`` checks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import torch

_MOMENT_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: the main parameter's (fp32)


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float | None = None
    """Peak learning rate (required; the scheduler sets each group's ``lr`` every step)."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay of the matrices; norms and biases get none."""
    start_weight_decay: float | None = None
    """Weight decay at step 0 under ``--weight-decay-incr-style``; None: ``weight_decay``. The
    optimizer starts with it (the scheduler moves it towards ``end_weight_decay``)."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay."""
    adam_eps: float = 1e-8
    """Added to the denominator of the Adam update."""
    clip_grad: float = 1.0
    """Clip the global L2 gradient norm (over all TP/PP/EP shards) to this; 0 disables."""
    decoupled_lr: float | None = None
    """Peak learning rate of the embedding and output-layer weights (their own groups);
    None: ``lr``."""
    decoupled_min_lr: float | None = None
    """Their minimum learning rate; None: the scheduler's ``min_lr``."""
    fp16: bool = False
    """fp16 model: gradients are loss-scaled (the next five fields), main params stay fp32."""
    loss_scale: float | None = None
    """Static fp16 loss scale; None: dynamic scaling."""
    initial_loss_scale: float = 2.0**32
    """Dynamic loss scale at the start."""
    min_loss_scale: float = 1.0
    """Dynamic loss scale floor."""
    loss_scale_window: float = 1000
    """Steps without overflow before the dynamic scale doubles."""
    hysteresis: int = 2
    """Overflows tolerated before the dynamic scale halves."""
    check_for_nan_in_loss_and_grad: bool = True
    """Raise when the gradient norm is NaN/inf (off: the step goes on)."""
    log_num_zeros_in_grad: bool = False
    """Count the zero main-gradient entries every step (``optimizer.num_zeros_in_grad``)."""
    use_precision_aware_optimizer: bool = False
    """Keep Adam's moments in ``exp_avg_dtype`` / ``exp_avg_sq_dtype``."""
    exp_avg_dtype: str = "fp32"
    """First moment's dtype under ``use_precision_aware_optimizer``: ``fp32`` or ``bf16``."""
    exp_avg_sq_dtype: str = "fp32"
    """Second moment's dtype, as ``exp_avg_dtype``."""
    use_distributed_optimizer: bool = False
    """Shard the fp32 main params and Adam moments over data parallel (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Reduce gradient buckets during backward."""
    overlap_param_gather: bool = False
    """All-gather updated params in the background until the next forward needs them
    (distributed optimizer only)."""
    adamw_backend: str = "auto"
    """AdamW implementation (``--adamw-backend``): ``auto``, ``triton`` (one fused pass that
    also writes the bf16 weights), ``torch_fused`` or ``torch``; see moecore.kernels.optim."""
    ddp_bucket_size: int | None = None
    """Elements per gradient bucket; None: one bucket per buffer, or with
    ``overlap_grad_reduce`` max(40M, 1M x data-parallel size)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OptimizerConfig:
        """The config of validated ``pretrain_gpt.py`` args (every field is a flag's dest)."""
        return cls(**{f.name: vars(args)[f.name] for f in fields(cls)})

    @property
    def initial_weight_decay(self) -> float:
        """The weight decay the optimizer starts with."""
        return self.weight_decay if self.start_weight_decay is None else self.start_weight_decay

    @property
    def moment_dtypes(self) -> tuple[torch.dtype | None, torch.dtype | None]:
        """``(exp_avg, exp_avg_sq)`` dtypes; None for the main parameter's (fp32)."""
        if not self.use_precision_aware_optimizer:
            return None, None
        return _MOMENT_DTYPES[self.exp_avg_dtype], _MOMENT_DTYPES[self.exp_avg_sq_dtype]
