"""Context parallelism in the trainer on gloo: ``train_step`` at CP=2 and CP=4, every
``--cp-comm-type``, alone and with TP=2 + SP, PP=2, EP=2 and the distributed optimizer, equals
the single-process run of the same global batches: the loss and the gradient norm of every step
(fp32, rel err <= 1e-5; the norm of the whole model's gradient catches a wrong or missing
gradient anywhere) and, where no parameter is split, every weight after the last step. Then a
checkpoint saved under CP=2 resumes under CP=1 and continues with the same losses."""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed

GBS, MBS, SEQ, STEPS = 4, 1, 16, 3
COMMON = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-query-groups 2 "
          f"--ffn-hidden-size 64 --seq-length {SEQ} --max-position-embeddings {SEQ} "
          f"--mock-data --vocab-size 60 --micro-batch-size {MBS} --global-batch-size {GBS} "
          "--lr 1e-2 --min-lr 1e-3 --lr-decay-style cosine --lr-warmup-iters 1 "
          "--train-iters 10 --clip-grad 0.5 --weight-decay 0.1 --adam-eps 1e-5 "
          "--hidden-dropout 0 --attention-dropout 0 --device cpu --seed 1234 "
          "--init-method-std 0.05 --num-workers 0 --make-vocab-size-divisible-by 32 "
          "--position-embedding-type rope --normalization RMSNorm --swiglu "
          "--disable-bias-linear --untie-embeddings-and-output-weights")
DENSE = COMMON
MOE = COMMON + (" --num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 1e-2 "
                "--moe-ffn-hidden-size 32 --moe-grouped-gemm "
                "--moe-token-dispatcher-type alltoall")
# name: (model, parallel flags, compare weights); the world size is the product of the sizes.
LAYOUTS = {
    2: {
        "cp2_p2p_dense": (DENSE, "--context-parallel-size 2 --cp-comm-type p2p", True),
        "cp2_all_gather_moe": (MOE, "--context-parallel-size 2 --cp-comm-type all_gather",
                               True),
        "cp2_a2a_moe": (MOE, "--context-parallel-size 2 --cp-comm-type a2a", True),
        "cp2_p2p_moe_per_token": (MOE, "--context-parallel-size 2 --calculate-per-token-loss",
                                  True),
    },
    4: {
        "cp4_p2p_moe": (MOE, "--context-parallel-size 4 --cp-comm-type p2p", True),
        "cp4_all_gather_dense": (DENSE, "--context-parallel-size 4 --cp-comm-type all_gather",
                                 True),
        "cp4_a2a_dense": (DENSE, "--context-parallel-size 4 --cp-comm-type a2a "
                          "--num-query-groups 4", True),
        "cp2_tp2_sp_moe": (MOE, "--context-parallel-size 2 --tensor-model-parallel-size 2 "
                           "--sequence-parallel", False),
        "cp2_pp2_dense": (DENSE, "--context-parallel-size 2 --pipeline-model-parallel-size 2",
                          False),
        "cp2_ep2_moe_distopt": (MOE, "--context-parallel-size 2 --expert-model-parallel-size 2 "
                                "--use-distributed-optimizer", False),
        "cp2_dp2_a2a_moe_distopt": (MOE, "--context-parallel-size 2 --cp-comm-type a2a "
                                    "--use-distributed-optimizer --overlap-grad-reduce", False),
    },
}


def _samples(n: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [{"tokens": torch.randint(0, vocab, (SEQ,), generator=g),
             "labels": torch.randint(0, vocab, (SEQ,), generator=g),
             "loss_mask": (torch.rand(SEQ, generator=g) > 0.2).float(),
             "position_ids": torch.arange(SEQ)} for _ in range(n)]


def _iterator(samples, dp_rank: int, dp: int):
    for step in range(len(samples) // GBS):
        batch = samples[step * GBS:(step + 1) * GBS]
        for i in range(GBS // (MBS * dp)):
            part = batch[i * MBS * dp + dp_rank * MBS:][:MBS]
            yield {k: torch.stack([s[k] for s in part]) for k in part[0]}


def _setup(argv: str, world: int):
    from moecore.arguments import parse_args
    from moecore.optimizer import OptimizerConfig, build_scheduler, get_megatron_optimizer
    from moecore.parallel_state import ParallelSizes, ParallelState
    from moecore.training import builders, initialize

    args = parse_args(argv.split(), world_size=world)
    builders.build_tokenizer_from_args(args)
    ps = ParallelState.single() if world == 1 else ParallelState.build(ParallelSizes(
        world_size=world, tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size, ep=args.expert_model_parallel_size,
        cp=args.context_parallel_size))
    initialize.set_seeds(args, ps)
    chunks = builders.build_model(args, ps)
    opt = get_megatron_optimizer(chunks, OptimizerConfig.from_args(args), ps)
    return args, ps, chunks, opt, build_scheduler(opt, args)


def _train(run, it, steps):
    from moecore.training import train_step

    args, ps, chunks, opt, sched = run
    return [train_step(chunks, opt, sched, it, args, ps) for _ in range(steps)]


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _weights(run) -> list[torch.Tensor]:
    if hasattr(run[3], "sync_params"):
        run[3].sync_params()
    return [p.detach().clone() for c in run[2] for p in c.parameters()]


def _check_resume(world, samples, ref_run_flags, tmp):
    """Save under CP=2 after STEPS steps, load under CP=1 (a single process on rank 0 only is
    not possible inside the spawn, so every rank loads at CP=1 x DP=world): two more steps
    equal the uninterrupted single-process run."""
    from moecore.checkpointing import CheckpointConfig, load_checkpoint, save_checkpoint

    flags = f"{ref_run_flags} --context-parallel-size 2 --save {tmp} --load {tmp}"
    run = _setup(flags, 2)
    it = _iterator(samples, run[1].dp_rank, run[1].dp_size)
    _train(run, it, STEPS)
    save_checkpoint(STEPS, run[2], run[3], run[4], CheckpointConfig.from_args(run[0]),
                    parallel_state=run[1])
    # CP=1 at world 2 is DP=2: same global batches, resharded only over data parallel.
    resumed = _setup(f"{ref_run_flags} --load {tmp}", 2)
    load_checkpoint(resumed[2], resumed[3], resumed[4], CheckpointConfig.from_args(resumed[0]),
                    parallel_state=resumed[1])
    it2 = _iterator(samples[STEPS * GBS:], resumed[1].dp_rank, resumed[1].dp_size)
    return [o["lm loss"] for o in _train(resumed, it2, 2)]


def _worker(rank, world, tmp):
    torch.use_deterministic_algorithms(True)
    samples = _samples(GBS * (STEPS + 2), 60)
    refs, errors = {}, []
    for name, (model, parallel, weights) in LAYOUTS[world].items():
        extra = " --calculate-per-token-loss" if "per_token" in name else ""
        extra += " --num-query-groups 4" if "num-query-groups 4" in parallel else ""
        key = model + extra
        if key not in refs:
            single = _setup(key, 1)
            refs[key] = (single, _train(single, _iterator(samples, 0, 1), STEPS + 2))
        single, ref = refs[key]
        run = _setup(f"{model} {parallel}", world)
        outs = _train(run, _iterator(samples, run[1].dp_rank, run[1].dp_size), STEPS)
        for i, (o, r) in enumerate(zip(outs, ref)):
            for k in ("lm loss", "grad_norm"):
                errors.append((f"{name} step{i} {k}", _rel(o[k], r[k])))
        if weights:
            ref_run = _setup(key, 1)  # STEPS steps only, for the weights
            _train(ref_run, _iterator(samples, 0, 1), STEPS)
            for i, (a, b) in enumerate(zip(_weights(run), _weights(ref_run))):
                errors.append((f"{name} weight{i}", _rel(a, b)))
    if world == 2:
        losses = _check_resume(world, samples, MOE, tmp)
        ref = refs[MOE][1][STEPS:STEPS + 2]
        for i, (a, b) in enumerate(zip(losses, ref)):
            errors.append((f"resume cp2->cp1 step{i} lm loss", _rel(a, b["lm loss"])))
    return errors


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def rel_errors(request, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp(f"cp{request.param}"))
    per_rank = run_distributed(_worker, request.param, tmp, timeout=420)
    return request.param, [e for errors in per_rank for e in errors]


def test_context_parallel_matches_the_single_process_run(rel_errors):
    world, errors = rel_errors
    for name in LAYOUTS[world]:
        mine = [e for n, e in errors if n.startswith(name + " ")]
        assert len(mine) >= 2 * STEPS, (name, len(mine))
    if world == 2:
        assert sum(n.startswith("resume") for n, _ in errors) == 2 * world
    bad = [(n, e) for n, e in errors if not e <= 1e-5]
    assert not bad, bad
