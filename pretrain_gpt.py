"""Pretrain a GPT (dense or MoE) model with Megatron-LM's flags.

    python pretrain_gpt.py --num-layers 2 --hidden-size 64 ... --mock-data --vocab-size 256
    torchrun --nproc_per_node 4 pretrain_gpt.py --tensor-model-parallel-size 2 ...

``python pretrain_gpt.py --help`` lists the flags by group. User mistakes (flags, checkpoint
directories, tokenizer, data) end with one line ``error: ...`` and exit code 2; other
exceptions are bugs and keep their traceback.
"""

import os
import sys

from moecore.arguments import parse_args
from moecore.arguments.config_flags import ConfigFieldError
from moecore.checkpointing import CheckpointError
from moecore.training import pretrain
from moecore.training.loop import DataRanOut, StartupError

# Exceptions that report a user's mistake (argument errors exit through argparse already).
USER_ERRORS = (CheckpointError, ConfigFieldError, StartupError, DataRanOut)


def report_user_error(e: BaseException) -> None:
    """``error: <first line>`` on stderr: on rank 0, and on other ranks only for an error not
    known to be raised identically everywhere (so a rank's own failure is not lost)."""
    rank = int(os.getenv("RANK", "0"))
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if rank == 0:
        print(f"error: {text}", file=sys.stderr, flush=True)
    elif not getattr(e, "agreed", False):
        print(f"error: [rank {rank}] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    try:
        return pretrain(parse_args(argv))
    except USER_ERRORS as e:
        report_user_error(e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
