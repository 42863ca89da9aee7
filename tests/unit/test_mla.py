"""Multi-Latent Attention against Hugging Face's DeepseekV3Attention (fp32), YaRN, the
``mla_up_proj`` recompute, the config/flag errors, and a GPTModel with MLA training on CPU."""

import pytest
import torch

from moecore.arguments import parse_args
from moecore.arguments.validation import transformer_config_from_args
from moecore.config import TransformerConfig
from moecore.convert.reshard import rule_for
from moecore.models import GPTModel
from moecore.parallel_state import ParallelState
from moecore.tensor_parallel import model_parallel_seed
from moecore.training.mfu import flops_per_token, matmul_params
from moecore.transformer.layer import TransformerLayer
from moecore.transformer.mla import MultiLatentAttention
from moecore.transformer.rope import RotaryEmbedding, YarnRotaryEmbedding, build_rotary_embedding
from tests.cli import BASE, parse_error

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf  # noqa: E402

H, NH, DN, DR, DV, RKV, RQ, S, B = 32, 4, 8, 8, 6, 10, 12, 11, 2
YARN = dict(factor=4.0, original_max_position_embeddings=4, mscale=1.0, mscale_all_dim=0.8,
            beta_fast=32.0, beta_slow=1.0)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def mla_config(q_lora: bool = True, yarn: bool = False, **kw) -> TransformerConfig:
    base = dict(num_layers=1, hidden_size=H, num_attention_heads=NH, ffn_hidden_size=48,
                multi_latent_attention=True, q_lora_rank=RQ if q_lora else None,
                kv_lora_rank=RKV, qk_head_dim=DN, qk_pos_emb_head_dim=DR, v_head_dim=DV,
                qk_layernorm=True, layernorm_epsilon=1e-6, init_method_std=0.1)
    if yarn:
        base.update(rope_type="yarn", rotary_scaling_factor=YARN["factor"],
                    original_max_position_embeddings=YARN["original_max_position_embeddings"],
                    mscale=YARN["mscale"], mscale_all_dim=YARN["mscale_all_dim"])
    else:
        base.update(rope_type="rope")
    base.update(kw)
    return TransformerConfig(**base)


def _hf_attention(q_lora: bool, yarn: bool):
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, **YARN}
    cfg = hf.DeepseekV3Config(
        hidden_size=H, num_attention_heads=NH, num_key_value_heads=NH,
        q_lora_rank=RQ if q_lora else None, kv_lora_rank=RKV, qk_nope_head_dim=DN,
        qk_rope_head_dim=DR, v_head_dim=DV, max_position_embeddings=64, rope_parameters=rope,
        attention_bias=False, rope_interleave=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(1)
    attn = hf.DeepseekV3Attention(cfg, layer_idx=0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return attn, hf.DeepseekV3RotaryEmbedding(cfg)


_NAMES = {"linear_q_proj": "q_proj", "linear_q_down_proj": "q_a_proj",
          "q_layernorm": "q_a_layernorm", "linear_q_up_proj": "q_b_proj",
          "linear_kv_down_proj": "kv_a_proj_with_mqa", "kv_layernorm": "kv_a_layernorm",
          "linear_kv_up_proj": "kv_b_proj", "linear_proj": "o_proj"}


def copy_from_hf(ours: MultiLatentAttention, attn) -> None:
    with torch.no_grad():
        for name, p in ours.named_parameters():
            mod, _, leaf = name.partition(".")
            p.copy_(getattr(getattr(attn, _NAMES[mod]), leaf))


def _run_hf(attn, rope, x):
    xx = x.transpose(0, 1).detach().clone().requires_grad_(True)  # [B, S, H]
    pos = torch.arange(S)[None].expand(B, S)
    out, _ = attn(xx, rope(xx, pos), attention_mask=None)
    return out.transpose(0, 1), xx


def _run_ours(cfg, attn, x):
    model_parallel_seed(3, ParallelState.single())
    ours = MultiLatentAttention(cfg, 1)
    copy_from_hf(ours, attn)
    freqs = build_rotary_embedding(cfg)(S)
    xx = x.detach().clone().requires_grad_(True)
    out, bias = ours(xx, None, freqs)
    assert bias is None
    return out, xx, ours


@pytest.mark.parametrize("q_lora", [True, False])
@pytest.mark.parametrize("yarn", [False, True])
def test_matches_hf_deepseek_v3_attention(q_lora, yarn):
    attn, rope = _hf_attention(q_lora, yarn)
    torch.manual_seed(2)
    x = torch.randn(S, B, H)
    w = torch.randn(S, B, H)
    ref, x_ref = _run_hf(attn, rope, x)
    out, x_ours, ours = _run_ours(mla_config(q_lora, yarn), attn, x)
    assert _rel(out, ref) < 1e-5
    (ref * w).sum().backward()
    (out * w).sum().backward()
    assert _rel(x_ours.grad, x_ref.grad.transpose(0, 1)) < 1e-5
    for name, p in ours.named_parameters():
        mod, _, leaf = name.partition(".")
        assert _rel(p.grad, getattr(getattr(attn, _NAMES[mod]), leaf).grad) < 1e-5, name
    if yarn:
        assert ours.softmax_scale != (DN + DR) ** -0.5 and ours.rope_mscale != 1.0


def test_yarn_frequencies_match_hf():
    attn, rope = _hf_attention(True, True)
    ours = YarnRotaryEmbedding(DR, 10000.0, YARN["factor"],
                               YARN["original_max_position_embeddings"], mscale=YARN["mscale"],
                               mscale_all_dim=YARN["mscale_all_dim"])
    torch.testing.assert_close(ours.inv_freq, rope.inv_freq, rtol=1e-6, atol=0)
    assert ours.mscale == pytest.approx(rope.attention_scaling)
    assert not torch.equal(ours.inv_freq, RotaryEmbedding(DR).inv_freq)  # YaRN moved some
    # Megatron's default: MLA takes YaRN, which at scaling factor 1 is plain RoPE.
    cfg = mla_config(rope_type=None)
    assert isinstance(build_rotary_embedding(cfg), YarnRotaryEmbedding)
    torch.testing.assert_close(build_rotary_embedding(cfg).inv_freq,
                               RotaryEmbedding(DR).inv_freq, rtol=1e-6, atol=0)


def _layer_grads(cfg, x, freqs):
    model_parallel_seed(7, ParallelState.single())
    layer = TransformerLayer(cfg, 1)
    xx = x.clone().requires_grad_(True)
    out = layer(xx, None, freqs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [xx.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("q_lora", [True, False])
@pytest.mark.parametrize("modules", [("mla_up_proj",), ("mla_up_proj", "core_attn", "layernorm")])
def test_mla_up_proj_recompute_is_bit_identical(q_lora, modules):
    cfg = mla_config(q_lora, yarn=True)
    x = torch.randn(S, B, H, generator=torch.Generator().manual_seed(4))
    freqs = build_rotary_embedding(cfg)(S)
    out, grads = _layer_grads(cfg, x, freqs)
    rcfg = cfg.replace(recompute_granularity="selective", recompute_modules=modules)
    assert rcfg.recomputes("mla_up_proj")
    out_r, grads_r = _layer_grads(rcfg, x, freqs)
    assert torch.equal(out, out_r)
    assert len(grads) == len(grads_r)
    for g, g_r in zip(grads, grads_r):
        assert torch.equal(g, g_r)


def test_mla_up_proj_frees_qkv_until_backward():
    cfg = mla_config(recompute_granularity="selective", recompute_modules=("mla_up_proj",))
    model_parallel_seed(7, ParallelState.single())
    attn = MultiLatentAttention(cfg, 1)
    seen = []
    orig = attn.up_proj_and_rope

    def spy(*a):
        out = orig(*a)
        seen.append(out)
        return out

    attn.up_proj_and_rope = spy
    out, _ = attn(torch.randn(S, B, H, requires_grad=True), None, build_rotary_embedding(cfg)(S))
    assert all(t.untyped_storage().nbytes() == 0 for t in seen[0])  # freed after attention
    out.sum().backward()
    assert len(seen) == 2  # one recompute, in backward


@pytest.mark.parametrize("kw,match", [
    (dict(kv_lora_rank=None), "--kv-lora-rank"),
    (dict(num_query_groups=2), "--num-query-groups"),
    (dict(qk_pos_emb_head_dim=5), "--qk-pos-emb-head-dim"),
    (dict(position_embedding_type="learned_absolute"), "--position-embedding-type rope"),
    (dict(rope_type="ntk"), "rope_type='ntk' is not supported"),
])
def test_config_errors_name_the_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        mla_config(**kw)


def test_yarn_rotates_whole_heads_and_mla_up_proj_needs_mla():
    base = dict(num_layers=1, hidden_size=H, num_attention_heads=NH)
    TransformerConfig(**base, rope_type="yarn")  # YaRN under GQA (gpt-oss)
    with pytest.raises(ValueError, match="--rotary-percent"):
        TransformerConfig(**base, rope_type="yarn", rotary_percent=0.5)
    with pytest.raises(ValueError, match="--multi-latent-attention"):
        TransformerConfig(**base, recompute_granularity="selective",
                          recompute_modules=("mla_up_proj",))


# ---- flags and training ------------------------------------------------------------------------
MLA_FLAGS = ("--multi-latent-attention --q-lora-rank 12 --kv-lora-rank 10 --qk-head-dim 8 "
             "--qk-pos-emb-head-dim 4 --v-head-dim 6 --qk-layernorm --position-embedding-type "
             "rope").split()


def test_flags_reach_the_config():
    cfg = transformer_config_from_args(parse_args(BASE + MLA_FLAGS + (
        "--rope-type yarn --rotary-scaling-factor 40 --mscale 0.707 --mscale-all-dim 0.707 "
        "--recompute-granularity selective --recompute-modules mla_up_proj").split()))
    assert (cfg.multi_latent_attention, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_head_dim,
            cfg.qk_pos_emb_head_dim, cfg.v_head_dim) == (True, 12, 10, 8, 4, 6)
    assert (cfg.rope_type, cfg.rotary_scaling_factor, cfg.mscale, cfg.mscale_all_dim,
            cfg.original_max_position_embeddings) == ("yarn", 40.0, 0.707, 0.707, 4096)
    assert cfg.recomputes("mla_up_proj")
    plain = transformer_config_from_args(parse_args(BASE))
    assert not plain.multi_latent_attention and plain.rope_type is None


@pytest.mark.parametrize("extra,needle", [
    ("--multi-latent-attention --position-embedding-type rope", "--kv-lora-rank"),
    ("--group-query-attention --num-query-groups 2", "--num-query-groups"),
    ("--position-embedding-type learned_absolute", "--position-embedding-type rope"),
])
def test_bad_flag_combinations_fail_in_one_line(extra, needle, capsys):
    argv = BASE + (MLA_FLAGS if "kv-lora" not in needle else []) + extra.split()
    err = parse_error(argv, capsys)
    line = err.strip().splitlines()[-1]
    assert needle in line, err


def test_yarn_with_partial_rotary_fails_naming_the_flag(capsys):
    err = parse_error(BASE + ["--rope-type", "yarn", "--rotary-percent", "0.5"], capsys)
    assert "--rotary-percent" in err.strip().splitlines()[-1]



@pytest.mark.parametrize("q_lora", [True, False])
def test_converter_sharding_rules_cover_mla(q_lora):
    """Every MLA parameter has a resharding rule that splits it as the model does over TP."""
    model_parallel_seed(3, ParallelState.single())
    model = GPTModel(mla_config(q_lora, vocab_size=16), vocab_size=16, max_sequence_length=S)
    attn = [n for n, _ in model.named_parameters() if ".self_attention." in n]
    assert len(attn) == (7 if q_lora else 5)
    for name, p in model.named_parameters():
        rule, _ = rule_for(name)
        want = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        assert rule.tp_dim == want, name


@pytest.mark.parametrize("q_lora", [True, False])
def test_mfu_counts_the_mla_projections(q_lora):
    cfg = mla_config(q_lora, num_layers=2, vocab_size=16)
    model_parallel_seed(3, ParallelState.single())
    model = GPTModel(cfg, vocab_size=16, max_sequence_length=S)
    matmuls = sum(p.numel() for n, p in model.named_parameters()
                  if p.dim() == 2 and "word_embeddings" not in n)
    assert matmul_params(cfg, 16) == matmuls
    attn = 6 * 2 * NH * (DN + DR + DV) * S
    assert flops_per_token(cfg, 16, S) == 6.0 * matmuls + attn
