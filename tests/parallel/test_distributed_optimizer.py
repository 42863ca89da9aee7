"""Distributed optimizer (ZeRO-1) on 4 gloo ranks.

For each layout - DP=4 (dense, tied embeddings; and bf16), DP=4 x EP=2 (expert-DP 2 differs from
DP), TP=2 x DP=2 with sequence parallel and MoE, PP=2 x DP=2 (tied weight split over stages),
PP=2 x DP=2 x EP=2 - the trainer's ``train_step`` runs three steps with plain AdamW and with
``--use-distributed-optimizer`` (with and without ``--overlap-grad-reduce``/
``--overlap-param-gather`` and small buckets) on the same global batches. Checked, fp32
rel err <= 1e-5:

* the fp32 main params and both Adam moments (the optimizer's per-parameter state, gathered over
  data parallel) equal plain AdamW's after three steps, and so do the model weights;
* loss and grad norm equal the single-process run of the same global batches (one norm across
  TP/PP/EP/DP, nothing counted twice);
* optimizer-state bytes per rank: Adam moments of ``numel / DP`` per dense and
  ``numel / expert-DP`` per expert parameter (plus bucket padding), against plain AdamW's full
  set; with overlap, buckets really start inside backward and all-gathers stay in flight until
  the next forward;
* the per-parameter state restores a fresh distributed optimizer and a plain one (format
  conversion both ways): two more steps match the uninterrupted run.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed

GBS, MBS, SEQ, STEPS = 8, 1, 16, 3
# adam-eps 1e-5: a gradient that is zero in exact arithmetic (the attention key bias) is ~1e-10
# noise whose value depends on the reduction order; Adam with eps 1e-8 would turn that noise
# into full-size, order-dependent steps on those elements.
COMMON = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
          "--seq-length 16 --max-position-embeddings 16 --mock-data --vocab-size 60 "
          f"--micro-batch-size {MBS} --global-batch-size {GBS} --lr 1e-2 --min-lr 1e-3 "
          "--lr-decay-style cosine --lr-warmup-iters 1 --train-iters 10 --clip-grad 0.5 "
          "--weight-decay 0.1 --adam-eps 1e-5 --hidden-dropout 0 --attention-dropout 0 "
          "--device cpu --seed 1234 --init-method-std 0.05 --num-workers 0 "
          "--make-vocab-size-divisible-by 32")
DENSE = COMMON + " --normalization LayerNorm --position-embedding-type learned_absolute"
MOE = COMMON + (" --position-embedding-type rope --normalization RMSNorm --swiglu "
                "--disable-bias-linear --untie-embeddings-and-output-weights --num-experts 4 "
                "--moe-router-topk 2 --moe-aux-loss-coeff 1e-2 --moe-ffn-hidden-size 32 "
                "--moe-grouped-gemm --moe-token-dispatcher-type alltoall")
VARIANTS = {
    "plain": "",
    "dist": "--use-distributed-optimizer",
    "dist_overlap": "--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather "
                    "--ddp-bucket-size 6000",
    "plain_overlap": "--overlap-grad-reduce --ddp-bucket-size 6000",
}
# name: (model flags, parallel flags, variants compared with plain AdamW, restore check)
LAYOUTS = {
    "dp4_dense": (DENSE, "", ("dist", "dist_overlap", "plain_overlap"), False),
    "dp4_dense_bf16": (DENSE + " --bf16", "", ("dist_overlap",), False),
    "dp4_ep2_moe": (MOE, "--expert-model-parallel-size 2", ("dist", "dist_overlap"), True),
    "tp2_dp2_sp_moe": (MOE, "--tensor-model-parallel-size 2 --sequence-parallel",
                       ("dist_overlap",), False),
    "pp2_dp2_dense": (DENSE, "--pipeline-model-parallel-size 2", ("dist_overlap",), True),
    "pp2_dp2_ep2_moe": (MOE, "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2",
                        ("dist_overlap",), False),
    # the precision-aware optimizer: bf16 Adam moments, sharded and restored
    "dp4_dense_bf16_moments": (DENSE + " --bf16 --use-precision-aware-optimizer --exp-avg-dtype "
                               "bf16 --exp-avg-sq-dtype bf16", "", ("dist", "dist_overlap"), True),
}
# Relative errors allowed per layout (default 1e-5). bf16 moments: another reduction order
# (the overlapped buckets) moves a gradient by fp32 ulps, which can round a moment to the
# neighbouring bf16 value (2^-8 relative) in a few elements.
TOLERANCE = {"dp4_dense_bf16_moments": 1e-3}


def _samples(n: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [{"tokens": torch.randint(0, vocab, (SEQ,), generator=g),
             "labels": torch.randint(0, vocab, (SEQ,), generator=g),
             "loss_mask": torch.ones(SEQ), "position_ids": torch.arange(SEQ)} for _ in range(n)]


def _iterator(samples, dp_rank: int, dp: int):
    """Megatron's sampler order: micro-batch ``i`` of a step is samples ``[i*mbs*dp +
    dp_rank*mbs, +mbs)`` of that step's global batch."""
    for step in range(len(samples) // GBS):
        batch = samples[step * GBS:(step + 1) * GBS]
        for i in range(GBS // (MBS * dp)):
            start = i * MBS * dp + dp_rank * MBS
            part = batch[start:start + MBS]
            yield {k: torch.stack([s[k] for s in part]) for k in part[0]}


def _setup(argv: str, world: int, ps=None):
    from moecore.arguments import parse_args
    from moecore.optimizer import OptimizerConfig, build_scheduler, get_megatron_optimizer
    from moecore.parallel_state import ParallelSizes, ParallelState
    from moecore.training import builders, initialize

    args = parse_args(argv.split(), world_size=world)
    builders.build_tokenizer_from_args(args)
    if ps is None:
        ps = ParallelState.single() if world == 1 else ParallelState.build(ParallelSizes(
            world_size=world, tp=args.tensor_model_parallel_size,
            pp=args.pipeline_model_parallel_size, ep=args.expert_model_parallel_size))
    initialize.set_seeds(args, ps)
    chunks = builders.build_model(args, ps)
    opt = get_megatron_optimizer(chunks, OptimizerConfig.from_args(args), ps)
    return args, ps, chunks, opt, build_scheduler(opt, args)


def _full_state(opt) -> list[dict]:
    from moecore.optimizer.distributed import FULL_STATE_FORMAT, plain_state_to_full

    sd = opt.state_dict()
    if sd.get("format") != FULL_STATE_FORMAT:
        sd = plain_state_to_full(sd, opt.model_params)
    return sd["params"]


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _train(args, ps, chunks, opt, sched, it, steps):
    from moecore.training import train_step

    return [train_step(chunks, opt, sched, it, args, ps) for _ in range(steps)]


def _check_layout(name, world, samples, ref):
    flags, parallel, variants, restore = LAYOUTS[name]
    errors, runs = [], {}
    # bf16: the single-process comparison sees bf16 rounding of the weights (rel ~1e-3).
    vs_single = 1e-3 if "bf16" in name else 1.0
    for variant in ("plain", *variants):
        argv = f"{flags} {parallel} {VARIANTS[variant]}"
        args, ps, chunks, opt, sched = _setup(argv, world)
        it = _iterator(samples, ps.dp_rank, ps.dp_size)
        outs = _train(args, ps, chunks, opt, sched, it, STEPS)
        if "overlap" in variant:  # buckets really started inside backward
            gs = opt.grad_sync
            n_buckets = sum(len(b) for b in gs.chunk_buckets)
            assert n_buckets > 1 and gs.launched_during_backward >= STEPS, (name, variant)
        if variant == "dist_overlap":  # the all-gathers run until the next forward needs them
            assert any(b.gather_handle is not None for bs in opt.grad_sync.chunk_buckets
                       for b in bs) or ps.dp_size == 1, name
        runs[variant] = dict(argv=argv, args=args, ps=ps, chunks=chunks, opt=opt, sched=sched,
                             it=it)
        for i, (o, r) in enumerate(zip(outs, ref)):
            for key in ("lm loss", "grad_norm"):
                errors.append((f"{name} {variant} step{i} {key} vs single", vs_single * _rel(
                    torch.tensor(o[key]), torch.tensor(r[key]))))
    plain = _full_state(runs["plain"]["opt"])
    plain_weights = [p.detach().clone() for c in runs["plain"]["chunks"] for p in c.parameters()]
    for variant in variants:
        got = _full_state(runs[variant]["opt"])
        assert len(got) == len(plain)
        for i, (a, b) in enumerate(zip(got, plain)):
            for k in ("main", "exp_avg", "exp_avg_sq"):
                errors.append((f"{name} {variant} param{i} {k}", _rel(a[k], b[k])))
        runs[variant]["opt"].sync_params()
        weights = [p for c in runs[variant]["chunks"] for p in c.parameters()]
        for i, (a, b) in enumerate(zip(weights, plain_weights)):
            errors.append((f"{name} {variant} weight{i}", _rel(a, b)))
    dist_run = runs.get("dist") or runs["dist_overlap"]
    errors += _check_memory(name, runs["plain"], dist_run)
    if restore:
        errors += _check_restore(name, dist_run, runs["plain"]["argv"])
    return errors


def _check_memory(name, plain_run, dist_run):
    """Adam moments per rank: each parameter's ``numel / (its data-parallel group size)``."""
    from moecore.optimizer.clip_grads import is_expert_param

    plain, dist_opt = plain_run["opt"].state_bytes(), dist_run["opt"].state_bytes()
    ps = dist_run["ps"]
    dp, edp = ps.world_size_of("data_parallel_with_cp"), ps.edp_size
    params = dist_run["opt"].model_params
    per = plain_run["opt"]._moment_bytes()  # 8 for fp32 moments, 4 for bf16 ones
    expected = per * sum(p.numel() / (edp if is_expert_param(p) else dp) for p in params)
    assert plain["adam_moments"] == per * sum(p.numel() for p in params)
    got = dist_opt["adam_moments"]
    # Bucket padding goes to the last ranks' slices; it is at most dp - 1 elements per bucket.
    assert abs(got - expected) <= per * dp * 8, (name, got, expected)
    assert dist_opt["total"] < plain["total"] and got <= plain["adam_moments"] / min(dp, edp) \
        + per * dp * 8, (name, dist_opt, plain)
    return [(f"{name} memory ratio {got / plain['adam_moments']:.3f} (dp={dp}, edp={edp})", 0.0)]


def _check_restore(name, run, plain_argv):
    """Per-parameter state -> fresh distributed and plain optimizers; two more steps each."""
    args, ps, chunks, opt, sched = (run[k] for k in ("args", "ps", "chunks", "opt", "sched"))
    state, sched_state = opt.state_dict(), sched.state_dict()
    model_states = [{k: v.clone() for k, v in c.state_dict().items()} for c in chunks]
    left = list(run["it"])
    cont = _train(args, ps, chunks, opt, sched, iter(left), 2)
    opt.sync_params()
    want = [p.detach().clone() for c in chunks for p in c.parameters()]
    errors = []
    for variant, argv in (("dist", run["argv"]), ("plain", plain_argv)):
        args2, _, chunks2, opt2, sched2 = _setup(argv, ps.sizes.world_size, ps)
        for c, sd in zip(chunks2, model_states):
            c.load_state_dict(sd)
        opt2.load_state_dict(state)
        sched2.load_state_dict(sched_state)
        outs = _train(args2, ps, chunks2, opt2, sched2, iter(left), 2)
        opt2.sync_params()
        got = [p for c in chunks2 for p in c.parameters()]
        for i, (a, b) in enumerate(zip(got, want)):
            errors.append((f"{name} restore {variant} weight{i}", _rel(a, b)))
        for o, r in zip(outs, cont):
            errors.append((f"{name} restore {variant} loss", _rel(
                torch.as_tensor(o["lm loss"]), torch.as_tensor(r["lm loss"]))))
    return errors


def _worker(rank, world_size):
    torch.use_deterministic_algorithms(True)
    samples = _samples(GBS * (STEPS + 2), 60)
    refs, errors = {}, []
    for name, (flags, *_) in LAYOUTS.items():
        if flags not in refs:  # the single-process run of the same global batches
            single = _setup(flags, 1)
            refs[flags] = _train(*single, _iterator(samples, 0, 1), STEPS)
        errors += _check_layout(name, world_size, samples, refs[flags])
    return errors


@pytest.fixture(scope="module")
def rel_errors():
    per_rank = run_distributed(_worker, 4, timeout=300)
    return [e for errors in per_rank for e in errors]


def test_distributed_optimizer_matches_adamw_in_every_layout(rel_errors):
    for layout, (_, _, variants, restore) in LAYOUTS.items():
        names = [n for n, _ in rel_errors if n.startswith(layout + " ")]
        wanted = [f"{v} param" for v in variants] + ["grad_norm vs single", "memory ratio"]
        wanted += ["restore dist", "restore plain"] if restore else []
        for what in wanted:
            assert any(what in n for n in names), (layout, what)
    bad = [(n, e) for n, e in rel_errors if not e <= TOLERANCE.get(n.split()[0], 1e-5)]
    assert not bad, bad
