"""The Triton FP8 casts of ``moecore.kernels.fp8_quant`` against the torch reference, bit for bit,
on CPU tensors under the Triton interpreter. Run as ``TRITON_INTERPRET=1 python -m
tests.unit.fp8_cast_checks [name ...]`` (``test_fp8.py`` does, in a subprocess).
"""

from __future__ import annotations

import sys

import torch

from moecore.kernels import fp8_quant as Q
from tests.triton_interpret import run_checks


def _same(a, b, what):
    assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype, what
    diff = (a.data.view(torch.uint8) != b.data.view(torch.uint8)).sum().item()
    assert diff == 0, f"{what}: {diff} FP8 values differ"
    assert torch.equal(a.scale_inv, b.scale_inv), f"{what}: scales differ"


def check_self_check():
    """The backend's own self-check (subnormals, ties, saturation, margins) on CPU tensors."""
    Q._check_triton(torch.device("cpu"))


def check_shapes_and_groups(gen):
    """Per-expert scales, odd sizes, bf16 input, rows that do not fill a program, no rows."""
    for dtype in Q.FP8_MAX:
        w = (torch.randn(3, 5, 7, generator=gen) * 50).bfloat16()
        scale = torch.tensor([0.5, 30.0, 1e4])
        _same(Q.quantize_tensor_triton(w, scale, dtype), Q.quantize_tensor(w, scale, dtype),
              f"per-expert {dtype}")
        x = torch.randn(2, 19, 384, generator=gen) * 3
        x[0, 3, :128] = 0  # an all-zero tile: scale 1
        _same(Q.quantize_tiles_triton(x, dtype), Q.quantize_tiles(x, dtype), f"tiles {dtype}")
        empty = torch.zeros(0, 256)
        assert Q.quantize_tiles_triton(empty, dtype).data.shape == (0, 256)


def check_transposes(gen):
    """Transposes: batched expert weights (tensor and block scales), a row map with padding and
    an empty group, sizes that do not fill a program."""
    for dtype in Q.FP8_MAX:
        w = Q.quantize_tensor(torch.randn(3, 70, 90, generator=gen), torch.tensor([1.0, 2, 3]),
                              dtype)
        _same(Q.transpose_triton(w), Q.transpose(w), f"weights {dtype}")
        b = Q.quantize_blocks(torch.randn(2, 128, 256, generator=gen), dtype)
        _same(Q.transpose_triton(b), Q.transpose(b), f"blocks {dtype}")
        x = Q.quantize_tensor(torch.randn(75, 40, generator=gen), torch.tensor(2.0), dtype)
        rows, _ = Q.group_row_map(torch.tensor([5, 0, 70]), 75, "cpu")
        _same(Q.transpose_triton(x, rows), Q.transpose(x, rows), f"grouped rows {dtype}")
        rows = Q.padded_row_map(75, 16, "cpu")
        _same(Q.transpose_triton(x, rows), Q.transpose(x, rows), f"padded rows {dtype}")


CHECKS = {"self_check": check_self_check, "shapes_and_groups": check_shapes_and_groups,
          "transposes": check_transposes}


if __name__ == "__main__":
    sys.exit(run_checks(CHECKS, sys.argv[1:]))
