"""Selective recompute (``--recompute-modules``): the same loss and gradients as no recompute,
and the memory it claims to free is really gone from what autograd keeps."""

import gc
import weakref
from functools import partial

import pytest
import torch

from moecore.arguments import parse_args
from moecore.arguments.validation import transformer_config_from_args
from moecore.config import TransformerConfig
from moecore.memory import saved_activations
from moecore.models import GPTModel
from moecore.moe.layer import MoELayer
from moecore.parallel_state import ParallelState
from moecore.transformer.layer import TransformerLayer
from moecore.transformer.recompute import discard_until_backward
from tests.cli import BASE, parse_error
from tests.moe_reference import tiny_moe_config

V, S, B = 48, 10, 3


# ---- discard_until_backward ----------------------------------------------------------------


def _chain(x):
    """y = 2x is saved by sin; sin's output feeds the anchor z."""
    y = x * 2
    z = y.sin() * 3
    return y, z


def test_discard_frees_now_and_refills_before_the_anchor_backward():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y, z = _chain(x)
    calls = []

    def recompute(dst):
        calls.append(dst.shape)
        dst.copy_(x.detach() * 2)

    assert discard_until_backward(y, z, recompute)
    assert y.untyped_storage().nbytes() == 0 and not calls
    z.sum().backward(retain_graph=True)
    want = 6 * (2 * x.detach()).cos()
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)
    assert calls == [torch.Size([5, 7])] and torch.equal(y.detach(), 2 * x.detach())
    x.grad = None
    z.sum().backward()  # a retained graph's second backward finds the storage filled
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)
    assert len(calls) == 1


def test_backward_releases_the_refilled_memory_while_the_loss_lives():
    """After backward nothing of the hook keeps the refilled storage: it goes with the saved
    tensors, as without recompute, though the caller still holds the loss (and its graph)."""
    x = torch.randn(5, 7, requires_grad=True)
    y, z = _chain(x)
    discard_until_backward(y, z, lambda dst: dst.copy_(x.detach() * 2))
    storage = weakref.ref(y.untyped_storage())
    del y
    z.sum().backward()
    gc.collect()
    assert z.grad_fn is not None and storage() is None


def test_discard_is_a_no_op_without_a_graph_or_for_a_shared_storage():
    x = torch.randn(4, 6, requires_grad=True)
    with torch.no_grad():
        y, z = _chain(x)
    assert not discard_until_backward(y, z, lambda dst: None)
    y, z = _chain(x)
    half = y[:2]  # does not own its storage: freeing it would free y[2:] too
    assert not discard_until_backward(half, z, lambda dst: None)
    assert y.untyped_storage().nbytes() == y.numel() * y.element_size()


# ---- end to end through the model -----------------------------------------------------------


def _cfg(**kw):
    base = dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=40, vocab_size=V, init_method_std=0.05, num_moe_experts=4,
                moe_router_topk=2, moe_ffn_hidden_size=24, moe_aux_loss_coeff=1e-2,
                moe_z_loss_coeff=1e-3, moe_layer_freq=[1, 0, 1], moe_grouped_gemm=True,
                moe_grouped_gemm_backend="torch", moe_shared_expert_intermediate_size=16,
                normalization="RMSNorm", gated_linear_unit=True,
                activation_func=torch.nn.functional.silu)
    base.update(kw)
    return TransformerConfig(**base)


def _loss_and_grads(cfg):
    torch.manual_seed(3)
    model = GPTModel(cfg, vocab_size=V, max_sequence_length=S)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    loss = model(ids, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("modules, exact", [
    (("moe_act",), True), (("layernorm",), True), (("moe_act", "layernorm"), True),
    ((), True), (("moe",), False), (("core_attn", "mlp", "shared_experts"), False),
    (("layernorm", "moe_act", "moe", "core_attn", "mlp", "shared_experts"), False)])
@pytest.mark.parametrize("variant", [
    {}, {"moe_grouped_gemm": False}, {"apply_residual_connection_post_layernorm": True},
    {"normalization": "LayerNorm", "bias_swiglu_fusion": False}])
def test_recompute_modules_match_no_recompute(modules, exact, variant):
    """moe_act / layernorm recompute the same ops on the same inputs: bit-identical. The
    checkpointing modules re-run whole submodules (equal to rounding)."""
    want_loss, want = _loss_and_grads(_cfg(**variant))
    loss, grads = _loss_and_grads(_cfg(recompute_granularity="selective",
                                       recompute_modules=modules, **variant))
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    assert grads.keys() == want.keys()
    for name, grad in grads.items():
        # a replayed module may sum its input gradient in another order: fp32 rounding
        scale = 0 if exact else 1e-6 * want[name].abs().max().item()
        torch.testing.assert_close(grad, want[name], rtol=0, atol=scale, msg=name)


@pytest.mark.parametrize("gated", [True, False], ids=["swiglu-in-backward", "discard"])
def test_moe_act_frees_the_activation_output(gated):
    """SwiGLU experts recompute the activation inside the SwiGLU backward; other activations
    go through discard_until_backward. Either way the [T*k, F] activation is not kept."""
    T, H, F, E, k = 96, 64, 40, 8, 2
    kept = {}
    for modules in ((), ("moe_act",)):
        cfg = tiny_moe_config(hidden_size=H, moe_ffn_hidden_size=F, num_moe_experts=E,
                              moe_router_topk=k, moe_grouped_gemm_backend="torch",
                              gated_linear_unit=gated, activation_func=torch.nn.functional.silu,
                              recompute_granularity="selective", recompute_modules=modules)
        torch.manual_seed(0)
        layer = MoELayer(cfg, layer_number=1, parallel_state=ParallelState.single())
        x = torch.randn(T // 4, 4, H, requires_grad=True)
        (out, _), saved = saved_activations(partial(layer, x), exclude=layer.parameters())
        out.sum().backward()
        kept[modules] = saved.total_bytes
    assert kept[()] - kept[("moe_act",)] == T * k * F * 4  # the fp32 [T*k, F] activation


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_experts_weight_rows_so_the_combine_keeps_no_expert_outputs(dispatcher):
    """The routing probabilities are applied in the experts' activation: the combine's
    backward needs no [T*k, H] expert outputs, so the only saved [T*k, H] tensor is the experts'
    input (fc1's GEMM operand)."""
    T, H, F, E, k = 96, 64, 40, 8, 2
    cfg = tiny_moe_config(hidden_size=H, moe_ffn_hidden_size=F, num_moe_experts=E,
                          moe_router_topk=k, moe_grouped_gemm_backend="torch",
                          moe_token_dispatcher_type=dispatcher)
    torch.manual_seed(0)
    layer = MoELayer(cfg, layer_number=1, parallel_state=ParallelState.single())
    x = torch.randn(T // 4, 4, H, requires_grad=True)
    (out, _), saved = saved_activations(partial(layer, x), exclude=layer.parameters())
    rows = [shape for shape, _, _ in saved.shapes if shape == (T * k, H)]
    assert len(rows) == 1, saved.shapes
    out.sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0  # the probabilities still get gradients


def test_layernorm_frees_both_norm_outputs():
    T, H = 48, 32
    kept = {}
    for modules in ((), ("layernorm",)):
        cfg = _cfg(hidden_size=H, num_layers=1, moe_layer_freq=[0],
                   recompute_granularity="selective", recompute_modules=modules)
        layer = TransformerLayer(cfg, 1, parallel_state=ParallelState.single())
        x = torch.randn(T // 4, 4, H, requires_grad=True)
        out, saved = saved_activations(partial(layer, x), exclude=layer.parameters())
        out.sum().backward()
        kept[modules] = saved.total_bytes
    assert kept[()] - kept[("layernorm",)] == 2 * T * H * 4


# ---- configuration -------------------------------------------------------------------------


def test_config_defaults_and_errors():
    assert _cfg(recompute_granularity="selective").recomputes("core_attn")
    assert not _cfg(recompute_granularity="selective").recomputes("moe_act")
    assert not _cfg(recompute_granularity="selective", recompute_modules=()).recomputes(
        "core_attn")
    assert _cfg(moe_layer_recompute=True).recomputes("moe")
    assert not _cfg(recompute_granularity="full").recomputes("core_attn")
    with pytest.raises(ValueError, match="'attn' is unknown; choose from core_attn"):
        _cfg(recompute_granularity="selective", recompute_modules=("attn",))
    with pytest.raises(ValueError, match="mla_up_proj.*multi-latent"):
        _cfg(recompute_granularity="selective", recompute_modules=("mla_up_proj",))
    with pytest.raises(ValueError, match="only under recompute_granularity='selective'"):
        _cfg(recompute_modules=("moe_act",))


MOE_ARGS = BASE + ["--num-experts", "4", "--disable-bias-linear"]


def test_flag_reaches_the_config_and_bad_values_fail_at_start_up(capsys):
    selective = MOE_ARGS + ["--recompute-granularity", "selective", "--recompute-modules"]
    cfg = transformer_config_from_args(parse_args(selective + ["moe_act", "layernorm"]))
    assert cfg.recompute_modules == ("moe_act", "layernorm") and cfg.recomputes("layernorm")
    empty = transformer_config_from_args(parse_args(selective))
    assert empty.recompute_modules == () and not empty.recomputes("core_attn")
    assert "--recompute-granularity selective" in parse_error(
        MOE_ARGS + ["--recompute-modules", "moe_act"], capsys)
    assert "multi-latent" in parse_error(
        MOE_ARGS + ["--recompute-activations", "--recompute-modules", "mla_up_proj"], capsys)
