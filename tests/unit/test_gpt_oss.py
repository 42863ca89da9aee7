"""gpt-oss: attention sinks and sliding windows against a hand-written reference, the clamped
SwiGLU variant, expert biases, and the Hugging Face ``GptOssForCausalLM`` converter.

A tiny random ``GptOssForCausalLM`` built with transformers (sliding and full layers, sinks,
biases, YaRN; no downloads) converts to moecore: logits and gradients of parameters of each kind
match transformers' eager forward in fp32; the round trip is byte-identical; MXFP4 expert weights
dequantise as transformers' own MXFP4 code does.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from moecore.config import TransformerConfig
from moecore.convert import Layout, convert
from moecore.convert.hf_gpt_oss import dequantize_mxfp4
from moecore.convert.reshard import fake_parallel_state
from moecore.kernels.attention import core_attention
from moecore.transformer.attention import layer_window
from moecore.transformer.mlp import apply_activation, quick_gelu
from tests.convert_harness import (
    convert_saved,
    ids_and_labels,
    logits_then_backward,
    random_hf_model,
)
from tests.unit.test_convert import (
    assert_same_tensors,
    read_all,
    rel_err,
    write_hf_checkpoint,
)

transformers = pytest.importorskip("transformers")

B, S, V = 2, 8, 96


# ---- layers --------------------------------------------------------------------------------------
def naive_attention(q, k, v, window, sinks):
    """Per query, per head: softmax over visible keys plus the sink logit (loops)."""
    S_, B_, nh, d = q.shape
    rep = nh // k.shape[2]
    out = torch.zeros(S_, B_, nh, v.shape[-1], dtype=torch.float64)
    for b in range(B_):
        for h in range(nh):
            for i in range(S_):
                lo = 0 if window is None else max(0, i - window)
                keys = range(lo, i + 1)
                s = torch.stack([q[i, b, h].double() @ k[j, b, h // rep].double() / math.sqrt(d)
                                 for j in keys])
                z = torch.cat([s, sinks[h].double().view(1)]) if sinks is not None else s
                p = torch.exp(s - z.max()) / torch.exp(z - z.max()).sum()
                out[i, b, h] = sum(p[n] * v[j, b, h // rep].double() for n, j in enumerate(keys))
    return out.reshape(S_, B_, -1)


@pytest.mark.parametrize("window", [None, 2, 0])
@pytest.mark.parametrize("with_sinks", [True, False])
def test_sink_window_attention_matches_loops(window, with_sinks):
    if window is None and not with_sinks:
        pytest.skip("plain causal attention is SDPA (tested elsewhere)")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 2, 4, 8, generator=g)
    k, v = torch.randn(6, 2, 2, 8, generator=g), torch.randn(6, 2, 2, 8, generator=g)
    sinks = torch.randn(4, generator=g) if with_sinks else None
    out = core_attention(q, k, v, window=window, sinks=sinks)
    ref = naive_attention(q, k, v, window, sinks)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_sinks_get_gradients_and_lower_the_attention_mass():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(5, 1, 2, 4, generator=g) for _ in range(3))
    sinks = torch.zeros(2, requires_grad=True)
    out = core_attention(q, k, v, sinks=sinks)
    plain = core_attention(q, k, v)
    assert not torch.allclose(out, plain)  # the sink takes part of every softmax
    out.sum().backward()
    assert sinks.grad is not None and sinks.grad.abs().min() > 0


def test_window_pattern_follows_megatron():
    cfg = TransformerConfig(num_layers=4, hidden_size=16, num_attention_heads=2,
                            window_size=(127, 0), window_attn_skip_freq=2)
    assert [layer_window(cfg, n) for n in range(1, 5)] == [127, None, 127, None]
    cfg = TransformerConfig(num_layers=3, hidden_size=16, num_attention_heads=2,
                            window_size=(5, 0), window_attn_skip_freq=[0, 1, 1])
    assert [layer_window(cfg, n) for n in range(1, 4)] == [None, 5, 5]
    with pytest.raises(ValueError, match="window_size"):
        TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                          window_size=(4, 4))


def test_clamped_quick_geglu_matches_gpt_oss():
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                            activation_func=quick_gelu, glu_linear_offset=1.0,
                            activation_func_clamp_value=7.0)
    h = 6 * torch.randn(5, 2 * 3, generator=torch.Generator().manual_seed(0))
    gate, up = h[:, :3].clamp(max=7.0), h[:, 3:].clamp(-7.0, 7.0)
    ref = (up + 1) * (gate * torch.sigmoid(gate * 1.702))  # HF GptOssExperts._apply_gate
    torch.testing.assert_close(apply_activation(cfg, h), ref, rtol=0, atol=0)


# ---- converter -----------------------------------------------------------------------------------
GPT_OSS = dict(vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
               num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                "original_max_position_embeddings": 16},
               swiglu_limit=7.0, tie_word_embeddings=False, bos_token_id=5, eos_token_id=7)


def hf_model(seed: int = 0):
    """A random fp32 GptOssForCausalLM with weights large enough to route and clamp."""
    return random_hf_model("GptOss", GPT_OSS, seed, scale=0.3, expert_scale=1.5)[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_saved(hf_model(), tmp_path_factory.mktemp("gpt_oss"))


def test_flags_follow_the_config(converted):
    flags = converted["res"].flags
    value = lambda f: flags[flags.index(f) + 1]  # noqa: E731
    assert value("--softmax-type") == "learnable" and "--quick-geglu" in flags
    assert value("--window-size") in ("(3, 0)", "3,0") and value("--window-attn-skip-freq") == "2"
    assert value("--rope-type") == "yarn" and "--no-yarn-correction-range-round-to-int" in flags
    assert "--disable-bias-linear" not in flags and "--moe-grouped-gemm" in flags


def test_logits_and_grads_match_transformers(converted):
    hf, ours = converted["hf"], converted["moecore"]
    ref, logits = logits_then_backward(hf, ours, *ids_and_labels(V, B, S), V)
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert rel_err(logits, ref) < 1e-4
    hp, mp = dict(hf.named_parameters()), dict(ours.named_parameters())
    deint = lambda t: torch.cat([t[..., ::2], t[..., 1::2]], dim=-1)  # noqa: E731
    same = lambda t: t  # noqa: E731
    pairs = [
        ("model.embed_tokens.weight", "embedding.word_embeddings.weight", same, same),
        ("model.layers.0.self_attn.sinks", "decoder.layers.0.self_attention.sinks", same, same),
        ("model.layers.1.self_attn.sinks", "decoder.layers.1.self_attention.sinks", same, same),
        ("model.layers.0.self_attn.o_proj.bias", "decoder.layers.0.self_attention.linear_proj.bias",
         same, same),
        ("model.layers.1.self_attn.k_proj.bias", "decoder.layers.1.self_attention.linear_qkv.bias",
         same, lambda t: t.view(2, 4, 8)[:, 2].reshape(-1)),
        ("model.layers.2.mlp.router.weight", "decoder.layers.2.mlp.router.weight", same, same),
        ("model.layers.2.mlp.router.bias", "decoder.layers.2.mlp.router.bias", same, same),
        ("model.layers.0.mlp.experts.gate_up_proj", "decoder.layers.0.mlp.experts.weight1",
         deint, same),
        ("model.layers.1.mlp.experts.gate_up_proj_bias", "decoder.layers.1.mlp.experts.bias1",
         deint, same),
        ("model.layers.2.mlp.experts.down_proj", "decoder.layers.2.mlp.experts.weight2",
         same, same),
        ("model.layers.2.mlp.experts.down_proj_bias", "decoder.layers.2.mlp.experts.bias2",
         same, same),
        ("model.layers.1.post_attention_layernorm.weight",
         "decoder.layers.1.pre_mlp_layernorm.weight", same, same),
    ]
    for hname, mname, hview, mview in pairs:
        g_ref, g_ = hview(hp[hname].grad), mview(mp[mname].grad)
        assert g_ref.abs().sum() > 0, hname
        assert rel_err(g_, g_ref) < 1e-4, (hname, rel_err(g_, g_ref))


def test_round_trip_is_byte_identical(converted):
    root = converted["root"]
    convert("moecore", "hf", str(root / "m"), str(root / "hf_back"))
    assert_same_tensors(read_all(str(root / "hf_back")), read_all(str(root / "hf")))
    with open(root / "hf_back" / "config.json") as f:
        back = json.load(f)
    assert back["layer_types"] == GPT_OSS["layer_types"] and back["sliding_window"] == 4
    assert back["rope_parameters"] == GPT_OSS["rope_parameters"]


def test_mxfp4_dequantisation_matches_transformers():
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 6, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 135, (3, 6, 2), generator=g, dtype=torch.uint8)
    ref = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    out = dequantize_mxfp4(blocks, scales, torch.float32)
    assert out.shape == (3, 64, 6)
    assert torch.equal(out, ref)


def test_mxfp4_checkpoint_imports_dequantised(tmp_path):
    """A hub-style checkpoint (experts as ``_blocks`` / ``_scales``) converts to moecore and
    exports unquantised with transformers' dequantised values."""
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    kwargs = dict(GPT_OSS, intermediate_size=32)
    cfg = transformers.GptOssConfig(**kwargs).to_dict()
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**kwargs))
    tensors = {k: v.detach().float() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    expected = {}
    for name in [n for n in tensors if n.endswith(("gate_up_proj", "down_proj"))]:
        e, n_in, n_out = tensors.pop(name).shape
        blocks = torch.randint(0, 256, (e, n_out, n_in // 32, 16), generator=g,
                               dtype=torch.uint8)
        scales = torch.randint(122, 130, (e, n_out, n_in // 32), generator=g, dtype=torch.uint8)
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        expected[name] = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert len(expected) == 2 * kwargs["num_hidden_layers"]
    write_hf_checkpoint(str(tmp_path / "hub"), cfg, tensors)
    convert("hf", "moecore", str(tmp_path / "hub"), str(tmp_path / "m"))
    convert("moecore", "hf", str(tmp_path / "m"), str(tmp_path / "back"))
    back = read_all(str(tmp_path / "back"))
    for name, ref in expected.items():
        assert torch.equal(back[name], ref), name
    with open(tmp_path / "back" / "config.json") as f:
        assert "quantization_config" not in json.load(f)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("window", [None, 3])
def test_flex_attention_forward_matches_the_reference_on_cpu(window):
    """The CUDA path's math (block mask, sink through the log-sum-exp), eager on CPU where
    FlexAttention has a forward only; CPU training uses the reference."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from moecore.kernels.attention import SINK_ATTENTION, flex_sink_window_attention

    assert SINK_ATTENTION.resolve("auto", device=torch.device("cpu")).name == "torch"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, 2, n, 8, generator=g) for n in (4, 2, 2))
    sinks = torch.randn(4, generator=g)
    out = flex_sink_window_attention(q, k, v, window=window, sinks=sinks, compiled=False)
    ref = core_attention(q, k, v, window=window, sinks=sinks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,field", [
    ({"attention_bias": False}, "attention_bias"),
    ({"swiglu_alpha": 1.5}, "swiglu_alpha"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"rope_parameters": dict(GPT_OSS["rope_parameters"], beta_fast=16.0)}, "rope_parameters"),
])
def test_refusals_name_the_field(change, field):
    from moecore.convert.hf_gpt_oss import args_from_hf_config

    cfg = transformers.GptOssConfig(**GPT_OSS).to_dict() | change
    with pytest.raises(ValueError, match=f"field {field}="):
        args_from_hf_config(cfg)


def test_expert_biases_refuse_expert_tensor_parallelism():
    from moecore.moe.experts import GroupedMLP

    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                            num_moe_experts=2, moe_ffn_hidden_size=8, add_bias_linear=True)
    experts = GroupedMLP(2, cfg, fake_parallel_state(Layout().sizes(), 0))
    assert experts.bias1.shape == (2, 16) and experts.bias2.shape == (2, 16)
    etp2 = fake_parallel_state(Layout(tp=2, etp=2).sizes(), 0)
    assert etp2.etp_size == 2
    with pytest.raises(ValueError, match="--expert-tensor-parallel-size 1"):
        GroupedMLP(2, cfg, etp2)
