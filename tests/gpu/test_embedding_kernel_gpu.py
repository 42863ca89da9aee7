"""Triton embedding backward on CUDA: against fp64 and torch's own backward at the training size
(bf16, 32768 tokens x 1024 into 32128 rows; outputs poisoned first), bit for bit on sums that
are exact, deterministic, CUDA-graph capturable, and ``VocabParallelEmbedding`` (TP=1) through
the ``triton`` backend that ``auto`` picks."""

import pytest
import torch
import torch.nn.functional as F

from moecore.kernels import HAVE_TRITON
from moecore.kernels import embedding as E

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON),
                                reason="needs CUDA and Triton")
DEV = torch.device("cuda")
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _ids(shape, num_rows, dist, gen):
    if dist == "uniform" or 0 in shape:
        return torch.randint(0, num_rows, shape, device=DEV, generator=gen)
    probs = 1.0 / torch.arange(1, num_rows + 1, device=DEV, dtype=torch.float64)  # Zipf-like
    n = torch.Size(shape).numel()
    return torch.multinomial(probs, n, replacement=True, generator=gen).view(shape)


def _poison():
    torch.full((64 << 20,), float("nan"), device=DEV)  # recycled NaN memory


def _fp64(grad, ids, num_rows):
    """Exact sums, sums of |grad| and id counts per row, [V, H] / [V]."""
    g = grad.reshape(-1, grad.shape[-1]).double()
    flat = ids.reshape(-1)
    exact = torch.zeros(num_rows, g.shape[1], dtype=torch.float64, device=DEV)
    abs_sum = torch.zeros_like(exact)
    exact.index_add_(0, flat, g)
    abs_sum.index_add_(0, flat, g.abs())
    return exact, abs_sum, torch.bincount(flat, minlength=num_rows)


def _assert_one_rounding(got, grad, ids, num_rows):
    """Per element: the exact sum with fp32 accumulation error (any order, truncating adds)
    and one rounding to got's dtype; rows without ids exactly zero."""
    exact, abs_sum, count = _fp64(grad, ids, num_rows)
    bound = (2.0 ** -MANTISSA[got.dtype] * exact.abs()
             + count[:, None].double() * 2.0 ** -22 * abs_sum)
    err = (got.double() - exact).abs()
    assert not (err > bound).any(), f"{int((err > bound).sum())} elements out of bound"
    assert not got[count == 0].any()
    return exact


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("tokens", [(8, 4096), (16, 4096)])
@pytest.mark.parametrize("dist", ["uniform", "zipf"])
def test_training_size_bf16_against_torch_and_fp64(tokens, dist):
    gen = torch.Generator(device=DEV).manual_seed(tokens[0])
    num_rows, h = 32128, 1024
    ids = _ids(tokens, num_rows, dist, gen)
    grad = torch.randn(*tokens, h, device=DEV, generator=gen).bfloat16()
    _poison()
    got = E.embedding_backward_triton(grad, ids, num_rows)
    torch_grad = torch.ops.aten.embedding_dense_backward(grad, ids, num_rows, -1, False)
    exact = _assert_one_rounding(got, grad, ids, num_rows)
    # no worse than torch's backward against fp64 (x1.5 slack), and close to it
    assert _rel(got, exact) <= 1.5 * _rel(torch_grad, exact) + 1e-7
    assert _rel(got, torch_grad) < 1e-2
    assert torch.equal(got, E.embedding_backward_triton(grad, ids, num_rows))  # deterministic


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["[S, B] transposed grad", "H=96", "one id 5000 times",
                                  "int32 keys", "empty"])
def test_ragged_cases_exact_sums(case, dtype):
    """Grads in 1/16 steps: every fp32 sum exact, so the result is the exact sum rounded once
    (to nearest): bit for bit."""
    gen = torch.Generator(device=DEV).manual_seed(1)
    num_rows, h, shape = 1000, 256, (4, 700)
    if case == "H=96":
        h = 96
    elif case == "int32 keys":
        num_rows = 50000
    elif case == "empty":
        shape = (0, 7)
    ids = _ids(shape, num_rows, "zipf", gen)
    if case == "one id 5000 times":
        ids = torch.cat([ids.flatten(), torch.full((5000,), 17, device=DEV)])
        ids = ids[torch.randperm(ids.numel(), device=DEV, generator=gen)]
    grad = (torch.randint(-128, 128, (*ids.shape, h), device=DEV, generator=gen) / 16).to(dtype)
    if case.startswith("[S, B]"):
        ids = ids.t()
        grad = grad.transpose(0, 1)
    _poison()
    got = E.embedding_backward_triton(grad, ids, num_rows)
    exact = _fp64(grad, ids, num_rows)[0]
    assert got.dtype == dtype and torch.equal(got, exact.float().to(dtype))


def test_cuda_graph_capture_and_replay():
    gen = torch.Generator(device=DEV).manual_seed(2)
    ids = _ids((4, 2048), 32128, "zipf", gen)
    grad = torch.randn(4, 2048, 1024, device=DEV, generator=gen).bfloat16()
    want = E.embedding_backward_triton(grad, ids, 32128)  # compiles the kernels outside
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        E.embedding_backward_triton(grad, ids, 32128)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails on any host sync
        out = E.embedding_backward_triton(grad, ids, 32128)
    new_ids = _ids((4, 2048), 32128, "uniform", gen)
    ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, E.embedding_backward_triton(grad, new_ids, 32128))
    assert not torch.equal(out, want)


@pytest.mark.parametrize("reduce_scatter", [False, True])
def test_vocab_parallel_embedding_tp1_auto_picks_triton(reduce_scatter):
    from moecore.config import TransformerConfig
    from moecore.parallel_state import ParallelState
    from moecore.tensor_parallel import VocabParallelEmbedding

    cfg = TransformerConfig(num_layers=1, hidden_size=1024, num_attention_heads=8,
                            ffn_hidden_size=2048, bf16=True, params_dtype=torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(DEV):
        emb = VocabParallelEmbedding(32128, 1024, config=cfg, parallel_state=ParallelState.single(),
                                     reduce_scatter_embeddings=reduce_scatter)
    gen = torch.Generator(device=DEV).manual_seed(3)
    ids = _ids((4, 2048), 32128, "zipf", gen)
    probe = torch.randn(2048, 4, 1024, device=DEV, generator=gen).bfloat16()
    if not reduce_scatter:
        probe = probe.transpose(0, 1).contiguous()
    results = []
    for name in ("auto", "torch"):
        emb.backend = name  # the config's embedding_backend
        emb.zero_grad(set_to_none=True)
        out = emb(ids)
        out.backward(probe)
        results.append((out.detach(), emb.weight.grad))
        picked = E.select_embedding(DEV, torch.bfloat16, name).name
        assert picked == ("triton" if name == "auto" else "torch")
    assert torch.equal(results[0][0], results[1][0])
    _assert_one_rounding(results[0][1], probe.transpose(0, 1) if reduce_scatter else probe, ids,
                         32128)
    assert results[0][1].shape == emb.weight.shape and results[0][1].dtype == torch.bfloat16
    assert _rel(results[0][1], results[1][1]) < 1e-2
    assert torch.equal(results[0][0], F.embedding(ids, emb.weight.detach()).transpose(0, 1)
                       if reduce_scatter else F.embedding(ids, emb.weight.detach()))
