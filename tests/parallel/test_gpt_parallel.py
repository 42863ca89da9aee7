"""GPTModel on 2 gloo ranks equals the single-process model built from the same seed.

TP=2 (with and without sequence parallel) is compared with TP=1 on logits, per-token loss and the
gathered gradient of every parameter; PP=2 (manual send/recv between the two stages, tied
embeddings) is compared with the one-stage model. All in one spawn: starting ranks costs seconds.
"""

import pytest
import torch
import torch.distributed as dist

from moecore.config import TransformerConfig
from moecore.models import GPTModel
from moecore.parallel_state import ParallelSizes, ParallelState
from tests.dist_harness import run_distributed
from tests.tp_compare import full_tensor, rel_err

V, S, B, SEED = 64, 8, 2, 1234

CASES = {
    # GQA + QK-norm + RoPE + SwiGLU, no biases.
    "dense_gqa": dict(qk_layernorm=True),
    # LayerNorm, biases, GELU, learned positions, tied embeddings.
    "dense_ln_tied": dict(normalization="LayerNorm", add_bias_linear=True, num_query_groups=4,
                          gated_linear_unit=False, activation_func=torch.nn.functional.gelu,
                          _model=dict(position_embedding_type="learned_absolute",
                                      share_embeddings_and_output_weights=True)),
    # MoE layer (EP=1, expert TP=2) with a shared expert, then a dense layer.
    "moe": dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                moe_layer_freq=[1, 0], moe_aux_loss_coeff=1e-2,
                moe_shared_expert_intermediate_size=32),
}
# The same with every selective recompute module (freed norm outputs under sequence parallel,
# checkpointed MoE / attention / shared experts).
CASES["moe_recompute"] = dict(CASES["moe"], recompute_granularity="selective",
                              recompute_modules=("layernorm", "moe_act", "core_attn", "mlp",
                                                 "shared_experts"))


def _cfg(case, **kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=64, init_method_std=0.05, vocab_size=V)
    base.update({k: v for k, v in CASES[case].items() if k != "_model"})
    base.update(kw)
    return TransformerConfig(**base)


def _build(case, ps, **cfg_kw):
    torch.manual_seed(SEED)
    model_kw = CASES[case].get("_model", {})
    return GPTModel(_cfg(case, **cfg_kw), vocab_size=V, max_sequence_length=S,
                    parallel_state=ps, **model_kw)




def _data():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    weights = torch.rand(B, S, generator=g)  # non-uniform loss weights exercise every grad
    return ids, labels, weights


def _forward_backward(model, ids, labels, weights):
    logits = model(ids)
    loss = model(ids, labels=labels)
    (loss * weights).sum().backward()
    return logits.detach(), loss.detach()


def _check_tp(case, tp_state, single):
    ids, labels, weights = _data()
    ref = _build(case, single)
    ref_logits, ref_loss = _forward_backward(ref, ids, labels, weights)
    ref_params = dict(ref.named_parameters())
    errors = []
    for sp in (False, True):
        if case.startswith("moe") and not sp:
            # MoE at TP>1 must use sequence parallel (duplicated tokens would double-count
            # expert gradients); the config refuses it with a message naming the fix.
            try:
                _build(case, tp_state, tensor_model_parallel_size=2, sequence_parallel=False)
            except ValueError as e:
                errors.append((f"{case} sp=False rejected",
                               0.0 if "sequence_parallel" in str(e) else 1.0))
            else:
                errors.append((f"{case} sp=False rejected", 1.0))
            continue
        par = _build(case, tp_state, tensor_model_parallel_size=2, sequence_parallel=sp)
        logits, loss = _forward_backward(par, ids, labels, weights)
        tag = f"{case} sp={sp}"
        errors.append((f"{tag} logits", rel_err(_gather_vocab(logits, tp_state), ref_logits)))
        errors.append((f"{tag} loss", rel_err(loss, ref_loss)))
        for active in (False, True):
            assert par.num_parameters(active) == ref.num_parameters(active), (tag, active)
        names = [n for n, _ in par.named_parameters()]
        assert names == list(ref_params), (tag, names)
        for name, p in par.named_parameters():
            w_err = rel_err(full_tensor(p, p.data, tp_state), ref_params[name].data)
            assert w_err == 0.0, f"{tag} {name}: initial weights differ (rel {w_err})"
            grad = p.grad.clone()
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(grad, group=tp_state.tp_group)
            errors.append((f"{tag} grad {name}", rel_err(full_tensor(p, grad, tp_state),
                                                      ref_params[name].grad)))
    return errors


def _gather_vocab(logits, ps):
    parts = [torch.empty_like(logits) for _ in range(ps.tp_size)]
    dist.all_gather(parts, logits.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=-1)


def _check_pp_tied(rank, single):
    """Two pipeline stages with tied embeddings equal the one-stage model (loss and grads)."""
    pp_state = ParallelState.build(ParallelSizes(world_size=2, pp=2))
    ids, labels, weights = _data()
    case = "dense_ln_tied"
    ref = _build(case, single)
    ref_loss = ref(ids, labels=labels)
    (ref_loss * weights).sum().backward()
    torch.manual_seed(SEED)
    stage = GPTModel(_cfg(case), vocab_size=V, max_sequence_length=S, parallel_state=pp_state,
                     pre_process=rank == 0, post_process=rank == 1,
                     **CASES[case]["_model"])
    assert stage.decoder.layer_offset == rank and len(stage.decoder.layers) == 1
    shared = stage.shared_embedding_or_output_weight()
    ref_shared = ref.embedding.word_embeddings.weight
    assert torch.equal(shared.data, ref_shared.data), "tied head not synchronised from stage 0"
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in stage.named_parameters():
            src = name.replace("decoder.layers.0.", f"decoder.layers.{rank}.")
            if p is not shared:
                p.copy_(ref_params[src])
    errors = []
    if rank == 0:
        hidden = stage(ids)
        dist.send(hidden.detach().contiguous(), dst=1)
        grad = torch.empty_like(hidden)
        dist.recv(grad, src=1)
        hidden.backward(grad)
    else:
        recv = torch.empty(S, B, 32)
        dist.recv(recv, src=0)
        recv.requires_grad_(True)
        stage.set_input_tensor(recv)
        loss = stage(ids, labels=labels)
        errors.append(("pp loss", rel_err(loss.detach(), ref_loss.detach())))
        (loss * weights).sum().backward()
        dist.send(recv.grad.contiguous(), dst=0)
    # The trainer's job for tied weights: sum the two stages' grads over the embedding group.
    dist.all_reduce(shared.grad, group=pp_state.group("embedding"))
    for name, p in stage.named_parameters():
        src = name.replace("decoder.layers.0.", f"decoder.layers.{rank}.")
        ref_grad = ref_shared.grad if p is shared else ref_params[src].grad
        errors.append((f"pp{rank} grad {name}", rel_err(p.grad, ref_grad)))
    total = stage.num_parameters()
    assert total == ref.num_parameters(), (total, ref.num_parameters())
    return errors


def _worker(rank, world_size):
    torch.use_deterministic_algorithms(True)
    single = ParallelState.single()
    tp_state = ParallelState.build(ParallelSizes(world_size=2, tp=2))
    errors = []
    for case in CASES:
        errors += _check_tp(case, tp_state, single)
    errors += _check_pp_tied(rank, single)
    return errors


@pytest.fixture(scope="module")
def rel_errors():
    """``(check name, relative error)`` of every comparison on both ranks (one spawn)."""
    per_rank = run_distributed(_worker, 2, timeout=240)
    return [e for errors in per_rank for e in errors]


def _bad(errors):
    return [(n, e) for n, e in errors if not e <= 1e-5]


def test_gpt_tp2_sp_and_pp2_match_single_process(rel_errors):
    checked = [(n, e) for n, e in rel_errors if "sp=False rejected" not in n]
    assert len(checked) > 80
    assert not _bad(checked)


def test_gpt_moe_tp2_without_sequence_parallel_is_refused(rel_errors):
    checked = [(n, e) for n, e in rel_errors if "sp=False rejected" in n]
    assert len(checked) == 4 and all(e == 0.0 for _, e in checked), checked
