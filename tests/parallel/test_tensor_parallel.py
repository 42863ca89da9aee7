"""Tensor parallelism on gloo ranks equals the single-process reference.

One spawn per world size (2 and 4 ranks) runs every check at TP=2 and TP=4 (and TP=2 x DP=2 on
4 ranks, where the TP group is a subgroup): each mapping against its definition, a
Column -> gelu -> Row MLP, VocabParallelEmbedding and vocab_parallel_cross_entropy against the
TP=1 modules built from the same seed (outputs and every gradient, shard by shard, with and
without sequence parallel), RNG streams across ranks, recomputation, and bad sizes.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moecore.collectives import all_reduce_inplace
from moecore.config import TransformerConfig
from moecore.parallel_state import ParallelState, destroy_model_parallel, initialize_model_parallel
from moecore.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_gather_no_grad,
    all_to_all,
    checkpoint,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_rng_tracker,
    model_parallel_seed,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from moecore.tensor_parallel.random import get_device_rng_state, set_device_rng_state
from tests.dist_harness import run_distributed

TOL = 1e-5
S, B, H, FFN, V = 8, 2, 16, 32, 64
SINGLE = ParallelState.single()
# Tests run on CPU/gloo; _worker(..., device="cuda") runs the same checks over NCCL by hand.
_DEVICE = torch.device("cpu")


def _randn(g, *shape):
    """Draw on the CPU from ``g`` (identical on every rank), then move to the test device."""
    return torch.randn(*shape, generator=g).to(_DEVICE)


def _check(name, got, ref, tol=TOL):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.detach().double(), ref.detach().double()
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol}"


def _cfg(tp, sp=False, bias=False):
    return TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=4,
                             ffn_hidden_size=FFN, init_method_std=0.3, add_bias_linear=bias,
                             tensor_model_parallel_size=tp, sequence_parallel=sp)


def _close(name, got, want, atol=1e-5):
    """Absolute check, for results that may be empty (a rank with zero rows)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel():
        err = (got - want).abs().max().item()
        assert err <= atol, f"{name}: max abs error {err:.3e} > {atol}"


def _run(op, x, grad, **kw):
    """``op(x)`` and the gradient of ``(op(x) * grad).sum()`` w.r.t. ``x``."""
    x = x.clone().requires_grad_(True)
    y = op(x, **kw)
    y.backward(grad)
    return y.detach(), x.grad


# ---- mappings -------------------------------------------------------------------------------


def _check_dense_mappings(ps, xs, gs):
    """Even splits. ``xs[j]``/``gs[j]``: rank j's input/upstream grad ``[S, B, H]``."""
    tp, r = ps.tp_size, ps.tp_rank
    last = [t.chunk(tp, -1)[j] for j, t in enumerate(gs)]  # rank j's [.., H/tp] grad
    first = [t.chunk(tp, 0)[j] for j, t in enumerate(gs)]  # rank j's [S/tp, ..] grad
    y, gx = _run(copy_to_tensor_model_parallel_region, xs[r], gs[r])
    _check("copy fwd", y, xs[r], 0)
    _check("copy bwd", gx, sum(gs))
    y, gx = _run(reduce_from_tensor_model_parallel_region, xs[r], gs[r])
    _check("reduce fwd", y, sum(xs))
    _check("reduce bwd", gx, gs[r], 0)
    y, gx = _run(scatter_to_tensor_model_parallel_region, xs[0], last[r])
    _check("scatter-last fwd", y, xs[0].chunk(tp, -1)[r], 0)
    _check("scatter-last bwd", gx, torch.cat(last, -1), 0)
    y, gx = _run(gather_from_tensor_model_parallel_region, xs[r].chunk(tp, -1)[r], gs[r])
    _check("gather-last fwd", y, torch.cat([t.chunk(tp, -1)[j] for j, t in enumerate(xs)], -1), 0)
    _check("gather-last bwd", gx, gs[r].chunk(tp, -1)[r], 0)
    y, gx = _run(scatter_to_sequence_parallel_region, xs[0], first[r])
    _check("scatter-seq fwd", y, xs[0].chunk(tp, 0)[r], 0)
    _check("scatter-seq bwd", gx, torch.cat(first, 0), 0)
    own = [t.chunk(tp, 0)[j] for j, t in enumerate(xs)]
    for reduce in (True, False):
        y, gx = _run(gather_from_sequence_parallel_region, own[r], gs[r],
                     tensor_parallel_output_grad=reduce)
        _check("gather-seq fwd", y, torch.cat(own, 0), 0)
        _check(f"gather-seq bwd reduce={reduce}", gx,
               (sum(gs) if reduce else gs[r]).chunk(tp, 0)[r])
    y, gx = _run(reduce_scatter_to_sequence_parallel_region, xs[r], first[r])
    _check("reduce-scatter fwd", y, sum(xs).chunk(tp, 0)[r])
    _check("reduce-scatter bwd", gx, torch.cat(first, 0), 0)


def _check_variable_mappings(ps, g):
    """Uneven first-dim splits (one rank holds zero rows) and a variable all-to-all."""
    tp, r = ps.tp_size, ps.tp_rank
    sizes = [(3 * j + 2) % 5 for j in range(tp)]  # [2, 0] or [2, 0, 3, 1]
    n = sum(sizes)
    pieces = [_randn(g, s, B, H) for s in sizes]
    fulls = [_randn(g, n, B, H) for _ in range(tp)]
    for reduce in (True, False):
        y, gx = _run(gather_from_sequence_parallel_region, pieces[r], fulls[r],
                     tensor_parallel_output_grad=reduce, output_split_sizes=sizes)
        _check("gather-var fwd", y, torch.cat(pieces, 0), 0)
        want = (sum(fulls) if reduce else fulls[r]).split(sizes, 0)[r]
        _close(f"gather-var bwd reduce={reduce}", gx, want)
    y, gx = _run(reduce_scatter_to_sequence_parallel_region, fulls[r], pieces[r],
                 input_split_sizes=sizes)
    _close("reduce-scatter-var fwd", y, sum(fulls).split(sizes, 0)[r])
    _check("reduce-scatter-var bwd", gx, torch.cat(pieces, 0), 0)

    # all_to_all: rank i sends M[i][j] rows to rank j.
    M = [[(i + 2 * j) % 3 for j in range(tp)] for i in range(tp)]
    xs = [_randn(g, sum(M[i]), H) for i in range(tp)]
    gs = [_randn(g, sum(M[i][j] for i in range(tp)), H) for j in range(tp)]
    recv = [M[i][r] for i in range(tp)]
    y, gx = _run(all_to_all, xs[r], gs[r], output_split_sizes=recv, input_split_sizes=M[r],
                 group=ps.tp_group)
    _check("all_to_all fwd", y, torch.cat([xs[i].split(M[i])[r] for i in range(tp)]), 0)
    back = torch.cat([gs[j].split([M[i][j] for i in range(tp)])[r] for j in range(tp)])
    _check("all_to_all bwd", gx, back, 0)


def _check_mappings(ps):
    g = torch.Generator().manual_seed(11)
    tp, r = ps.tp_size, ps.tp_rank
    xs = [_randn(g, S, B, H) for _ in range(tp)]
    gs = [_randn(g, S, B, H) for _ in range(tp)]
    _check_dense_mappings(ps, xs, gs)
    _check_variable_mappings(ps, g)
    _check("all_reduce_inplace", all_reduce_inplace(xs[r].clone(), ps.tp_group), sum(xs))
    _check("all_reduce_inplace average",
           all_reduce_inplace(xs[r].clone(), ps.tp_group, average=True), sum(xs) / tp)
    _check("all_reduce_inplace max", all_reduce_inplace(xs[r].clone(), ps.tp_group,
                                                        op=dist.ReduceOp.MAX),
           torch.stack(xs).amax(0), 0)
    with pytest.raises(ValueError, match="contiguous"):
        all_reduce_inplace(xs[r].clone().transpose(0, 2), ps.tp_group)
    _check("all_gather_no_grad", all_gather_no_grad(xs[r][:3], ps.tp_group),
           torch.cat([x[:3] for x in xs]), 0)
    mask = xs[r] > 0
    assert torch.equal(all_gather_no_grad(mask, ps.tp_group), torch.cat([x > 0 for x in xs]))
    for op in (copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region):
        _check("group=None is identity", op(xs[r], group=None), xs[r], 0)


# ---- layers against the TP=1 reference -------------------------------------------------------


def _sp_slice(t, ps, sp):
    return t.chunk(ps.tp_size, 0)[ps.tp_rank] if sp else t


def _set_random_biases(pairs, ps, g):
    """Biases start at zero; give them values so the forward checks that they are added."""
    with torch.no_grad():
        for par, ref, dim in pairs:
            ref.copy_(_randn(g, *ref.shape))
            par.copy_(ref if dim is None else ref.chunk(ps.tp_size, dim)[ps.tp_rank])


def _check_mlp(ps, bias, sp, gather=False):
    tp, r = ps.tp_size, ps.tp_rank
    tag = f"mlp tp={tp} bias={bias} sp={sp} gather={gather}"
    torch.manual_seed(21)
    cfg = _cfg(tp, sp, bias)
    fc1 = ColumnParallelLinear(H, FFN, config=cfg, bias=bias, gather_output=gather,
                               parallel_state=ps).to(_DEVICE)
    fc2 = RowParallelLinear(FFN, H, config=cfg, bias=bias, input_is_parallel=not gather,
                            parallel_state=ps).to(_DEVICE)
    torch.manual_seed(21)
    ref_cfg = _cfg(1, False, bias)
    r1 = ColumnParallelLinear(H, FFN, config=ref_cfg, bias=bias, parallel_state=SINGLE).to(_DEVICE)
    r2 = RowParallelLinear(FFN, H, config=ref_cfg, bias=bias, parallel_state=SINGLE).to(_DEVICE)
    _check(f"{tag} fc1 init", fc1.weight, r1.weight.chunk(tp, 0)[r], 0)
    _check(f"{tag} fc2 init", fc2.weight, r2.weight.chunk(tp, 1)[r], 0)
    g = torch.Generator().manual_seed(22)
    if bias:
        assert fc2.bias.sequence_parallel == sp
        _set_random_biases([(fc1.bias, r1.bias, 0), (fc2.bias, r2.bias, None)], ps, g)
    x, gout = _randn(g, S, B, H), _randn(g, S, B, H)

    xl = _sp_slice(x, ps, sp).clone().requires_grad_(True)
    out = fc2(F.gelu(fc1(xl)[0]))[0]
    (out * _sp_slice(gout, ps, sp)).sum().backward()
    xr = x.clone().requires_grad_(True)
    ref = r2(F.gelu(r1(xr)[0]))[0]
    (ref * gout).sum().backward()

    _check(f"{tag} out", out, _sp_slice(ref, ps, sp))
    _check(f"{tag} dx", xl.grad, _sp_slice(xr.grad, ps, sp))
    _check(f"{tag} fc1.weight grad", fc1.weight.grad, r1.weight.grad.chunk(tp, 0)[r])
    _check(f"{tag} fc2.weight grad", fc2.weight.grad, r2.weight.grad.chunk(tp, 1)[r])
    if bias:
        _check(f"{tag} fc1.bias grad", fc1.bias.grad, r1.bias.grad.chunk(tp, 0)[r])
        grad = fc2.bias.grad.clone()
        if getattr(fc2.bias, "sequence_parallel", False):  # what the grad reduction does
            all_reduce_inplace(grad, ps.tp_group)
        _check(f"{tag} fc2.bias grad", grad, r2.bias.grad)


def _check_embedding(ps, sp):
    tp, r = ps.tp_size, ps.tp_rank
    cfg = _cfg(tp, sp)
    torch.manual_seed(31)
    emb = VocabParallelEmbedding(V, H, config=cfg, reduce_scatter_embeddings=sp,
                                 parallel_state=ps).to(_DEVICE)
    torch.manual_seed(31)
    ref = VocabParallelEmbedding(V, H, config=_cfg(1), parallel_state=SINGLE).to(_DEVICE)
    g = torch.Generator().manual_seed(32)
    ids = torch.randint(0, V, (B, S), generator=g)
    ids[0, :tp] = torch.arange(tp) * (V // tp) + 1  # every rank owns some ids
    ids[1, 0] = V - 1
    ids = ids.to(_DEVICE)
    gout = _randn(g, S, B, H)  # [S, B, H] layout of the upstream grad
    out = emb(ids)
    if sp:  # [S/tp, B, H] shard of the transposed output
        out.backward(gout.chunk(tp, 0)[r])
    else:
        out.backward(gout.transpose(0, 1))
    ref_out = ref(ids)
    (ref_out * gout.transpose(0, 1)).sum().backward()
    want = ref_out.transpose(0, 1).chunk(tp, 0)[r] if sp else ref_out
    _check(f"embedding tp={tp} sp={sp} out", out, want)
    _check(f"embedding tp={tp} sp={sp} grad", emb.weight.grad, ref.weight.grad.chunk(tp, 0)[r])


def _check_cross_entropy(ps, label_smoothing):
    tp, r = ps.tp_size, ps.tp_rank
    g = torch.Generator().manual_seed(41)
    logits = 3 * _randn(g, S, B, V)
    target = torch.randint(0, V, (S, B), generator=g).to(_DEVICE)
    w = torch.rand(S, B, generator=g).to(_DEVICE)
    local = logits.chunk(tp, -1)[r].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target, label_smoothing=label_smoothing)
    (loss * w).sum().backward()
    full = logits.clone().requires_grad_(True)
    ref = vocab_parallel_cross_entropy(full, target, label_smoothing=label_smoothing, group=None)
    (ref * w).sum().backward()
    _check(f"ce tp={tp} ls={label_smoothing} loss", loss, ref)
    _check(f"ce tp={tp} ls={label_smoothing} grad", local.grad, full.grad.chunk(tp, -1)[r])


# ---- RNG ------------------------------------------------------------------------------------


def _check_rng(ps):
    world = dist.get_world_size()
    model_parallel_seed(1234)
    ones = torch.ones(1, 256, device=_DEVICE)
    outside = all_gather_no_grad(F.dropout(ones, 0.5), dist.group.WORLD)
    with get_rng_tracker().fork():
        inside = all_gather_no_grad(F.dropout(ones, 0.5), dist.group.WORLD)
    again = all_gather_no_grad(F.dropout(ones, 0.5), dist.group.WORLD)
    tp_of = [j % ps.tp_size for j in range(world)]  # TP is the fastest-varying dimension
    for i in range(world):
        for j in range(world):
            assert torch.equal(outside[i], outside[j]), "default stream differs across ranks"
            same_tp = tp_of[i] == tp_of[j]
            assert torch.equal(inside[i], inside[j]) == same_tp, (
                f"forked masks of ranks {i}, {j} (tp ranks {tp_of[i]}, {tp_of[j]})")
    # The fork left the default stream where it was: the next draw continues it.
    model_parallel_seed(1234)
    F.dropout(ones, 0.5)
    assert torch.equal(again[dist.get_rank()], F.dropout(ones, 0.5)[0])


def _block(x, fc1, fc2):
    h = fc1(x)[0]
    with get_rng_tracker().fork():  # TP-split activations: per-rank masks
        h = F.dropout(F.gelu(h), p=0.4, training=True)
    return F.dropout(fc2(h)[0], p=0.2, training=True)


def _check_checkpoint(ps):
    cfg = _cfg(ps.tp_size)
    torch.manual_seed(51)
    fc1 = ColumnParallelLinear(H, FFN, config=cfg, parallel_state=ps).to(_DEVICE)
    fc2 = RowParallelLinear(FFN, H, config=cfg, parallel_state=ps).to(_DEVICE)
    g = torch.Generator().manual_seed(52)
    x0, gout = _randn(g, S, B, H), _randn(g, S, B, H)
    model_parallel_seed(99)
    default, tracked = get_device_rng_state(), get_rng_tracker().get_states()
    results = []
    for mode in ("plain", "recompute", "distributed"):
        set_device_rng_state(default)
        get_rng_tracker().set_states(tracked)
        fc1.zero_grad(set_to_none=True)
        fc2.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        if mode == "plain":
            out = _block(x, fc1, fc2)
        else:
            out = checkpoint(_block, mode == "distributed", x, fc1, fc2)
        with get_rng_tracker().fork():
            torch.rand(3, device=_DEVICE)  # advance both streams between fwd and bwd
        torch.rand(3, device=_DEVICE)
        out.backward(gout)
        results.append([out.detach(), x.grad, fc1.weight.grad, fc2.weight.grad])
    assert (results[0][0] == 0).any()
    for mode, res in zip(("recompute", "distributed"), results[1:]):
        for name, a, b in zip(("out", "dx", "fc1", "fc2"), res, results[0]):
            assert torch.equal(a, b), f"checkpoint {mode}: {name} differs"


def _check_bad_input(ps):
    tp = ps.tp_size
    cfg = _cfg(tp)
    with pytest.raises(ValueError, match=rf"output_size={4 * tp + 1} is not divisible by the "
                                         rf"tensor parallel size {tp}.*multiple of {tp}"):
        ColumnParallelLinear(H, 4 * tp + 1, config=cfg, parallel_state=ps).to(_DEVICE)
    with pytest.raises(ValueError, match=rf"\(vocab size\)={V + 1} is not divisible .* {tp}"):
        VocabParallelEmbedding(V + 1, H, config=cfg)  # global state by default
    with pytest.raises(ValueError, match="not divisible by the group size"):
        scatter_to_sequence_parallel_region(torch.zeros(tp + 1, 2, device=_DEVICE))


def _worker(rank, world, tp_sizes, device="cpu"):
    global _DEVICE
    if device == "cuda":
        torch.cuda.set_device(rank)
        _DEVICE = torch.device("cuda", rank)
    for tp in tp_sizes:
        ps = initialize_model_parallel(tensor_model_parallel_size=tp)
        try:
            _check_mappings(ps)
            for sp in (False, True):
                for bias in (False, True):
                    _check_mlp(ps, bias, sp)
                _check_embedding(ps, sp)
            _check_mlp(ps, True, False, gather=True)
            for ls in (0.0, 0.1):
                _check_cross_entropy(ps, ls)
            _check_rng(ps)
            _check_checkpoint(ps)
            _check_bad_input(ps)
        finally:
            destroy_model_parallel()
    return tp_sizes


@pytest.mark.parametrize("world,tp_sizes", [(2, (2,)), (4, (4, 2))])
def test_tensor_parallel_matches_single_process(world, tp_sizes):
    assert run_distributed(_worker, world, tp_sizes, timeout=180) == [tp_sizes] * world
