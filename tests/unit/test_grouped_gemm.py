"""Grouped-GEMM backends against the per-expert loop, and the generic backend registry."""

import logging

import pytest
import torch

from moecore import backends
from moecore.backends import Backend, BackendRegistry, BackendUnavailableError
from moecore.kernels import grouped_gemm as gg
from moecore.kernels.grouped_gemm import GROUPED_GEMM, grouped_mm, select_backend

CPU = torch.device("cpu")
AVAILABLE = GROUPED_GEMM.available(device=CPU, dtype=torch.float32)
FAST = [b for b in AVAILABLE if b != "loop"]

# (counts per expert, K, M): empty experts, odd sizes, N = 0, one expert, all rows in one expert.
SHAPES = [
    ([3, 0, 5, 2], 13, 7),
    ([0, 0, 0], 16, 8),
    ([0, 6, 0, 0, 1], 5, 3),
    ([7], 9, 11),
    ([1, 2, 3, 4, 5, 6, 7, 8], 32, 24),
    ([0, 0, 9], 8, 1),
]


def _loop_reference(x, w, counts):
    """Independent of the library: explicit per-row product."""
    expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return torch.stack([x[i] @ w[expert[i]] for i in range(x.shape[0])]) if x.shape[0] else \
        x.new_zeros(0, w.shape[2])


def _run(backend, x, w, tpe, dy):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = grouped_mm(x, w, tpe, backend=backend)
    (y * dy).sum().backward()
    return y.detach(), x.grad, w.grad


def _assert_close(a, b, rel=1e-5):
    assert a.shape == b.shape
    if a.numel():
        scale = b.abs().max().clamp(min=1e-6)
        assert ((a - b).abs().max() / scale).item() <= rel


def test_cpu_backends_are_what_we_expect():
    # torch._grouped_mm has a CPU fallback in this PyTorch; it must be exercised here.
    assert {"bmm", "loop"} <= set(AVAILABLE)
    assert "te" not in AVAILABLE


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("counts,k,m", SHAPES)
def test_backend_matches_loop_forward_and_grads(backend, counts, k, m):
    g = torch.Generator().manual_seed(sum(counts) * 31 + k * 7 + m)
    n, e = sum(counts), len(counts)
    x = torch.randn(n, k, generator=g)
    w = torch.randn(e, k, m, generator=g)
    dy = torch.randn(n, m, generator=g)
    tpe = torch.tensor(counts, dtype=torch.int64)
    y, dx, dw = _run(backend, x, w, tpe, dy)
    y_ref, dx_ref, dw_ref = _run("loop", x, w, tpe, dy)
    _assert_close(y, _loop_reference(x, w, counts))
    _assert_close(y, y_ref)
    _assert_close(dx, dx_ref)
    _assert_close(dw, dw_ref)
    for i, c in enumerate(counts):  # empty experts get exactly zero gradient
        if c == 0:
            assert torch.count_nonzero(dw[i]) == 0


@pytest.mark.parametrize("backend", FAST)
def test_backend_accepts_device_side_counts_and_sum_loss(backend):
    # y.sum() gives a stride-0 gradient, which torch's built-in _grouped_mm backward rejects.
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(3, 4, 4, requires_grad=True)
    tpe = torch.tensor([2, 0, 4])
    grouped_mm(x, w, tpe, backend=backend).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    grouped_mm(x2, w2, tpe, backend="loop").sum().backward()
    _assert_close(x.grad, x2.grad)
    _assert_close(w.grad, w2.grad)


@pytest.mark.skipif("torch" not in GROUPED_GEMM.available(device=CPU, dtype=torch.bfloat16),
                    reason="torch._grouped_mm has no CPU bf16 path in this PyTorch")
def test_torch_backend_pads_unaligned_bf16():
    # bf16 needs K and M to be multiples of 8 elements; the backend pads 13 -> 16, 7 -> 8.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 13, generator=g).bfloat16()
    w = torch.randn(4, 13, 7, generator=g).bfloat16()
    tpe = torch.tensor([3, 0, 5, 2])
    dy = torch.randn(10, 7, generator=g).bfloat16()
    y, dx, dw = _run("torch", x, w, tpe, dy)
    y_ref, dx_ref, dw_ref = _run("loop", x.float(), w.float(), tpe, dy.float())
    _assert_close(y.float(), y_ref, rel=1e-2)
    _assert_close(dx.float(), dx_ref, rel=1e-2)
    _assert_close(dw.float(), dw_ref, rel=1e-2)


def test_auto_on_cpu_is_bmm_and_torch_only_on_sm90_bf16():
    assert select_backend("auto", CPU, torch.float32, log=False).name == "bmm"
    assert select_backend("auto", CPU, torch.bfloat16, log=False).name == "bmm"
    assert not gg._torch_auto_ok(device=CPU, dtype=torch.bfloat16)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown grouped_gemm backend 'cutlass'"):
        select_backend("cutlass", CPU, torch.float32)


def test_te_is_not_offered():
    # Transformer Engine's grouped GEMM was never wired: a choice that cannot run is not offered.
    assert "te" not in GROUPED_GEMM.names()
    with pytest.raises(ValueError, match="unknown grouped_gemm backend 'te'"):
        select_backend("te", CPU, torch.bfloat16)


def test_every_unavailable_backend_raises_with_install_hint(monkeypatch):
    # Make torch's op look missing too, so each backend's "missing" message is exercised.
    monkeypatch.delattr(torch, "_grouped_mm")
    gg._probe_torch_grouped_mm.cache_clear()
    hints = {"torch": "PyTorch >= 2.8", "grouped_gemm": "pip install"}
    for name, hint in hints.items():
        if GROUPED_GEMM.get(name).is_available(device=CPU, dtype=torch.bfloat16)[0]:
            continue  # installed here (grouped_gemm on a CUDA box): nothing to check
        with pytest.raises(BackendUnavailableError) as info:
            select_backend(name, CPU, torch.bfloat16)
        assert hint in str(info.value), str(info.value)
        assert isinstance(info.value, ValueError) and isinstance(info.value, ImportError)


def test_torch_backend_on_cuda_needs_bf16():
    ok, reason = gg._torch_available(device=torch.device("cuda"), dtype=torch.float32)
    assert not ok
    assert ("bf16" in reason) or ("CUDA is not available" in reason)


def test_bad_inputs_raise():
    x, w = torch.randn(5, 4), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="sums to 4 but x has 5 rows"):
        grouped_mm(x, w, torch.tensor([1, 3]), backend="loop")
    with pytest.raises(ValueError, match="shapes disagree"):
        grouped_mm(x, torch.randn(2, 5, 3), torch.tensor([2, 3]), backend="loop")
    with pytest.raises(ValueError, match="shapes disagree"):
        grouped_mm(x, w, torch.tensor([2, 2, 1]), backend="loop")
    with pytest.raises(ValueError, match="cast one"):
        grouped_mm(x, w.double(), torch.tensor([2, 3]), backend="loop")


# ---- the generic registry -------------------------------------------------------------------
def _registry():
    reg = BackendRegistry("toy_op")
    reg.register(Backend("fast", lambda fast_ok=False, **_: (fast_ok, "needs fast_ok=True; "
                                                                       "pip install fastlib"),
                         lambda: "fast"))
    reg.register(Backend("picky", lambda **_: (True, ""), lambda: "picky",
                         auto_ok=lambda picky_ok=False, **_: picky_ok))
    reg.register(Backend("slow", lambda **_: (True, ""), lambda: "slow"))
    return reg


def test_registry_auto_explicit_and_errors():
    reg = _registry()
    assert reg.select("auto", log=False).name == "slow"
    assert reg.select("auto", log=False, fast_ok=True).name == "fast"
    assert reg.select("auto", log=False, picky_ok=True).name == "picky"
    assert reg.select("auto", auto_order=["slow", "fast"], log=False, fast_ok=True).name == "slow"
    assert reg.select("picky", log=False).fn() == "picky"  # explicit ignores auto_ok
    with pytest.raises(BackendUnavailableError, match="pip install fastlib"):
        reg.select("fast")
    with pytest.raises(ValueError, match="unknown toy_op backend"):
        reg.select("nope")
    with pytest.raises(ValueError, match="reserved or taken"):
        reg.register(Backend("slow", lambda **_: (True, ""), lambda: None))
    none = BackendRegistry("empty_op")
    none.register(Backend("never", lambda **_: (False, "never runs"), lambda: None))
    with pytest.raises(BackendUnavailableError, match="never: never runs"):
        none.select("auto")


def test_choice_is_logged_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_LOGGED", {})
    reg = _registry()
    with caplog.at_level(logging.INFO, logger="moecore"):
        for _ in range(3):
            reg.select("auto")
        reg.select("fast", fast_ok=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "moecore"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("toy_op backend: slow")
    assert lines[1].startswith("toy_op backend: fast")
