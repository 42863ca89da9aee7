"""Multi-latent attention at TP=2 on gloo equals TP=1: a GPTModel with MLA (q LoRA + YaRN, and
a plain q projection with RoPE), with and without sequence parallel, logits, loss and every
gradient (replicated down-projections' grads summed over TP by ``finalize_model_grads`` under
sequence parallel); the ``mla_up_proj`` recompute at TP=2 with sequence parallel is
bit-identical to the run without it. One spawn of 2 ranks."""

import pytest
import torch

from moecore.config import TransformerConfig
from moecore.models import GPTModel
from moecore.optimizer.grad_sync import finalize_model_grads
from moecore.parallel_state import ParallelSizes, ParallelState
from tests.dist_harness import run_distributed
from tests.tp_compare import full_tensor, rel_err

S, B, V, SEED = 8, 2, 64, 11
CASES = {
    "lora_yarn": dict(q_lora_rank=12, rope_type="yarn", rotary_scaling_factor=4.0,
                      mscale_all_dim=0.7, original_max_position_embeddings=4),
    "no_lora_rope": dict(q_lora_rank=None, rope_type="rope"),
    # MLA then an MoE layer (MoE at TP > 1 needs sequence parallel: checked with sp=True only).
    "lora_moe": dict(q_lora_rank=12, num_moe_experts=4, moe_router_topk=2,
                     moe_ffn_hidden_size=32, moe_layer_freq=[0, 1]),
}


def _build(case, ps, **kw):
    cfg = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
               init_method_std=0.05, vocab_size=V, multi_latent_attention=True,
               kv_lora_rank=10, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=6,
               qk_layernorm=True)
    cfg.update(CASES[case])
    cfg.update(kw)
    torch.manual_seed(SEED)
    return GPTModel(TransformerConfig(**cfg), vocab_size=V, max_sequence_length=S,
                    parallel_state=ps)




def _run(model, ps):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    weights = torch.rand(B, S, generator=g)
    loss = model(ids, labels=labels)
    (loss * weights).sum().backward()
    finalize_model_grads(model, ps)
    return loss.detach()


def _check_case(case, tp_state, single):
    ref = _build(case, single)
    ref_loss = _run(ref, single)
    ref_params = dict(ref.named_parameters())
    errors = []
    for sp in ((True,) if "moe" in case else (False, True)):
        par = _build(case, tp_state, tensor_model_parallel_size=2, sequence_parallel=sp)
        tag = f"{case} sp={sp}"
        errors.append((f"{tag} loss", rel_err(_run(par, tp_state), ref_loss)))
        assert [n for n, _ in par.named_parameters()] == list(ref_params), tag
        for name, p in par.named_parameters():
            assert torch.equal(full_tensor(p, p.data, tp_state), ref_params[name].data), (tag, name)
            errors.append((f"{tag} grad {name}", rel_err(full_tensor(p, p.grad, tp_state),
                                                      ref_params[name].grad)))
    return errors


def _recompute_is_bit_identical(tp_state):
    grads = []
    for extra in ({}, dict(recompute_granularity="selective",
                           recompute_modules=("mla_up_proj", "core_attn"))):
        model = _build("lora_yarn", tp_state, tensor_model_parallel_size=2,
                       sequence_parallel=True, **extra)
        loss = _run(model, tp_state)
        grads.append([loss] + [p.grad for p in model.parameters()])
    return all(torch.equal(a, b) for a, b in zip(*grads))


def _worker(rank, world_size):
    torch.use_deterministic_algorithms(True)
    single = ParallelState.single()
    tp_state = ParallelState.build(ParallelSizes(world_size=2, tp=2))
    errors = []
    for case in CASES:
        errors += _check_case(case, tp_state, single)
    return errors, _recompute_is_bit_identical(tp_state)


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2, timeout=240)


def test_mla_tp2_with_and_without_sequence_parallel_matches_tp1(results):
    errors = [e for errs, _ in results for e in errs]
    assert len(errors) > 40
    bad = [(n, e) for n, e in errors if not e <= 1e-5]
    assert not bad, bad


def test_mla_up_proj_recompute_is_bit_identical_at_tp2_sp(results):
    assert all(same for _, same in results)
