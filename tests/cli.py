"""Command-line helpers shared by the argument tests."""

from __future__ import annotations

import pytest

from moecore.arguments import parse_args

# A small valid CPU command line (mock data) that tests extend with the flags they check.
BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--micro-batch-size 2 --lr 1e-3 --train-iters 10 --mock-data --vocab-size 100 "
        "--device cpu").split()


def parse_error(argv, capsys) -> str:
    """stderr of ``parse_args(argv)``, which must exit with argparse's usage error (2)."""
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err
