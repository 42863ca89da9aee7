"""Single-process MoELayer: gradcheck, token conservation, dispatcher chunk reordering."""

import torch

from moecore.moe.dispatcher.base import chunk_permutation_index
from moecore.moe.layer import MoELayer
from moecore.parallel_state import ParallelState
from tests.moe_reference import tiny_moe_config


def test_chunk_permutation_index_matches_cat_of_chunks():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 9, (1,), generator=g))
        sizes = torch.randint(0, 5, (n,), generator=g)
        order = torch.randperm(n, generator=g)
        x = torch.randn(int(sizes.sum()), 3, generator=g)
        chunks = x.split(sizes.tolist())
        want = torch.cat([chunks[i] for i in order.tolist()]) if n else x
        got = x.index_select(0, chunk_permutation_index(sizes, order))
        assert torch.equal(got, want)


def test_gradcheck_whole_layer_float64():
    for dispatcher in ("alltoall", "allgather"):
        # Aux/z-loss add their gradient on every backward (the hook), which gradcheck repeats.
        cfg = tiny_moe_config(hidden_size=6, num_attention_heads=2, moe_ffn_hidden_size=5,
                              num_moe_experts=4, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None,
                              params_dtype=torch.float64, moe_token_dispatcher_type=dispatcher,
                              moe_shared_expert_intermediate_size=4, moe_shared_expert_gate=True)
        torch.manual_seed(0)
        layer = MoELayer(cfg, layer_number=1, parallel_state=ParallelState.single()).double()
        x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
        # Routing is piecewise constant; gradcheck's small perturbations keep the top-k fixed.
        names = [n for n, _ in layer.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

        def fn(inp, *ps, layer=layer, names=names):
            return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))[0]

        assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


def test_dropless_sends_tokens_times_topk_rows():
    cfg = tiny_moe_config(moe_router_topk=3)
    layer = MoELayer(cfg, parallel_state=ParallelState.single())
    x = torch.randn(5, 3, 16)
    probs, routing_map = layer.router(x)
    x_TH = x.reshape(-1, 16)
    tokens, tokens_per_expert, probs_N, handle = layer.token_dispatcher.dispatch(
        x_TH, probs, routing_map)
    assert tokens.shape[0] == 5 * 3 * 3 == int(tokens_per_expert.sum())
    assert int(routing_map.sum()) == 45
    # each row's probability is its token's for that row's expert
    rows_of = torch.nonzero(routing_map.T)  # (expert, token) in permuted order
    assert torch.equal(probs_N, probs[rows_of[:, 1], rows_of[:, 0]])
    out = layer.token_dispatcher.combine(
        layer.experts(tokens, tokens_per_expert, probs_N)[0], handle)
    assert out.shape == x_TH.shape
    torch.testing.assert_close(out.reshape(x.shape), layer(x)[0])


def test_shared_expert_overlap_needs_shared_experts_and_keeps_numerics():
    import pytest

    with pytest.raises(ValueError, match="moe_shared_expert_intermediate_size"):
        tiny_moe_config(moe_shared_expert_overlap=True)
    outs = []
    for overlap in (False, True):
        cfg = tiny_moe_config(moe_shared_expert_intermediate_size=8,
                              moe_shared_expert_overlap=overlap)
        torch.manual_seed(0)
        layer = MoELayer(cfg, layer_number=1, parallel_state=ParallelState.single())
        x = torch.randn(4, 2, 16, requires_grad=True)
        out, _ = layer(x)
        out.square().sum().backward()
        outs.append((out.detach(), x.grad, [p.grad for p in layer.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2]))


def test_reorder_rows_backward_is_the_inverse_gather():
    from moecore.moe.dispatcher.base import reorder_rows

    g = torch.Generator().manual_seed(3)
    index = torch.randperm(11, generator=g)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(11)
    x = torch.randn(11, 5, generator=g, requires_grad=True)
    grad = torch.randn(11, 5, generator=g)
    reorder_rows(x, index, inverse).backward(grad)
    y = x.detach().clone().requires_grad_(True)
    y.index_select(0, index).backward(grad)
    assert torch.equal(x.grad, y.grad)


def test_apply_probs_on_input_scales_tokens_before_their_expert():
    """--moe-apply-probs-on-input (top-1): out[t] = expert_e(p_t * x_t), unweighted combine;
    gradients reach the router through the scaled input."""
    import pytest

    from moecore.transformer.mlp import apply_activation

    for dispatcher in ("alltoall", "allgather"):
        cfg = tiny_moe_config(moe_router_topk=1, moe_apply_probs_on_input=True,
                              moe_token_dispatcher_type=dispatcher, params_dtype=torch.float64,
                              moe_z_loss_coeff=None, moe_aux_loss_coeff=0.0)
        torch.manual_seed(0)
        layer = MoELayer(cfg, layer_number=1, parallel_state=ParallelState.single())
        x = torch.randn(5, 3, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
        out, _ = layer(x)
        gy = torch.randn_like(out)
        out.backward(gy)
        got = (out.detach(), x.grad, layer.router.weight.grad)
        x.grad, layer.router.weight.grad = None, None

        probs, routing_map = layer.router(x)
        flat = x.reshape(-1, cfg.hidden_size)
        rows = []
        for t in range(flat.shape[0]):
            e = int(routing_map[t].nonzero())
            h = (flat[t] * probs[t, e]) @ layer.experts.weight1[e]
            rows.append(apply_activation(cfg, h) @ layer.experts.weight2[e])
        ref = torch.stack(rows).view_as(out)
        ref.backward(gy)
        torch.testing.assert_close(got[0], ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], x.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[2], layer.router.weight.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="needs moe_router_topk=1"):
        tiny_moe_config(moe_router_topk=2, moe_apply_probs_on_input=True)
