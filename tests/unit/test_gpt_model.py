"""Single-process GPTModel checks: training signal, heads, tied embeddings, parameter counts."""

import pytest
import torch
import torch.nn.functional as F

from moecore.config import TransformerConfig
from moecore.models import GPTModel

V, S, B = 32, 12, 2


def _cfg(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=64, init_method_std=0.05, vocab_size=V)
    base.update(kw)
    return TransformerConfig(**base)


def _moe_cfg(**kw):
    return _cfg(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24,
                moe_aux_loss_coeff=1e-2, **kw)


def _batch():
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, V, (5,), generator=g)
    seq = pattern.repeat(4)[: S + 1]  # a repeated sequence: learnable after one period
    tokens = seq[None].expand(B, -1)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _train(model, steps=25, lr=1e-2):
    ids, labels = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("make_cfg", [_cfg, _moe_cfg], ids=["dense", "moe"])
def test_tiny_gpt_learns_a_repeated_sequence(make_cfg):
    torch.manual_seed(0)
    model = GPTModel(make_cfg(), vocab_size=V, max_sequence_length=S)
    losses = _train(model)
    assert losses[0] > 2.5, losses[0]  # ~ln(32) at init
    assert losses[-1] < 0.25 * losses[0], losses


def test_logits_loss_and_position_embeddings():
    torch.manual_seed(1)
    ids, labels = _batch()
    model = GPTModel(_cfg(), vocab_size=V, max_sequence_length=S)
    logits = model(ids)
    assert logits.shape == (B, S, V)
    loss = model(ids, labels=labels)
    assert loss.shape == (B, S) and loss.dtype == torch.float32
    ref = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss, ref.view(B, S), rtol=1e-5, atol=1e-6)
    assert model.embedding.position_embeddings is None and model.rotary_pos_emb is not None

    learned = GPTModel(_cfg(), vocab_size=V, max_sequence_length=S,
                       position_embedding_type="learned_absolute")
    assert learned.rotary_pos_emb is None
    assert learned.embedding.position_embeddings.weight.shape == (S, 32)
    shifted = torch.arange(S).flip(0)[None].expand(B, -1)
    assert (learned(ids) - learned(ids, position_ids=shifted)).abs().max() > 1e-4
    from_cfg = GPTModel(_cfg(position_embedding_type="learned_absolute",
                             share_embeddings_and_output_weights=True),
                        vocab_size=V, max_sequence_length=S)  # defaults come from the config
    assert from_cfg.rotary_pos_emb is None and from_cfg.output_layer.weight is None
    with pytest.raises(ValueError, match="max_sequence_length"):
        learned(torch.zeros(1, S + 1, dtype=torch.long))
    # RoPE also follows explicit position ids.
    assert (model(ids) - model(ids, position_ids=shifted)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="parallel state has tp=1"):
        GPTModel(_cfg(tensor_model_parallel_size=2), vocab_size=V, max_sequence_length=S)
    with pytest.raises(ValueError, match="position_embedding_type"):
        GPTModel(_cfg(), vocab_size=V, max_sequence_length=S, position_embedding_type="alibi")


def test_same_seed_same_model_and_layer_pattern():
    torch.manual_seed(3)
    a = GPTModel(_moe_cfg(moe_layer_freq=[0, 1]), vocab_size=V, max_sequence_length=S)
    torch.manual_seed(3)
    b = GPTModel(_moe_cfg(moe_layer_freq=[0, 1]), vocab_size=V, max_sequence_length=S)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    assert [layer.is_moe for layer in a.decoder.layers] == [False, True]
    assert type(a.decoder.layers[1].mlp).__name__ == "MoELayer"
    names = dict(a.named_parameters())
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in names
    assert "decoder.final_layernorm.weight" in names and "output_layer.weight" in names


def test_tied_embeddings_share_storage_and_grad():
    torch.manual_seed(4)
    ids, labels = _batch()
    tied = GPTModel(_cfg(), vocab_size=V, max_sequence_length=S,
                    share_embeddings_and_output_weights=True)
    emb = tied.embedding.word_embeddings.weight
    assert tied.output_layer.weight is None  # the head computes with the embedding weight
    assert tied.shared_embedding_or_output_weight() is emb and emb.shared_embedding
    n_untied = sum(p.numel() for p in GPTModel(_cfg(), vocab_size=V,
                                               max_sequence_length=S).parameters())
    assert sum(p.numel() for p in tied.parameters()) == n_untied - V * 32
    assert tied.num_parameters() == n_untied - V * 32
    # The tied grad is the sum of the grads of the two uses.
    untied = GPTModel(_cfg(), vocab_size=V, max_sequence_length=S)
    untied.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        untied.output_layer.weight.copy_(emb)
    tied(ids, labels=labels).sum().backward()
    untied(ids, labels=labels).sum().backward()
    expect = untied.embedding.word_embeddings.weight.grad + untied.output_layer.weight.grad
    torch.testing.assert_close(emb.grad, expect, rtol=1e-5, atol=1e-7)
    assert untied.output_layer.weight.grad.abs().sum() > 0


def test_num_parameters_counts_active_experts():
    torch.manual_seed(5)
    cfg = _moe_cfg(moe_layer_freq=[1, 0])
    model = GPTModel(cfg, vocab_size=V, max_sequence_length=S)
    total = model.num_parameters()
    assert total == sum(p.numel() for p in model.parameters())
    moe = model.decoder.layers[0].mlp
    experts = sum(p.numel() for p in moe.experts.parameters())
    assert experts == 4 * (32 * 24 * 2 + 24 * 32)  # 4 experts, SwiGLU fc1 + fc2
    assert model.num_parameters(active_only=True) == total - experts // 2
    dense = GPTModel(_cfg(), vocab_size=V, max_sequence_length=S)
    h, f, qkv = 32, 64, (4 + 2 * 2) * 8
    per_layer = 2 * h + h * qkv + 32 * h + 2 * f * h + f * h
    assert dense.num_parameters() == dense.num_parameters(active_only=True) == (
        2 * V * h + 2 * per_layer + h)


def test_moe_layer_recompute_and_bf16():
    ids, labels = _batch()
    grads = []
    for recompute in (False, True):
        torch.manual_seed(6)
        model = GPTModel(_moe_cfg(moe_layer_recompute=recompute), vocab_size=V,
                         max_sequence_length=S)
        loss = model(ids, labels=labels)
        loss.mean().backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    for g1, g0 in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-9)
    for make_cfg in (_cfg, _moe_cfg):
        torch.manual_seed(6)
        cfg = make_cfg(bf16=True, params_dtype=torch.bfloat16, qk_layernorm=True)
        model = GPTModel(cfg, vocab_size=V, max_sequence_length=S)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        loss = model(ids, labels=labels)
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
        loss.mean().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.bfloat16
                   for p in model.parameters())
        _check_bf16_against_float64(model, make_cfg, loss, ids, labels)


def _check_bf16_against_float64(model, make_cfg, loss, ids, labels):
    """The bf16 model against the same weights run in float64: per-token losses within 2 bf16
    unit roundoffs (u = 2**-9) and every parameter's gradient within 16 u in norm (a few
    roundings per layer; measured 0.5 u and 5-9 u)."""
    u = 2.0 ** -9
    ref = GPTModel(make_cfg(qk_layernorm=True, params_dtype=torch.float64), vocab_size=V,
                   max_sequence_length=S)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref_loss = ref(ids, labels=labels)
    ref_loss.mean().backward()
    assert ((loss.double() - ref_loss) / ref_loss).abs().max() <= 2 * u
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        err = (p.grad.double() - p_ref.grad).norm() / p_ref.grad.norm()
        assert err <= 16 * u, (name, err.item())


def test_matches_hugging_face_llama_with_documented_qkv_layout():
    """The QKV layout documented in ``attention.py`` and RoPE's rotate_half pairing make a
    Hugging Face Llama (GQA, SwiGLU, RMSNorm) load without permutations and give equal logits."""
    tf = pytest.importorskip("transformers")
    h, f, nh, ng, layers = 32, 48, 4, 2, 2
    d, hpg = h // nh, nh // ng
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=h, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=nh,
        num_key_value_heads=ng, vocab_size=V, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, max_position_embeddings=S)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)  # HF starts norms at 1: make the mapping observable
    sd = hf.state_dict()
    ours = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
            "decoder.final_layernorm.weight": sd["model.norm.weight"],
            "output_layer.weight": sd["lm_head.weight"]}
    for i in range(layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].view(ng, hpg * d, h)
        k = sd[p + "self_attn.k_proj.weight"].view(ng, d, h)
        v = sd[p + "self_attn.v_proj.weight"].view(ng, d, h)
        ours.update({
            m + "input_layernorm.weight": sd[p + "input_layernorm.weight"],
            m + "self_attention.linear_qkv.weight": torch.cat([q, k, v], 1).reshape(-1, h),
            m + "self_attention.linear_proj.weight": sd[p + "self_attn.o_proj.weight"],
            m + "pre_mlp_layernorm.weight": sd[p + "post_attention_layernorm.weight"],
            m + "mlp.linear_fc1.weight": torch.cat([sd[p + "mlp.gate_proj.weight"],
                                                    sd[p + "mlp.up_proj.weight"]]),
            m + "mlp.linear_fc2.weight": sd[p + "mlp.down_proj.weight"]})
    cfg = TransformerConfig(num_layers=layers, hidden_size=h, num_attention_heads=nh,
                            num_query_groups=ng, ffn_hidden_size=f, layernorm_epsilon=1e-5)
    model = GPTModel(cfg, vocab_size=V, max_sequence_length=S).eval()
    model.load_state_dict(ours, strict=True)
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref, got = hf(ids).logits, model(ids)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_embedding_init_method_std():
    """--embedding-init-method-std sets the word and position embeddings' std only."""
    stds = {}
    for emb_std in (None, 0.5):
        torch.manual_seed(0)
        model = GPTModel(_cfg(hidden_size=64, embedding_init_method_std=emb_std), vocab_size=512,
                         max_sequence_length=256, position_embedding_type="learned_absolute")
        stds[emb_std] = {n: p.std().item() for n, p in model.named_parameters()
                         if n.endswith("embeddings.weight") or n == "output_layer.weight"}
    for name in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight"):
        assert abs(stds[None][name] - 0.05) < 0.005 and abs(stds[0.5][name] - 0.5) < 0.05, name
    assert stds[None]["output_layer.weight"] == stds[0.5]["output_layer.weight"]
