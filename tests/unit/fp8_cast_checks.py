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


def check_cast_and_transpose(gen):
    """``quantize_transposed``: both layouts from one read, against the cast then the transpose;
    grouped row maps (an empty group, groups that do not fill a program), the padded map, a
    strided (column-sliced) bf16 input, sizes past one program, no rows."""
    for dtype in Q.FP8_MAX:
        x = (torch.randn(150, 200, generator=gen) * 20).bfloat16()[:, 30:170]
        scale = torch.tensor(7.5)
        for counts in ([5, 0, 70, 75], [150], [0, 150, 0]):
            rows, _ = Q.group_row_map(torch.tensor(counts), 150, "cpu")
            got = Q.quantize_transposed_triton(x, scale, dtype, rows)
            ref = Q.quantize_transposed(x, scale, dtype, rows)
            _same(got[0], ref[0], f"row-major {dtype} {counts}")
            _same(got[1], ref[1], f"transposed {dtype} {counts}")
        rows = Q.padded_row_map(150, 16, "cpu")
        for a, b in zip(Q.quantize_transposed_triton(x, scale, dtype, rows),
                        Q.quantize_transposed(x, scale, dtype, rows)):
            _same(a, b, f"padded {dtype}")
        empty = torch.zeros(0, 64)
        rows, _ = Q.group_row_map(torch.tensor([0, 0]), 0, "cpu")
        a, b = Q.quantize_transposed_triton(empty, scale, dtype, rows)
        assert a.shape == (0, 64) and b.shape == (64, 32) and not b.data.float().any()


def check_tiles_along_rows(gen):
    """``quantize_tiles_transposed``: grouped row maps at 128 (an empty expert, groups of 1 and
    of more than 128 rows), a width that does not fill a program, a strided bf16 input, a
    margin, an all-zero tile."""
    for dtype in Q.FP8_MAX:
        x = (torch.randn(300, 90, generator=gen) * torch.logspace(-3, 3, 90)).bfloat16()
        x = x[:, 5:75]
        x[:, 7] = 0
        for counts in ([1, 0, 170, 129], [300]):
            rows, ends = Q.group_row_map(torch.tensor(counts), 300, "cpu", Q.BLOCK)
            got = Q.quantize_tiles_transposed_triton(x, rows, dtype, 1)
            _same(got, Q.quantize_tiles_transposed(x, rows, dtype, 1), f"{dtype} {counts}")
            assert got.shape == (70, rows.shape[0]) and int(ends[-1]) <= rows.shape[0]
            assert got.scale_inv.shape == (70, rows.shape[0] // Q.BLOCK)


def check_fused_swiglu_experts(gen):
    """The fused FP8 expert MLP on the Triton kernels (casts writing both layouts, SwiGLU
    recording amaxes) against the two grouped GEMMs around the same SwiGLU on the torch casts:
    bit for bit, forward and backward, bf16, with an empty expert."""
    import moecore.kernels as K
    from moecore.fp8 import Fp8Meta, Fp8Recipe
    from moecore.kernels.swiglu import select_swiglu
    from tests.fp8_experts import assert_same, swiglu_experts_grads

    K.cuda_triton_available = lambda *a, **kw: (True, "")  # the interpreter runs on CPU
    cpu = torch.device("cpu")
    assert select_swiglu(cpu, torch.bfloat16).name == "triton"
    counts = torch.tensor([50, 0, 90, 16])
    x = (torch.randn(156, 64, generator=gen) * 4).bfloat16()
    w1 = (torch.randn(4, 64, 160, generator=gen) * 0.2).bfloat16()
    w2 = (torch.randn(4, 80, 64, generator=gen) * 0.2).bfloat16()
    dy = torch.randn(156, 64, generator=gen).bfloat16()
    probs = torch.rand(156, generator=gen)  # the rows' routing weights
    results = []
    for cast in ("triton", "torch"):
        recipe = Fp8Recipe("hybrid", "tensorwise", gemm_backend="emulated", cast_backend=cast)
        metas = [Fp8Meta(recipe, num_weights=4, grouped=True) for _ in range(2)]
        results.append(swiglu_experts_grads(cast == "triton", x, w1, w2, dy, counts, metas,
                                            probs, swiglu_backend="triton"))
    assert_same(*results)


def check_block_gemm():
    """The Triton blockwise grouped GEMMs' own self-check (empty expert, a group smaller than a
    row tile, hybrid operands) against the emulated reference."""
    from moecore.kernels.fp8_gemm import check_block_kernels

    check_block_kernels(torch.device("cpu"))


def check_blockwise_experts_on_triton(gen):
    """The blockwise FP8 grouped GEMM op (forward, dgrad, wgrad) on the ``triton`` GEMM backend
    against ``emulated``: same operands (the torch casts), so only the summation order
    differs."""
    import moecore.kernels as K
    from moecore.fp8 import Fp8Meta, Fp8Recipe, fp8_grouped_mm

    K.cuda_triton_available = lambda *a, **kw: (True, "")
    import moecore.kernels.fp8_gemm as G

    G._torch_available = lambda *a, **kw: (True, "")  # its probes need CUDA
    counts = torch.tensor([130, 0, 1, 125])
    x = torch.randn(256, 256, generator=gen).bfloat16()
    w = (torch.randn(4, 256, 384, generator=gen) * 0.1).bfloat16()
    dy = torch.randn(256, 384, generator=gen).bfloat16()
    results = []
    for backend in ("triton", "emulated"):
        recipe = Fp8Recipe("hybrid", "blockwise", gemm_backend=backend, cast_backend="torch")
        meta = Fp8Meta(recipe, num_weights=4, grouped=True)
        assert meta.gemm(torch.device("cpu")) is (G.TRITON if backend == "triton" else G.EMULATED)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fp8_grouped_mm(xr, wr, counts, meta)
        out.backward(dy)
        results.append((out, xr.grad, wr.grad))
    for name, a, b in zip(("out", "dx", "dw"), *results):
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        # 4e-3 here: the interpreter truncates fp32 to bf16 (the GPU rounds to nearest); a
        # wrong scale or tile is off by far more
        assert err < 1e-2, f"{name}: relative error {err:.3g}"
    assert results[0][2][1].abs().sum() == 0  # the empty expert


CHECKS = {"self_check": check_self_check, "shapes_and_groups": check_shapes_and_groups,
          "transposes": check_transposes, "cast_and_transpose": check_cast_and_transpose,
          "tiles_along_rows": check_tiles_along_rows,
          "fused_swiglu_experts": check_fused_swiglu_experts, "block_gemm": check_block_gemm,
          "blockwise_experts_on_triton": check_blockwise_experts_on_triton}


if __name__ == "__main__":
    sys.exit(run_checks(CHECKS, sys.argv[1:]))
