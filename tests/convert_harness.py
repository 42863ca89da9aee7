"""Shared plumbing of the Hugging Face converter tests (DeepSeek-V3, OLMoE, Qwen-MoE, gpt-oss).

Tiny random ``transformers`` models are saved as the hub stores them (sharded safetensors +
index), converted, and run in moecore; these helpers build, save, convert, run and collect the
numbers. The assertions and their tolerances stay in each test.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist

from moecore.convert import Layout, convert
from moecore.convert.reshard import fake_parallel_state, shard_tensor
from tests.dist_harness import run_distributed
from tests.unit.test_convert import load_stage, load_with_pretrain, rel_err

transformers = pytest.importorskip("transformers")


# ---- tiny models, data, files ------------------------------------------------------------------
def random_hf_model(family: str, kwargs: dict, seed: int, scale: float = 0.2,
                    expert_scale: float | None = None):
    """A random fp32 ``transformers`` ``<family>ForCausalLM`` (eager attention) whose weights are
    large enough to route and attend unevenly (transformers' init is tiny): norms ~ 1 + 0.1 N,
    experts ~ ``expert_scale`` N where given, the rest ~ ``scale`` N. Returns the model and the
    generator, for a caller that draws more from the same stream."""
    cfg = getattr(transformers, family + "Config")(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, family + "ForCausalLM")(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif expert_scale is not None and "experts" in name:
                p.copy_(expert_scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model, g


def ids_and_labels(vocab: int, batch: int = 2, seq: int = 8):
    """Token ids and labels, each [batch, seq], from a fixed seed."""
    g = torch.Generator().manual_seed(3)
    return (torch.randint(0, vocab, (batch, seq), generator=g),
            torch.randint(0, vocab, (batch, seq), generator=g))


def save_hub(model, directory: str) -> None:
    model.save_pretrained(directory, max_shard_size="40KB")  # several shards + index


def moecore_model(directory: str):
    """The single-rank moecore model of a converted checkpoint."""
    (model,) = load_stage(directory, fake_parallel_state(Layout().sizes(), 0))
    return model


def convert_saved(model, root) -> dict:
    """Save ``model`` under ``root/hf``, convert it to ``root/m``; the pieces the tests use."""
    save_hub(model, str(root / "hf"))
    res = convert("hf", "moecore", str(root / "hf"), str(root / "m"))
    return {"root": root, "hf": model, "res": res, "moecore": moecore_model(str(root / "m"))}


# ---- logits and gradients ------------------------------------------------------------------------
def backward_loss(logits: torch.Tensor, labels: torch.Tensor, vocab: int) -> None:
    """Backward of the mean cross entropy of ``logits`` [B, S, vocab] against ``labels``."""
    torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1)).backward()


def logits_then_backward(hf, ours, ids, labels, vocab: int):
    """(transformers' logits, moecore's logits), each [B, S, vocab], after one backward of the
    same loss through both models."""
    ref = hf(ids).logits
    logits = ours(ids)
    backward_loss(ref, labels, vocab)
    backward_loss(logits, labels, vocab)
    return ref, logits


def hub_grads(model, expert_ffn: int | None = None) -> dict[str, torch.Tensor]:
    """transformers' gradients under hub tensor names. With ``expert_ffn``, fused experts
    ([E, 2F, H] gate rows then up; [E, H, F]) are split per expert as the hub stores them. The
    expert bias (a buffer) gets a zero gradient."""
    hub: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if expert_ffn is not None and name.endswith("experts.gate_up_proj"):
            prefix = name[:-len("gate_up_proj")]
            for e in range(p.shape[0]):
                hub[f"{prefix}{e}.gate_proj.weight"] = p.grad[e, :expert_ffn]
                hub[f"{prefix}{e}.up_proj.weight"] = p.grad[e, expert_ffn:]
        elif expert_ffn is not None and name.endswith("experts.down_proj"):
            prefix = name[:-len("down_proj")]
            for e in range(p.shape[0]):
                hub[f"{prefix}{e}.down_proj.weight"] = p.grad[e]
        else:
            hub[name] = p.grad
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            hub[name] = torch.zeros_like(b)
    return hub


def global_grads(hub: dict, cfg: dict, family, names) -> dict[str, torch.Tensor]:
    """The hub gradients ``hub`` as moecore global tensors of ``names``, by the converter
    module ``family``'s own mapping (``args_from_hf_config``, ``global_from_hf_layer``)."""
    ns = family.args_from_hf_config(cfg)
    out = {"embedding.word_embeddings.weight": hub["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hub["model.norm.weight"]}
    if "lm_head.weight" in hub and not cfg["tie_word_embeddings"]:
        out["output_layer.weight"] = hub["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        out.update(family.global_from_hf_layer(i, hub.__getitem__, ns))
    return {k: out[k] for k in names}


# ---- a converted checkpoint at TP=2 x EP=2 on 4 gloo ranks ---------------------------------------
def tp_ep_worker(rank, world_size, flags, vocab, ids, labels, ref, grads, num_experts,
                 sum_expert_dp=False):
    """Load the checkpoint through ``pretrain``; the relative errors of the logits (gathered over
    the vocab-parallel group) against ``ref`` and of this rank's gradient shards against
    ``grads`` (global tensors, sharded by the converter's table)."""
    model = load_with_pretrain(flags, vocab)
    ps = model.ps
    logits = model(ids)  # [B, S, V/tp]
    parts = [torch.empty_like(logits) for _ in range(ps.tp_size)]
    dist.all_gather(parts, logits.detach().contiguous(), group=ps.tp_group)
    errors = {"logits": rel_err(torch.cat(parts, dim=-1), ref)}
    model(ids, labels=labels).mean().backward()
    params = dict(model.named_parameters())
    for name, global_grad in grads.items():
        p = params[name]
        g = (p.grad if p.grad is not None else p.main_grad).clone()
        if getattr(p, "sequence_parallel", False):  # partial over TP under SP (trainer sums)
            dist.all_reduce(g, group=ps.tp_group)
        local, expected = shard_tensor(name, global_grad, ps, gated=True,
                                       num_experts=num_experts)
        if ".experts." in name:
            # Every data-parallel replica routes the same batch to this rank's experts: with
            # expert DP = 1 its gradient holds all replicas' contributions; with expert DP > 1
            # (``sum_expert_dp``) the trainer sums them over the expert-data-parallel group.
            if sum_expert_dp:
                dist.all_reduce(g, group=ps.group("expert_data_parallel"))
            expected = expected * ps.dp_size
        errors[name] = rel_err(g, expected)
    return errors


def saved_reference(hf, tmp_path, ids, labels, vocab: int) -> torch.Tensor:
    """Save ``hf`` under ``tmp_path/hf``; its logits [B, S, vocab] after one backward of the
    loss (its parameters hold the gradients)."""
    save_hub(hf, str(tmp_path / "hf"))
    ref = hf(ids).logits
    backward_loss(ref, labels, vocab)
    return ref


def run_converted_on_four_ranks(tmp_path, target: dict, vocab: int, ids, labels, ref, grads,
                                num_experts: int, sum_expert_dp: bool = False):
    """Convert ``tmp_path/hf`` to ``target`` in ``tmp_path/tp2ep2``; run :func:`tp_ep_worker`
    on 4 ranks with the printed flags. Returns (the conversion's result, per-rank errors)."""
    out = str(tmp_path / "tp2ep2")
    res = convert("hf", "moecore", str(tmp_path / "hf"), out, target=target, log=io.StringIO())
    flags = res.flags + ["--load", out, "--no-load-optim", "--no-load-rng"]
    per_rank = run_distributed(tp_ep_worker, 4, flags, vocab, ids, labels, ref.detach(), grads,
                               num_experts, sum_expert_dp, timeout=300)
    return res, per_rank


def errors_over(per_rank: list[dict], bound: float) -> list[tuple]:
    """(rank, name, error) of every error not below ``bound``."""
    return [(r, k, e) for r, errs in enumerate(per_rank) for k, e in errs.items()
            if not e < bound]
