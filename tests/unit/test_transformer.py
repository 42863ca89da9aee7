"""Single-process checks of the transformer pieces: norms, RoPE, attention, MLP, layer, block."""

import math

import pytest
import torch
import torch.nn.functional as F

from moecore.backends import BackendUnavailableError
from moecore.config import TransformerConfig
from moecore.kernels import attention as kernel_attention
from moecore.kernels.attention import core_attention
from moecore.moe import MoELayer
from moecore.parallel_state import ParallelState
from moecore.tensor_parallel import model_parallel_seed
from moecore.transformer import norms
from moecore.transformer.attention import SelfAttention
from moecore.transformer.block import TransformerBlock
from moecore.transformer.layer import TransformerLayer
from moecore.transformer.mlp import MLP, glu_interleaved_init
from moecore.transformer.rope import RotaryEmbedding, apply_rotary_pos_emb


def _cfg(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=48, init_method_std=0.05)
    base.update(kw)
    return TransformerConfig(**base)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---- norms -------------------------------------------------------------------------------------
def test_norms_match_formulas_and_backend_selection():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16)
    rms = norms.RMSNorm(16, eps=1e-6)
    ln = norms.LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        rms.weight.normal_()
        ln.weight.normal_()
        ln.bias.normal_()
    ref_rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ref_ln = (x - mu) / torch.sqrt(var + 1e-6) * ln.weight + ln.bias
    assert _rel(rms(x), ref_rms) < 1e-6 and _rel(ln(x), ref_ln) < 1e-6
    cfg = _cfg(normalization="LayerNorm", layernorm_epsilon=1e-3)
    built = norms.build_norm(cfg, 16)
    assert isinstance(built, norms.LayerNorm) and built.eps == 1e-3
    assert built.weight.sequence_parallel is False
    assert norms.build_norm(cfg, 16, sequence_parallel=True).bias.sequence_parallel is True
    with pytest.raises(BackendUnavailableError, match="apex"):
        norms.RMSNorm(16, eps=1e-6, backend="apex")(x)  # CPU tensor: the fused kernels can't
    assert norms.build_norm(_cfg(norm_backend="apex"), 16).backend == "apex"
    with pytest.raises(ValueError, match="unknown"):
        norms.RMSNorm(16, backend="fastest")(x)
    with pytest.raises(ValueError, match="norm_backend='fastest' is not supported"):
        _cfg(norm_backend="fastest")
    assert norms.RMS_NORM_BACKENDS.select("auto", device="cpu", log=False).name == "torch"


# ---- RoPE --------------------------------------------------------------------------------------
def _rope_complex_reference(t, positions, base, rot):
    """Pairs (i, i + rot/2) as complex numbers multiplied by exp(1j * pos * base^(-2i/rot))."""
    half = rot // 2
    inv = base ** (-torch.arange(half, dtype=torch.float64) * 2 / rot)
    ang = positions.double()[..., None] * inv  # [S, B, half]
    z = torch.complex(t[..., :half].double(), t[..., half:rot].double())
    z = z * torch.exp(1j * ang)[:, :, None, :]
    return torch.cat([z.real, z.imag, t[..., rot:].double()], dim=-1)


@pytest.mark.parametrize("percent", [1.0, 0.5])
def test_rope_matches_complex_reference(percent):
    torch.manual_seed(1)
    S, B, H, d = 7, 2, 3, 16
    t = torch.randn(S, B, H, d)
    rope = RotaryEmbedding(d, rotary_percent=percent, rotary_base=500.0)
    rot = int(d * percent)
    pos = torch.arange(S)[:, None].expand(S, B)
    out = apply_rotary_pos_emb(t, rope(S))
    assert _rel(out.double(), _rope_complex_reference(t, pos, 500.0, rot)) < 1e-6
    # Explicit position ids [B, S] (e.g. packed documents restart at 0).
    pid = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [3, 4, 5, 6, 7, 8, 9]])
    out = apply_rotary_pos_emb(t, rope(S, pid))
    assert _rel(out.double(), _rope_complex_reference(t, pid.t(), 500.0, rot)) < 1e-6
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(10, rotary_percent=0.3)


# ---- attention ---------------------------------------------------------------------------------
def _manual_attention(x, attn: SelfAttention, cfg):
    """Reference built from the documented QKV layout, explicit kv-head repeat and softmax."""
    nh, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    hpg = nh // ng
    w = attn.linear_qkv.weight.view(ng, (hpg + 2) * d, cfg.hidden_size)
    wq = w[:, : hpg * d].reshape(nh * d, -1)
    wk = w[:, hpg * d: hpg * d + d].reshape(ng * d, -1)
    wv = w[:, hpg * d + d:].reshape(ng * d, -1)
    S, B, _ = x.shape
    q = (x @ wq.t()).view(S, B, nh, d)
    k = (x @ wk.t()).view(S, B, ng, d)
    v = (x @ wv.t()).view(S, B, ng, d)
    freqs = RotaryEmbedding(d, cfg.rotary_percent, cfg.rotary_base)(S)
    q, k = apply_rotary_pos_emb(q, freqs), apply_rotary_pos_emb(k, freqs)
    k, v = k.repeat_interleave(hpg, dim=2), v.repeat_interleave(hpg, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    ctx = torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(S, B, nh * d)
    return ctx @ attn.linear_proj.weight.t(), freqs


def test_attention_gqa_layout_and_causality(monkeypatch):
    torch.manual_seed(2)
    cfg = _cfg()
    attn = SelfAttention(cfg, layer_number=1)
    x = torch.randn(6, 2, 32)
    ref, freqs = _manual_attention(x, attn, cfg)
    out, bias = attn(x, rotary_pos_emb=freqs)
    assert bias is None and out.shape == (6, 2, 32)
    assert _rel(out, ref) < 1e-5
    # The path without SDPA's enable_gqa (older torch) repeats k/v heads explicitly.
    monkeypatch.setattr(kernel_attention, "SDPA_HAS_GQA", False)
    assert _rel(attn(x, rotary_pos_emb=freqs)[0], ref) < 1e-5
    # Causality: changing tokens after position 3 leaves outputs 0..3 untouched.
    x2 = x.clone()
    x2[4:] = torch.randn_like(x2[4:])
    out2 = attn(x2, rotary_pos_emb=freqs)[0]
    torch.testing.assert_close(out2[:4], out[:4], rtol=0, atol=1e-6)
    assert (out2[4:] - out[4:]).abs().max() > 1e-3
    # An explicit Megatron mask (True = masked) equal to the causal one gives the same result.
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)[None, None]
    assert _rel(attn(x, attention_mask=mask, rotary_pos_emb=freqs)[0], out) < 1e-6


def test_core_attention_gqa_equals_explicit_repeat():
    torch.manual_seed(3)
    S, B, nh, ng, d = 5, 3, 6, 2, 8
    q, k, v = torch.randn(S, B, nh, d), torch.randn(S, B, ng, d), torch.randn(S, B, ng, d)
    gqa = core_attention(q, k, v)
    rep = core_attention(q, k.repeat_interleave(3, 2), v.repeat_interleave(3, 2))
    assert _rel(gqa, rep) < 1e-6
    # Grouping matters: head i must use kv head i // 3, not i % 2.
    wrong = core_attention(q, k.repeat(1, 1, 3, 1), v.repeat(1, 1, 3, 1))
    assert _rel(gqa, wrong) > 1e-2


def test_qk_layernorm_normalises_each_head():
    torch.manual_seed(4)
    cfg = _cfg(qk_layernorm=True)
    attn = SelfAttention(cfg, layer_number=1)
    seen = {}
    attn.q_layernorm.register_forward_hook(lambda m, i, o: seen.update(q=(i[0], o)))
    attn(torch.randn(4, 2, 32))
    q_in, q = seen["q"]
    assert q.shape == (4, 2, 4, 8)  # [S, B, heads, head_dim]: normalised over head_dim only
    ref = q_in / torch.sqrt(q_in.pow(2).mean(-1, keepdim=True) + cfg.layernorm_epsilon)
    assert _rel(q, ref) < 1e-6


# ---- MLP ---------------------------------------------------------------------------------------
def test_mlp_swiglu_gelu_and_interleaved_init():
    torch.manual_seed(5)
    cfg = _cfg()
    mlp = MLP(cfg)
    x = torch.randn(3, 2, 32)
    w1, w2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
    gate, up = (x @ w1.t()).chunk(2, dim=-1)
    out, bias = mlp(x)
    assert bias is None and _rel(out, (F.silu(gate) * up) @ w2.t()) < 1e-6
    assert w1.shape == (96, 32) and w1.partition_stride == 2
    gelu = MLP(cfg.replace(gated_linear_unit=False, activation_func=F.gelu), ffn_hidden_size=20)
    ref = F.gelu(x @ gelu.linear_fc1.weight.t()) @ gelu.linear_fc2.weight.t()
    assert _rel(gelu(x)[0], ref) < 1e-6
    # The TP=2 master weight is the TP=1 one with rows [g0; u0; g1; u1].
    torch.manual_seed(6)
    w_tp1 = glu_interleaved_init(torch.nn.init.normal_, 1)(torch.empty(8, 3))
    torch.manual_seed(6)
    w_tp2 = glu_interleaved_init(torch.nn.init.normal_, 2)(torch.empty(8, 3))
    g, u = w_tp1[:4], w_tp1[4:]
    torch.testing.assert_close(w_tp2, torch.cat([g[:2], u[:2], g[2:], u[2:]]), rtol=0, atol=0)


# ---- layer and block ---------------------------------------------------------------------------
def _block_grads(cfg, x, freqs):
    # Seeds the default generator and the tracker's TP stream (attention dropout forks it).
    model_parallel_seed(7, ParallelState.single())
    block = TransformerBlock(cfg)
    xx = x.clone().requires_grad_(True)
    out = block(xx, rotary_pos_emb=freqs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [xx.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("recompute", [dict(recompute_granularity="full"),
                                       dict(recompute_granularity="full",
                                            recompute_method="block", recompute_num_layers=1),
                                       dict(recompute_granularity="selective")])
def test_recompute_matches_plain_forward_backward(recompute):
    # Dropout on: recomputation must replay the same masks (default and tracker RNG streams).
    cfg = _cfg(qk_layernorm=True, hidden_dropout=0.2, attention_dropout=0.2)
    x = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(8))
    freqs = RotaryEmbedding(8)(6)
    ref_out, ref_grads = _block_grads(cfg, x, freqs)
    out, grads = _block_grads(cfg.replace(**recompute), x, freqs)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert (ref_out == x).float().mean() < 0.5  # dropout did act
    for g, rg in zip(grads, ref_grads):
        assert _rel(g, rg) < 1e-6


@pytest.mark.parametrize("case,calls,final_fused", [
    # 3 pre-MLP adds; layers 2 and 3 take the previous MLP add; the final norm takes layer 3's
    (dict(), 6, True),
    # checkpointed chunks [1, 2] and [3] return their sum: 3 pre-MLP adds + layer 2's input
    (dict(recompute_granularity="full", recompute_num_layers=2), 4, False),
    # layer 1 checkpointed alone, layers 2-3 plain: 3 + layer 3's input + the final norm
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1), 5,
     True),
    (dict(post_process=False), 5, False),  # no final norm: the block returns the sum itself
])
def test_block_defers_mlp_residual_adds_into_the_next_norm(monkeypatch, case, calls,
                                                           final_fused):
    """Each plain MLP residual add runs inside the next norm (``add_and_norm``); on CPU that is
    the unfused block bit for bit, across recompute boundaries and without a final norm."""
    from moecore.transformer import norms

    case = dict(case)
    post_process = case.pop("post_process", True)
    cfg = _cfg(num_layers=3, attention_dropout=0.2, **case)
    x = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(8))
    freqs = RotaryEmbedding(8)(6)
    seen = []
    real = norms._NormBase.add_and_norm
    monkeypatch.setattr(norms._NormBase, "add_and_norm",
                        lambda self, r, o: (seen.append(self), real(self, r, o))[1])
    results = []
    for deferred in (True, False):
        if not deferred:
            monkeypatch.setattr(TransformerLayer, "_plain_residual_add", lambda self, b: False)
        model_parallel_seed(7, ParallelState.single())
        block = TransformerBlock(cfg, post_process=post_process)
        xx = x.clone().requires_grad_(True)
        out = block(xx, rotary_pos_emb=freqs)
        if deferred:  # forward calls only (recompute repeats them in backward)
            assert len(seen) == calls, len(seen)
            assert (seen[-1] is block.final_layernorm) == final_fused
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), xx.grad] + [p.grad for p in block.parameters()])
        seen.clear()
    assert not seen  # the run without deferral called none
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layer_and_block_structure_and_errors():
    cfg = _cfg(num_layers=4)
    block = TransformerBlock(cfg, post_process=False, layer_offset=1, num_layers=2)
    assert [layer.layer_number for layer in block.layers] == [2, 3]
    assert block.final_layernorm is None
    with pytest.raises(ValueError, match="outside"):
        TransformerBlock(cfg, layer_offset=3, num_layers=2)
    with pytest.raises(ValueError, match="1-based"):
        TransformerLayer(cfg, layer_number=0)
    with pytest.raises(ValueError, match="recompute_method"):
        TransformerBlock(cfg.replace(recompute_granularity="full", recompute_method="all"))
    nopre = TransformerBlock(cfg, pre_process=False)
    with pytest.raises(ValueError, match="set_input_tensor"):
        nopre(None)
    h = torch.randn(3, 1, 32)
    nopre.set_input_tensor(h)
    assert nopre(None).shape == (3, 1, 32)
    # Pre-norm residual: with zeroed output projections a layer is the identity.
    layer = TransformerLayer(cfg, layer_number=1)
    with torch.no_grad():
        layer.self_attention.linear_proj.weight.zero_()
        layer.mlp.linear_fc2.weight.zero_()
    torch.testing.assert_close(layer(h), h, rtol=0, atol=0)


def test_moe_layers_take_their_mlp_from_the_caller():
    """The transformer package does not import moe: MoE layers need ``moe_layer``."""
    cfg = _cfg(num_layers=2, num_moe_experts=4, moe_ffn_hidden_size=16, moe_layer_freq=[0, 1])
    assert isinstance(TransformerLayer(cfg, layer_number=1).mlp, MLP)
    with pytest.raises(ValueError, match="layer 2 is an MoE layer.*moe_layer=moecore.moe.MoELayer"):
        TransformerLayer(cfg, layer_number=2)
    block = TransformerBlock(cfg, moe_layer=MoELayer)
    assert [type(layer.mlp) for layer in block.layers] == [MLP, MoELayer]
