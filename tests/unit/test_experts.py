"""GroupedMLP == SequentialMLP == a per-token reference; layout-independent initialisation;
EP/ETP shards checked with hand-built ParallelStates (the experts do no communication)."""

import math

import pytest
import torch
import torch.nn.functional as F

from moecore.backends import BackendUnavailableError
from moecore.config import TransformerConfig
from moecore.kernels.grouped_gemm import GROUPED_GEMM
from moecore.moe.experts import GroupedMLP, SequentialMLP
from moecore.parallel_state import ParallelSizes, ParallelState, all_rank_groups

BACKENDS = GROUPED_GEMM.available(device=torch.device("cpu"), dtype=torch.float32)
COUNTS = [3, 0, 5, 2]


def _config(gated=True, hidden=13, ffn=7, experts=4, backend="loop", **kw):
    return TransformerConfig(
        num_layers=3, hidden_size=hidden, num_attention_heads=1, num_moe_experts=experts,
        moe_ffn_hidden_size=ffn, gated_linear_unit=gated, init_method_std=0.3,
        activation_func=F.silu if gated else F.gelu, moe_grouped_gemm_backend=backend, **kw)


def fake_state(world: int, rank: int, ep: int = 1, etp: int = 1) -> ParallelState:
    """A ParallelState for one rank of a ``world``-rank layout, without process groups."""
    sizes = ParallelSizes(world_size=world, ep=ep, etp=etp)
    ranks = {kind: next(g for g in groups if rank in g)
             for kind, groups in all_rank_groups(sizes).items()}
    return ParallelState(sizes=sizes, rank=rank, groups={}, ranks=ranks)


def _build(cls, config, ps=None, seed=1234, num_local=None):
    ps = ps or ParallelState.single()
    torch.manual_seed(seed)
    return cls(num_local or config.num_moe_experts // ps.ep_size, config, parallel_state=ps)


def _per_token_reference(x, counts, w1, w2, config):
    """Each row through its expert's MLP, one row at a time, with full [E, H, *] weights."""
    expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    rows = []
    for i in range(x.shape[0]):
        h = x[i] @ w1[expert[i]]
        if config.gated_linear_unit:
            ffn = h.shape[0] // 2
            a = F.silu(h[:ffn]) * h[ffn:]
        else:
            a = F.gelu(h)
        rows.append(a @ w2[expert[i]])
    if not rows:  # keep every input in the graph so the reference has (zero) gradients
        return x.new_zeros(0, w2.shape[2]) + 0 * (x.sum() + w1.sum() + w2.sum())
    return torch.stack(rows)


def _forward_backward(module, x, counts, dy):
    x = x.clone().requires_grad_()
    out, bias = module(x, torch.tensor(counts, dtype=torch.int64))
    assert bias is None
    (out * dy).sum().backward()
    return out.detach(), x.grad


def _seq_weight_grads(seq):
    w1 = torch.stack([e.linear_fc1.weight.grad.t() for e in seq.local_experts])
    w2 = torch.stack([e.linear_fc2.weight.grad.t() for e in seq.local_experts])
    return w1, w2


def _close(a, b, rel=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel():
        assert ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() <= rel


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("counts", [COUNTS, [0, 0, 0, 0], [0, 0, 9, 0]])
def test_grouped_equals_sequential_equals_per_token(backend, gated, counts):
    config = _config(gated=gated, backend=backend)
    grouped = _build(GroupedMLP, config)
    seq = _build(SequentialMLP, config)
    assert grouped.backend.name == backend
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(counts), 13, generator=g)
    dy = torch.randn(sum(counts), 13, generator=g)
    out_g, dx_g = _forward_backward(grouped, x, counts, dy)
    out_s, dx_s = _forward_backward(seq, x, counts, dy)
    w1 = grouped.weight1.detach().clone().requires_grad_()
    w2 = grouped.weight2.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    out_r = _per_token_reference(xr, counts, w1, w2, config)
    (out_r * dy).sum().backward()
    assert out_g.shape == (sum(counts), 13)
    for got in (out_g, out_s):
        _close(got, out_r.detach())
    for got in (dx_g, dx_s):
        _close(got, xr.grad)
    sw1, sw2 = _seq_weight_grads(seq)
    for got, ref in ((grouped.weight1.grad, w1.grad), (grouped.weight2.grad, w2.grad),
                     (sw1, w1.grad), (sw2, w2.grad)):
        _close(got, ref)
    for e, c in enumerate(counts):
        if c == 0:  # experts without tokens still get a (zero) gradient
            assert torch.count_nonzero(grouped.weight1.grad[e]) == 0
            assert torch.count_nonzero(sw1[e]) == 0


@pytest.mark.parametrize("gated", [True, False])
def test_init_draw_order_and_sequential_weights(gated):
    config = _config(gated=gated)
    grouped = _build(GroupedMLP, config, seed=99)
    seq = _build(SequentialMLP, config, seed=99)
    torch.manual_seed(99)
    mult = 2 if gated else 1
    w1 = torch.stack([torch.empty(13, mult * 7).normal_(0, 0.3) for _ in range(4)])
    w2 = torch.stack([torch.empty(7, 13).normal_(0, 0.3 / math.sqrt(2 * 3)) for _ in range(4)])
    assert torch.equal(grouped.weight1.detach(), w1)
    assert torch.equal(grouped.weight2.detach(), w2)
    for i, expert in enumerate(seq.local_experts):
        assert expert.linear_fc1.weight.shape == (mult * 7, 13)
        assert torch.equal(expert.linear_fc1.weight.detach(), w1[i].t())
        assert torch.equal(expert.linear_fc2.weight.detach(), w2[i].t())


def _full_shard(w1, w2, first, num_local, etp, etp_rank, gated):
    """Expected shard of full [E, H, 2F] / [E, F, H] weights."""
    ffn = w2.shape[1]
    f = ffn // etp
    cols = slice(etp_rank * f, (etp_rank + 1) * f)
    w1 = w1[first:first + num_local]
    w1 = torch.cat([w1[..., :ffn][..., cols], w1[..., ffn:][..., cols]], -1) if gated \
        else w1[..., cols]
    return w1, w2[first:first + num_local, cols]


@pytest.mark.parametrize("world,ep,etp", [(2, 2, 1), (2, 1, 2), (4, 2, 2)])
@pytest.mark.parametrize("gated", [True, False])
def test_sharded_experts_match_the_single_rank_model(world, ep, etp, gated):
    """Shards hold slices of the same global weights; the ETP partial outputs sum to the full
    output; weight grads are slices of the full grads; input grads sum over ETP ranks."""
    config = _config(gated=gated, ffn=8)
    counts = [3, 0, 5, 2]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(counts), 13, generator=g)
    dy = torch.randn(sum(counts), 13, generator=g)
    full = _build(GroupedMLP, config)
    out_full, dx_full = _forward_backward(full, x, counts, dy)
    num_local = 4 // ep
    starts = [sum(counts[:i]) for i in range(5)]
    partial = {}
    for rank in range(world):
        ps = fake_state(world, rank, ep=ep, etp=etp)
        first = ps.ep_rank * num_local
        rows = slice(starts[first], starts[first + num_local])
        local_counts = counts[first:first + num_local]
        exp_w1, exp_w2 = _full_shard(full.weight1.detach(), full.weight2.detach(), first,
                                     num_local, etp, ps.etp_rank, gated)
        exp_g1, exp_g2 = _full_shard(full.weight1.grad, full.weight2.grad, first, num_local,
                                     etp, ps.etp_rank, gated)
        for cls in (GroupedMLP, SequentialMLP):
            mod = _build(cls, config, ps)
            out, dx = _forward_backward(mod, x[rows], local_counts, dy[rows])
            if cls is GroupedMLP:
                w1, w2, g1, g2 = mod.weight1, mod.weight2, mod.weight1.grad, mod.weight2.grad
            else:
                w1 = torch.stack([e.linear_fc1.weight.t() for e in mod.local_experts])
                w2 = torch.stack([e.linear_fc2.weight.t() for e in mod.local_experts])
                g1, g2 = _seq_weight_grads(mod)
            assert torch.equal(w1.detach(), exp_w1) and torch.equal(w2.detach(), exp_w2)
            _close(g1, exp_g1)
            _close(g2, exp_g2)
            key = (cls, ps.ep_rank)
            prev = partial.get(key, (0, 0))
            partial[key] = (prev[0] + out, prev[1] + dx)
    for (_cls, ep_rank), (out, dx) in partial.items():
        first = ep_rank * num_local
        rows = slice(starts[first], starts[first + num_local])
        _close(out, out_full[rows])
        _close(dx, dx_full[rows])


def test_empty_input_keeps_weights_in_the_graph():
    config = _config()
    for cls in (GroupedMLP, SequentialMLP):
        mod = _build(cls, config)
        out, _ = mod(torch.zeros(0, 13, requires_grad=True), torch.zeros(4, dtype=torch.int64))
        assert out.shape == (0, 13)
        out.sum().backward()
        for p in mod.parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_param_markers():
    config = _config()
    for cls in (GroupedMLP, SequentialMLP):
        for p in _build(cls, config).parameters():
            assert p.allreduce is False and p.expert_parallel is True
    grouped = _build(GroupedMLP, config)
    assert grouped.weight1.shape == (4, 13, 14) and grouped.weight2.shape == (4, 7, 13)
    assert grouped.weight1.partition_dim == 2 and grouped.weight1.partition_stride == 2
    assert grouped.weight2.partition_dim == 1


def test_params_dtype_is_respected():
    config = _config(hidden=16, ffn=8, params_dtype=torch.float64)
    grouped = _build(GroupedMLP, config, seed=5)
    ref = _build(GroupedMLP, _config(hidden=16, ffn=8), seed=5)
    assert grouped.weight1.dtype == torch.float64
    assert torch.equal(grouped.weight1.detach().float(), ref.weight1.detach())


def test_bad_arguments_raise():
    config = _config()
    with pytest.raises(ValueError, match="num_local_experts=3"):
        GroupedMLP(3, config)
    with pytest.raises(ValueError, match="not divisible by the expert tensor parallel size 2"):
        GroupedMLP(4, config, parallel_state=fake_state(2, 0, etp=2))
    with pytest.raises(ValueError, match="add_bias_linear=False"):
        SequentialMLP(4, _config(add_bias_linear=True))
    grouped, seq = _build(GroupedMLP, config), _build(SequentialMLP, config)
    for mod in (grouped, seq):
        with pytest.raises(ValueError, match=r"expected \[4\]"):
            mod(torch.randn(3, 13), torch.tensor([3, 0, 0]))
    with pytest.raises(ValueError, match="sums to 2 but"):
        seq(torch.randn(3, 13), torch.tensor([2, 0, 0, 0]))
    with pytest.raises(ValueError, match="sums to 2 but"):
        grouped(torch.randn(3, 13), torch.tensor([2, 0, 0, 0]))


@pytest.mark.parametrize("name,hint", [("grouped_gemm", "pip install")])
def test_unavailable_backend_raises_at_construction(name, hint):
    if name in GROUPED_GEMM.available(device=torch.device("cpu"), dtype=torch.float32):
        pytest.skip(f"{name} is available here")
    with pytest.raises(BackendUnavailableError, match=hint):
        GroupedMLP(4, _config(backend=name))


def test_cpu_built_weights_may_run_on_the_cpu_or_the_gpu(monkeypatch):
    # On a GPU host, weights built on the CPU are tried against the GPU first, then the CPU:
    # a backend that can run on either is accepted; one that runs on neither raises.
    from moecore.moe import experts

    monkeypatch.setattr(experts, "default_compute_device", lambda: torch.device("cuda"))
    if "torch" in BACKENDS:
        mod = _build(GroupedMLP, _config(backend="torch"))
        assert mod.backend.name == "torch"
        out, _ = mod(torch.randn(10, 13), torch.tensor(COUNTS))
        assert out.shape == (10, 13)
    if "grouped_gemm" not in BACKENDS:
        with pytest.raises(BackendUnavailableError, match="pip install"):
            GroupedMLP(4, _config(backend="grouped_gemm"))
