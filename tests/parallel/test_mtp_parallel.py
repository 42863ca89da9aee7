"""Multi-token prediction under pipeline and tensor parallelism (2 gloo ranks) against the
one-stage model.

The MTP block lives on the last stage, which keeps its own copy of the embedding (the MTP depths
embed the shifted tokens), synchronised with the first stage's at construction and summed over
the embedding group after backward. Same comparison as ``test_pipeline``: per-micro-batch losses
(also ``forward_only``), the recorded MTP (and MoE) losses per depth, and every gradient
(fp32 rel err <= 1e-5), with a loss scale of 8 so a wrong MTP scaling shows.

TP=2 (dense without and with sequence parallel, MoE with it): the MTP projection ``eh_proj`` is
split by output features and gathered; per-token loss, MTP losses and every gathered gradient
equal the TP=1 model's.
"""

from __future__ import annotations

import pytest
import torch

from moecore.config import TransformerConfig
from moecore.models import GPTModel
from moecore.models.mtp import MTP_LOSS_NAME
from moecore.moe.losses import MoEAuxLossAutoScaler, MoELossTracker
from moecore.parallel_state import ParallelSizes, ParallelState
from tests.dist_harness import run_distributed
from tests.parallel.test_pipeline import DENSE, MOE, _check_layout
from tests.tp_compare import full_tensor, rel_err

MTP2 = " --mtp-num-layers 2 --mtp-loss-scaling-factor 0.5"
LAYOUTS = {
    # tied head, learned positions (both embedding tables are shared with the last stage)
    "1f1b_pp2_dense_tied_mtp2": (DENSE + MTP2, 2, 3, "--pipeline-model-parallel-size 2"),
    # untied head, MoE last layer: the MTP layers are MoE with their own aux losses
    "1f1b_pp2_moe_mtp1": (MOE.replace("--moe-layer-freq 2", "--moe-layer-freq [0,1,0,1]")
                          + " --mtp-num-layers 1", 4, 4, "--pipeline-model-parallel-size 2"),
    "interleaved_pp2_vp2_dense_mtp2": (DENSE + MTP2, 4, 4, "--pipeline-model-parallel-size 2 "
                                                           "--num-layers-per-virtual-pipeline-"
                                                           "stage 1"),
}


TP_CASES = {
    "tp2_dense_tied": dict(normalization="LayerNorm", _model=dict(
        share_embeddings_and_output_weights=True, position_embedding_type="learned_absolute")),
    "tp2_moe": dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                    moe_layer_freq=[0, 1], moe_aux_loss_coeff=1e-2, _model={}),
}
V, S, B = 64, 8, 2


def _tp_model(case: str, ps: ParallelState, **kw) -> GPTModel:
    torch.manual_seed(1234)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            ffn_hidden_size=64, init_method_std=0.05, vocab_size=V,
                            mtp_num_layers=2, mtp_loss_scaling_factor=0.5,
                            **{k: v for k, v in TP_CASES[case].items() if k != "_model"}, **kw)
    return GPTModel(cfg, vocab_size=V, max_sequence_length=S, parallel_state=ps,
                    **TP_CASES[case]["_model"])


def _tp_run(model, data):
    """Per-token loss, recorded MTP losses; backward of the masked mean (grads on the model)."""
    ids, labels, mask = data
    MoELossTracker.clear()
    loss = model(ids, labels=labels, loss_mask=mask)
    ((loss * mask).sum() / mask.sum()).backward()
    mtp = MoELossTracker.values()[MTP_LOSS_NAME].clone()
    MoELossTracker.clear()
    return loss.detach(), mtp


def _check_tp(case: str, tp_state: ParallelState) -> list:
    g = torch.Generator().manual_seed(5)
    data = (torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g),
            (torch.rand(B, S, generator=g) > 0.3).float())
    MoEAuxLossAutoScaler.set_loss_scale(1.0)
    ref = _tp_model(case, ParallelState.single())
    ref_loss, ref_mtp = _tp_run(ref, data)
    ref_params = dict(ref.named_parameters())
    errors = []
    for sp in ((True,) if "moe" in case else (False, True)):
        par = _tp_model(case, tp_state, tensor_model_parallel_size=2, sequence_parallel=sp)
        loss, mtp = _tp_run(par, data)
        tag = f"{case} sp={sp}"
        errors += [(f"{tag} loss", rel_err(loss, ref_loss)),
                   (f"{tag} mtp loss", rel_err(mtp, ref_mtp))]
        for name, p in par.named_parameters():
            assert torch.equal(full_tensor(p, p.data, tp_state), ref_params[name].data), (tag, name)
            grad = p.grad.clone()
            if getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(grad, group=tp_state.tp_group)
            errors.append((f"{tag} grad {name}", rel_err(full_tensor(p, grad, tp_state),
                                                      ref_params[name].grad)))
    return errors


def _worker(rank, world_size):
    torch.use_deterministic_algorithms(True)
    errors = []
    tp_state = ParallelState.build(ParallelSizes(world_size=2, tp=2))
    for case in TP_CASES:
        errors += _check_tp(case, tp_state)
    for name, (flags, layers, n_mb, parallel) in LAYOUTS.items():
        errors += _check_layout(name, flags, layers, n_mb, parallel, world_size)
    return errors


@pytest.fixture(scope="module")
def rel_errors():
    per_rank = run_distributed(_worker, 2, timeout=240)
    return [e for errors in per_rank for e in errors]


def test_mtp_pipeline_and_tensor_parallel_match_one_stage_model(rel_errors):
    names = {n.split(" ")[0] for n, _ in rel_errors}
    assert names == set(LAYOUTS) | set(TP_CASES), sorted(set(LAYOUTS) - names)
    for case in TP_CASES:
        checks = [n for n, _ in rel_errors if n.startswith(case + " ")]
        assert any(n.endswith("sp=True mtp loss") for n in checks), case
        assert any(n.endswith("grad mtp.layers.1.eh_proj.weight") for n in checks), case
    for layout in LAYOUTS:  # pipeline layouts
        checks = [n for n, _ in rel_errors if n.startswith(layout + " ")]
        assert any(" moe mtp loss" in n for n in checks), layout  # recorded per depth
        assert any(" grad mtp.layers.0.eh_proj.weight" in n for n in checks), layout
        assert any(" grad embedding.word_embeddings.weight" in n for n in checks), layout
        assert any(" loss" in n for n in checks), layout
    bad = [(n, e) for n, e in rel_errors if not e <= 1e-5]
    assert not bad, bad
