"""Log lines in Megatron-LM's format, plus TensorBoard and Weights & Biases writers.

Training line (one per ``--log-interval``, averages over the interval)::

     [2025-01-01 12:00:00] iteration       10/     100 | consumed samples:          640 |
     elapsed time per iteration (ms): 51.2 | learning rate: 3.000000E-04 | global batch size:
     64 | lm loss: 2.345678E+00 | load_balancing_loss: 1.010000E+00 | grad norm: 0.812 |
     tokens per sec: 80000.0 | MFU: 41.20% | number of skipped iterations:   0 |
     number of nan iterations:   0 |

(one line in the log). Validation: ``validation loss at iteration N | lm loss value: ... |
lm loss PPL: ... |`` framed by dashes.
"""

from __future__ import annotations

import math
import sys
from datetime import datetime

import torch.distributed as dist

from moecore.checkpointing import args_to_dict


def is_rank_0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank_0(msg: str) -> None:
    if is_rank_0():
        print(msg, flush=True)


def format_train_line(iteration: int, train_iters: int, consumed_samples: int,
                      elapsed_ms: float, lr: float, global_batch_size: int,
                      losses: dict[str, float], grad_norm: float | None,
                      tokens_per_sec: float, mfu: float | None, loss_scale: float | None = None,
                      params_norm: float | None = None, skipped: int = 0, nan: int = 0,
                      num_zeros: float | None = None) -> str:
    """One training log line; ``losses`` are printed in order (``lm loss`` first)."""
    s = f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}]"
    s += f" iteration {iteration:8d}/{train_iters:8d} |"
    s += f" consumed samples: {consumed_samples:12d} |"
    s += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    s += f" learning rate: {lr:.6E} |"
    s += f" global batch size: {global_batch_size:5d} |"
    for name, value in losses.items():
        s += f" {name}: {value:.6E} |"
    if loss_scale is not None:
        s += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        s += f" grad norm: {grad_norm:.3f} |"
    if num_zeros is not None:
        s += f" num zeros: {num_zeros:.1f} |"
    if params_norm is not None:
        s += f" params norm: {params_norm:.3f} |"
    s += f" tokens per sec: {tokens_per_sec:.1f} |"
    s += " MFU: n/a |" if mfu is None else f" MFU: {100.0 * mfu:.2f}% |"
    s += f" number of skipped iterations: {skipped:3d} |"
    s += f" number of nan iterations: {nan:3d} |"
    return s


def format_validation_lines(prefix: str, losses: dict[str, float]) -> str:
    """Megatron's validation block: the line framed above and below by dashes."""
    s = f" validation loss at {prefix} | "
    for name, value in losses.items():
        s += f"{name} value: {value:.6E} | "
        s += f"{name} PPL: {math.exp(min(20.0, value)):.6E} | "
    bar = "-" * (len(s) + 1)
    return f"{bar}\n{s}\n{bar}"


class MetricWriters:
    """TensorBoard (``--tensorboard-dir``) and wandb (``--wandb-project``) on rank 0 only."""

    def __init__(self, args):
        self.tb = None
        self.wandb = None
        if not is_rank_0():
            return
        if args.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                # As Megatron: a missing optional logger must not stop a run that is set up.
                print(f"WARNING: --tensorboard-dir {args.tensorboard_dir} is set but tensorboard "
                      "is not installed (pip install tensorboard); not logging to TensorBoard",
                      file=sys.stderr, flush=True)
            else:
                self.tb = SummaryWriter(log_dir=args.tensorboard_dir,
                                        max_queue=args.tensorboard_queue_size)
        if args.wandb_project:
            try:
                import wandb
            except ImportError:
                print("WARNING: --wandb-project is set but wandb is not installed "
                      "(pip install wandb); not logging to wandb", file=sys.stderr, flush=True)
                return
            save_dir = args.wandb_save_dir or (args.save or ".")
            wandb.init(project=args.wandb_project, name=args.wandb_exp_name or None,
                       entity=args.wandb_entity or None, dir=save_dir, config=args_to_dict(args))
            self.wandb = wandb

    @property
    def active(self) -> bool:
        """Whether any writer records scalars (on this rank)."""
        return self.tb is not None or self.wandb is not None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(dict(values), step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
