"""The Triton embedding backward of ``moecore.kernels.embedding`` against the fp64 reference,
on CPU tensors under the Triton interpreter. Run as ``TRITON_INTERPRET=1 python -m
tests.unit.embedding_checks [name ...]`` (``test_embedding_kernel.py`` does, in a subprocess).
Prints ``PASS name`` or ``FAIL name`` and a traceback per check; exits 1 if any failed.

Grads are multiples of 1/16 in [-8, 8) (exact in bf16 and fp16, and their sums exact in fp32),
so an fp32 grad_weight must equal the reference bit for bit and a 16-bit one must be the exact
sum rounded once (to nearest on GPU; the interpreter's casts may truncate: within one ulp).
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

from tests.triton_interpret import run_checks

MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _dyadic(shape, gen, dtype=torch.float32):
    return (torch.randint(-128, 128, shape, generator=gen) / 16).to(dtype)


def _skewed_ids(shape, num_rows, gen):
    """Zipf-like ids: id k drawn with weight 1 / (k + 1) (long runs for the small ids)."""
    probs = 1.0 / torch.arange(1, num_rows + 1, dtype=torch.float64)
    n = int(torch.Size(shape).numel())
    return torch.multinomial(probs, n, replacement=True, generator=gen).view(shape)


def assert_rounded_once(got: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """``got`` (fp32/bf16/fp16) is ``exact`` (fp64) rounded once: bit for bit for fp32, within
    one ulp of ``exact`` for 16-bit dtypes; zero where ``exact`` is zero."""
    if got.dtype == torch.float32:
        assert torch.equal(got, exact.float()), f"{what}: not bit for bit"
        return
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2.0**-14)))
                     - MANTISSA[got.dtype])
    err = (got.double() - exact).abs()
    bad = (err > ulp) | ((exact == 0) & (got != 0))
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off by more than one ulp"


def _cases(gen):
    """(name, ids, grad, num_rows, tile kwargs): ragged shapes and layouts."""
    heavy = torch.cat([torch.full((5000,), 3), torch.randint(0, 300, (200,), generator=gen)])
    heavy = heavy[torch.randperm(heavy.numel(), generator=gen)]
    sb = torch.randint(0, 50, (33, 4), generator=gen)
    # 16-position tiles: one run per tile, one over two whole tiles, two in one, one from a
    # tile start into the middle of a later one
    edges = torch.arange(6).repeat_interleave(torch.tensor([16, 32, 5, 11, 16, 40])) + 1
    return [
        ("empty", torch.zeros(0, dtype=torch.long), _dyadic((0, 8), gen), 10, {}),
        ("empty 2-D", torch.zeros(2, 0, dtype=torch.long), _dyadic((2, 0, 8), gen), 10, {}),
        ("1-D", torch.randint(0, 5, (7,), generator=gen), _dyadic((7, 8), gen), 5, {}),
        ("[B, S] H=96", torch.randint(0, 50, (4, 33), generator=gen), _dyadic((4, 33, 96), gen),
         50, {}),
        # ids [S, B] with the grad a transposed view of [B, S, H] (as after reduce-scatter)
        ("[S, B] transposed grad", sb, _dyadic((4, 33, 96), gen).transpose(0, 1), 50, {}),
        ("one id 5000 times", heavy, _dyadic((5200, 16), gen), 300, {}),
        ("V >= 2**15 (int32 keys)", torch.randint(0, 40000, (3, 70), generator=gen),
         _dyadic((3, 70, 24), gen), 40000, {}),
        ("H=1", torch.randint(0, 3, (64,), generator=gen), _dyadic((64, 1), gen), 3, {}),
        ("3 leading dims", torch.randint(0, 7, (2, 3, 5), generator=gen),
         _dyadic((2, 3, 5, 16), gen), 7, {}),
        ("strided columns", torch.randint(0, 9, (6, 5), generator=gen),
         _dyadic((6, 5, 80), gen)[..., ::2], 9, {}),
        ("scalar id", torch.tensor(4), _dyadic((12,), gen), 6, {}),
        ("small tiles, runs over many", _skewed_ids((300,), 20, gen), _dyadic((300, 40), gen),
         20, dict(block_n=16, subs=2)),
        ("small tiles, one id, H=130", torch.full((37,), 2), _dyadic((37, 130), gen), 3,
         dict(block_n=16, subs=1)),
        ("runs on tile edges", edges[torch.randperm(edges.numel(), generator=gen)],
         _dyadic((edges.numel(), 24), gen), 8, dict(block_n=16, subs=1)),
    ]


@contextlib.contextmanager
def _nan_empty():
    """``torch.empty`` of a float dtype returns NaNs meanwhile (so rows never written show)."""
    real = torch.empty

    def empty(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def check_kernels(gen):
    """Every case in fp32, bf16 and fp16 against the fp64 ``index_add_`` reference (outputs
    and partial sums allocated as NaNs)."""
    from moecore.kernels import embedding as E

    for name, ids, grad, num_rows, tiles in _cases(gen):
        want = E.embedding_backward_reference(grad.double(), ids, num_rows)
        for dtype in MANTISSA:
            with _nan_empty():
                got = E.embedding_backward_triton(grad.to(dtype), ids, num_rows, **tiles)
            assert got.shape == (num_rows, grad.shape[-1]) and got.dtype == dtype, name
            assert_rounded_once(got, want, f"{name} {dtype}")


def check_determinism(gen):
    """Two runs give the same bits (skewed ids, Gaussian bf16 and fp32 grads), and a transposed
    grad view the bits of its contiguous copy."""
    from moecore.kernels import embedding as E

    ids = _skewed_ids((4, 300), 500, gen)
    for dtype in (torch.bfloat16, torch.float32):
        grad = torch.randn(300, 4, 64, generator=gen).to(dtype).transpose(0, 1)
        runs = [E.embedding_backward_triton(grad, ids, 500) for _ in range(2)]
        runs.append(E.embedding_backward_triton(grad.contiguous(), ids, 500))
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2]), dtype
        exact = E.embedding_backward_reference(grad.double(), ids, 500)
        tol = 1e-6 if dtype == torch.float32 else 8e-3
        err = ((runs[0].double() - exact).norm() / exact.norm()).item()
        assert err < tol, (dtype, err)


def check_autograd(gen):
    """``embedding_triton``: forward bitwise ``F.embedding``; weight grad equal to autograd's
    through ``F.embedding``; no grad asked for the weight."""
    from moecore.kernels import embedding as E

    ids = torch.randint(0, 30, (3, 11), generator=gen)
    for dtype in MANTISSA:
        w = _dyadic((30, 48), gen, dtype)
        probe = _dyadic((3, 11, 48), gen, dtype)
        grads = []
        for fn in (E.embedding_triton, F.embedding):
            wg = w.clone().requires_grad_()
            out = fn(ids, wg)
            out.backward(probe)
            grads.append((out, wg.grad))
        assert torch.equal(grads[0][0], grads[1][0])
        assert_rounded_once(grads[0][1], E.embedding_backward_reference(
            probe.double(), ids, 30), f"autograd {dtype}")
        out = E.embedding_triton(ids, w)  # weight without grad: a plain lookup
        assert not out.requires_grad and torch.equal(out, F.embedding(ids, w))


def _module_grads(emb, ids, probe):
    emb.zero_grad(set_to_none=True)
    out = emb(ids)
    out.backward(probe)
    return out.detach(), emb.weight.grad


def check_vocab_parallel(gen):
    """``VocabParallelEmbedding`` with the ``triton`` backend (CUDA test forced off, so the
    self-check runs here): TP=1, TP=1 reduce-scatter layout (transposed grad) and a TP=4 shard
    (ids outside masked) give the ``torch`` backend's output and weight grad bit for bit (fp32);
    a 2% error in the backward fails the self-check and ``auto`` falls back to torch."""
    import moecore.kernels as K
    from moecore.backends import BackendUnavailableError
    from moecore.config import TransformerConfig
    from moecore.kernels import embedding as E
    from moecore.parallel_state import ParallelSizes, ParallelState, all_rank_groups
    from moecore.tensor_parallel import VocabParallelEmbedding

    K.cuda_triton_available = lambda *a, **kw: (True, "")  # looked up at call time
    sizes = ParallelSizes(world_size=4, tp=4)
    ranks = {k: next(g for g in v if 1 in g) for k, v in all_rank_groups(sizes).items()}
    tp4 = ParallelState(sizes=sizes, rank=1, groups={}, ranks=ranks)  # no communicators
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                            ffn_hidden_size=64, init_method_std=0.3)
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    for ps, rs in ((ParallelState.single(), False), (ParallelState.single(), True), (tp4, False)):
        emb = VocabParallelEmbedding(64, 32, config=cfg, reduce_scatter_embeddings=rs,
                                     parallel_state=ps)
        probe = _dyadic((9, 2, 32) if rs else (2, 9, 32), gen)
        results = []
        for name in ("triton", "torch"):
            emb.backend = name  # the config's embedding_backend
            results.append(_module_grads(emb, ids, probe))
            assert E.select_embedding(emb.weight.device, emb.weight.dtype, name).name == name
        for a, b in zip(*results):
            assert torch.equal(a, b), (ps.tp_size, rs)
    real = E.embedding_backward_triton
    E.embedding_backward_triton = lambda *a, **kw: real(*a, **kw) * 1.02
    K.self_check.cache_clear()
    E.EMBEDDING.clear_cache()
    try:
        assert E.select_embedding(torch.device("cpu"), torch.float32).name == "torch"
        try:
            E.embedding(ids, torch.randn(64, 8), backend="triton")
        except BackendUnavailableError as exc:
            assert "self-check of the Triton embedding kernel failed" in str(exc), exc
        else:
            raise AssertionError("a backward bug passed the self-check")
    finally:
        E.embedding_backward_triton = real
        K.self_check.cache_clear()
        E.EMBEDDING.clear_cache()


CHECKS = {"kernels": check_kernels, "determinism": check_determinism,
          "autograd": check_autograd, "vocab_parallel": check_vocab_parallel}


if __name__ == "__main__":
    sys.exit(run_checks(CHECKS, sys.argv[1:]))
