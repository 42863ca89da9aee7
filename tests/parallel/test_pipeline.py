"""Pipeline schedules on 4 gloo ranks against the one-stage model (same seed, same data).

Every layout builds its stage chunks with the trainer's builder (whose initial weights must equal
the one-stage model's), runs one schedule over the same micro-batches as a plain single-process
loop, finalises the gradients and compares, with fp32 rel err <= 1e-5:

* the per-micro-batch losses (last stage), and the same through ``forward_only``;
* every parameter's gradient (tied embedding/output weight summed over the embedding group,
  expert slices under EP=2);
* the MoE auxiliary losses recorded per layer (summed over stages).

The gradients include the MoE load-balancing and z-losses, which each stage adds through the
autograd hook of its own routers; the reference sets their scale to ``loss_scale / n_mb`` by hand
and the schedules use a loss scale of 8, so a wrong micro-batch or loss scaling shows.
Layouts: 1F1B at PP=4 (more and fewer micro-batches than stages), PP=2 x DP=2 with EP=2,
interleaved PP=2 x VP=2 and PP=4 x VP=2 (also with as many micro-batches as stages), uneven
first/last stages with and without interleaving. One spawn: starting ranks costs seconds.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed

SEQ, MBS, SCALE = 16, 2, 8.0
COMMON = ("--hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 --seq-length 16 "
          "--max-position-embeddings 16 --mock-data --vocab-size 60 --micro-batch-size 2 "
          "--lr 1e-3 --train-iters 1 --hidden-dropout 0 --attention-dropout 0 --device cpu "
          "--seed 1234 --init-method-std 0.05 --num-workers 0")
# Tied embedding/output weight, learned positions, LayerNorm, biases, GELU.
DENSE = COMMON + " --normalization LayerNorm --position-embedding-type learned_absolute"
# RoPE, RMSNorm, SwiGLU, untied head; every other layer MoE with aux loss and z-loss.
MOE = COMMON + (" --position-embedding-type rope --normalization RMSNorm --swiglu "
                "--disable-bias-linear --untie-embeddings-and-output-weights --num-experts 4 "
                "--moe-router-topk 2 --moe-aux-loss-coeff 1e-1 --moe-z-loss-coeff 1e-2 "
                "--moe-ffn-hidden-size 32 --moe-grouped-gemm --moe-layer-freq 2 "
                "--moe-token-dispatcher-type alltoall")

# name: (model flags, layers, micro-batches, parallel flags)
LAYOUTS = {
    "1f1b_pp4_dense": (DENSE, 4, 6, "--pipeline-model-parallel-size 4"),
    "1f1b_pp4_dense_few_mb": (DENSE, 4, 2, "--pipeline-model-parallel-size 4"),
    "1f1b_pp2_dp2_ep2_moe": (MOE, 4, 4, "--pipeline-model-parallel-size 2 "
                                        "--expert-model-parallel-size 2"),
    "interleaved_pp2_vp2_moe": (MOE, 4, 4, "--pipeline-model-parallel-size 2 "
                                           "--num-layers-per-virtual-pipeline-stage 1"),
    "interleaved_pp2_vp2_moe_all_warmup": (MOE, 4, 2, "--pipeline-model-parallel-size 2 "
                                                      "--num-virtual-stages-per-pipeline-rank 2"),
    "interleaved_pp4_vp2_dense": (DENSE, 8, 8, "--pipeline-model-parallel-size 4 "
                                               "--num-layers-per-virtual-pipeline-stage 1"),
    "interleaved_pp4_vp2_dense_all_warmup": (DENSE, 8, 4, "--pipeline-model-parallel-size 4 "
                                                          "--num-virtual-stages-per-pipeline-"
                                                          "rank 2"),
    "uneven_pp4_moe": (MOE, 6, 4, "--pipeline-model-parallel-size 4 "
                                  "--decoder-first-pipeline-num-layers 1 "
                                  "--decoder-last-pipeline-num-layers 1"),
    "uneven_interleaved_pp2_vp2_dense": (DENSE, 6, 4, "--pipeline-model-parallel-size 2 "
                                                      "--num-virtual-stages-per-pipeline-rank 2 "
                                                      "--decoder-first-pipeline-num-layers 2 "
                                                      "--decoder-last-pipeline-num-layers 4"),
}


def _args(flags: str, layers: int, n_mb: int, parallel: str, world: int):
    from moecore.arguments import parse_args
    from moecore.training import builders

    dp = world // int(parallel.split("--pipeline-model-parallel-size ")[1].split()[0]) \
        if parallel else 1
    argv = f"{flags} --num-layers {layers} --global-batch-size {MBS * dp * n_mb} {parallel}"
    args = parse_args(argv.split(), world_size=world)
    builders.build_tokenizer_from_args(args)
    return args


def _batches(n_mb: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(n_mb)
    out = []
    for _ in range(n_mb):
        tokens = torch.randint(0, vocab, (MBS, SEQ), generator=g)
        out.append({"tokens": tokens, "labels": torch.randint(0, vocab, (MBS, SEQ), generator=g),
                    "loss_mask": (torch.rand(MBS, SEQ, generator=g) > 0.2).float(),
                    "position_ids": torch.arange(SEQ).expand(MBS, SEQ)})
    return out


def _reference(args, batches):
    """One-stage model, plain loop: per-micro-batch losses, grads by name, MoE loss values."""
    from moecore.moe.losses import MoEAuxLossAutoScaler, MoELossTracker
    from moecore.parallel_state import ParallelState
    from moecore.training import builders, masked_mean_loss, model_output

    torch.manual_seed(args.seed)
    model = builders.build_model(args, ParallelState.single())[0]
    MoELossTracker.clear()
    MoEAuxLossAutoScaler.set_loss_scale(SCALE / len(batches))
    losses = []
    for b in batches:
        loss = masked_mean_loss(model_output(model, b), b["loss_mask"])
        (loss / len(batches) * SCALE).backward()
        losses.append(loss.detach())
    values = {k: v.clone() for k, v in MoELossTracker.values().items()}
    MoELossTracker.clear()
    return model, torch.stack(losses), values


def _global_name(name: str, offset: int) -> str:
    if name.startswith("decoder.layers."):
        _, _, idx, rest = name.split(".", 3)
        return f"decoder.layers.{int(idx) + offset}.{rest}"
    return name


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_layout(name, flags, layers, n_mb, parallel, world):
    from moecore.moe.losses import MoELossTracker
    from moecore.optimizer import finalize_model_grads
    from moecore.optimizer.grad_sync import model_grad
    from moecore.parallel_state import ParallelSizes, ParallelState
    from moecore.pipeline_parallel import get_forward_backward_func, make_data_iterators
    from moecore.training import builders, forward_step_func

    args = _args(flags, layers, n_mb, parallel, world)
    ref_args = _args(flags, layers, n_mb, "", 1)
    batches = _batches(n_mb, args.vocab_size)
    ref, ref_losses, ref_values = _reference(ref_args, batches)
    ref_params = dict(ref.named_parameters())
    ps = ParallelState.build(ParallelSizes(world_size=world, pp=args.pipeline_model_parallel_size,
                                           ep=args.expert_model_parallel_size))
    chunks = builders.build_model(args, ps)
    vp = args.virtual_pipeline_model_parallel_size
    schedule = get_forward_backward_func(vp, ps)
    errors = []
    tied = "embedding.word_embeddings.weight"
    for chunk in chunks:  # the builder must give every layout the one-stage model's weights
        for pname, p in chunk.named_parameters():
            ref_name = _global_name(pname, chunk.decoder.layer_offset)
            if ref_name == "output_layer.weight" and ref_name not in ref_params:
                ref_name = tied
            want = ref_params[ref_name].data
            if getattr(p, "expert_parallel", False) and ps.ep_size > 1:
                want = want.chunk(ps.ep_size, 0)[ps.ep_rank]
            assert torch.equal(p.data, want), f"{name}: initial {pname} differs from one-stage"

    def run(forward_only):
        MoELossTracker.clear()
        return schedule(forward_step_func=forward_step_func,
                        data_iterator=make_data_iterators(batches, len(chunks)),
                        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=n_mb,
                        seq_length=SEQ, micro_batch_size=MBS, forward_only=forward_only,
                        grad_scale_func=lambda t: t * SCALE, parallel_state=ps)

    with torch.no_grad():
        fwd_store = run(forward_only=True)
    store = run(forward_only=False)
    values = MoELossTracker.reduce(group=ps.pp_group)
    MoELossTracker.clear()
    finalize_model_grads(chunks, ps)
    if ps.is_pipeline_last_stage():
        for tag, st in (("loss", store), ("forward-only loss", fwd_store)):
            assert len(st) == n_mb, (name, tag, len(st))
            errors.append((f"{name} {tag}", _rel(torch.stack([d["lm loss"] for d in st]),
                                                 ref_losses)))
    else:
        assert store == [] and fwd_store == []
    assert sorted(values) == sorted(ref_values), (name, sorted(values))
    for k, v in ref_values.items():
        errors.append((f"{name} moe {k}", _rel(values[k][:v.numel()], v)))
    for chunk in chunks:
        for pname, p in chunk.named_parameters():
            ref_name = _global_name(pname, chunk.decoder.layer_offset)
            if ref_name not in ref_params:
                ref_name = tied
            want = ref_params[ref_name].grad
            if getattr(p, "expert_parallel", False) and ps.ep_size > 1:
                want = want.chunk(ps.ep_size, 0)[ps.ep_rank]
            errors.append((f"{name} grad {ref_name}", _rel(model_grad(p), want)))
    return errors


def _unit_checks(rank, world):
    """Schedule selection and the p2p shape check (no communication needed)."""
    from moecore.config import TransformerConfig
    from moecore.parallel_state import ParallelSizes, ParallelState
    from moecore.pipeline_parallel import (
        P2PCommunicator,
        forward_backward_no_pipelining,
        forward_backward_pipelining_with_interleaving,
        forward_backward_pipelining_without_interleaving,
        get_forward_backward_func,
        get_tensor_shape,
    )

    ps = ParallelState.build(ParallelSizes(world_size=world, tp=2, pp=2))
    assert get_forward_backward_func(None, ps) is forward_backward_pipelining_without_interleaving
    assert get_forward_backward_func(2, ps) is forward_backward_pipelining_with_interleaving
    assert get_forward_backward_func(None, ParallelState.single()) is \
        forward_backward_no_pipelining
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            ffn_hidden_size=64, tensor_model_parallel_size=2,
                            sequence_parallel=True)
    assert get_tensor_shape(cfg, 16, 3, ps) == (8, 3, 32)
    comm = P2PCommunicator((8, 3, 32), torch.float32, "cpu", ps)
    with pytest.raises(ValueError, match=r"sends an activation of shape \(16, 3, 32\)"):
        comm.communicate(send_next=torch.zeros(16, 3, 32))


def _worker(rank, world_size):
    torch.use_deterministic_algorithms(True)
    _unit_checks(rank, world_size)
    errors = []
    for name, (flags, layers, n_mb, parallel) in LAYOUTS.items():
        errors += _check_layout(name, flags, layers, n_mb, parallel, world_size)
    return errors


@pytest.fixture(scope="module")
def rel_errors():
    per_rank = run_distributed(_worker, 4, timeout=240)
    return [e for errors in per_rank for e in errors]


def test_pipeline_layouts_match_one_stage_model(rel_errors):
    names = {n.split(" ")[0] for n, _ in rel_errors}
    assert names == set(LAYOUTS), sorted(set(LAYOUTS) - names)
    for layout in LAYOUTS:  # losses, forward-only losses and grads were all compared
        checks = [n for n, _ in rel_errors if n.startswith(layout + " ")]
        assert any(" loss" in n for n in checks) and any(" grad " in n for n in checks), layout
        if "moe" in layout:
            assert any(" moe load_balancing_loss" in n for n in checks), layout
            assert any(" moe z_loss" in n for n in checks), layout
    bad = [(n, e) for n, e in rel_errors if not e <= 1e-5]
    assert not bad, bad


def test_interleaved_needs_micro_batches_multiple_of_pipeline_size():
    from moecore.arguments import parse_args, validate_args

    argv = (DENSE + " --num-layers 4 --pipeline-model-parallel-size 2 "
            "--num-layers-per-virtual-pipeline-stage 1 --global-batch-size 6").split()
    args = parse_args(argv, validate=False)
    with pytest.raises(ValueError, match=r"= 3\) to be a multiple of "
                                         r"--pipeline-model-parallel-size 2"):
        validate_args(args, world_size=2)
