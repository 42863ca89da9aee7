"""``pretrain``: Megatron-style training loop (micro-batches, grad sync, clip, step, schedule,
logging, evaluation, checkpoints)."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from moecore import parallel_state as mpu
from moecore.arguments import parse_args
from moecore.arguments.checkpoint_args import check_checkpoint_args
from moecore.batch_rampup import batch_sizes_from_args
from moecore.checkpointing import (
    CheckpointConfig,
    finalize_async_save,
    load_checkpoint,
    maybe_finalize_async_save,
    publish_completed_async_save,
    save_checkpoint,
)
from moecore.checkpointing.guards import (
    check_no_overwrite,
    check_save_writable,
    on_rank0,
    saved_run_args,
)
from moecore.checkpointing.run_lock import RunLock, acquire_run_lock
from moecore.collectives import all_reduce_inplace, collective_failure, group_size
from moecore.fp8.scaling import WeightCache
from moecore.moe.losses import MoELossTracker
from moecore.moe.router import TopKRouter, update_expert_bias
from moecore.optimizer import (
    MegatronOptimizer,
    OptimizerConfig,
    build_scheduler,
    finalize_model_grads,
    get_megatron_optimizer,
)
from moecore.parallel_state import ParallelState
from moecore.pipeline_parallel import get_forward_backward_func, make_data_iterators
from moecore.training import builders, initialize
from moecore.training.cuda_graph import MicroBatchGraphs
from moecore.training.logger import print_rank_0
from moecore.training.profiling import TrainingProfiler
from moecore.training.state import RunState
from moecore.transformer.context_parallel import zigzag_split


def _chunks(model) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def masked_mean_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``sum(loss * mask) / sum(mask)`` over a micro-batch, in fp32 (``[B, S]`` inputs)."""
    mask = loss_mask.float()
    return (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)


def model_output(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-token loss ``[B, S]`` of one micro-batch (``tokens``/``labels``/``position_ids``); on a
    pipeline stage without the output layer, its hidden states for the next stage. A model with
    multi-token prediction (``mtp_num_layers``) also gets the ``loss_mask``."""
    extra = {}
    if getattr(getattr(model, "config", None), "mtp_num_layers", None):
        extra["loss_mask"] = batch["loss_mask"]
    return model(batch["tokens"], batch.get("position_ids"), attention_mask=None,
                 labels=batch["labels"], **extra)


def context_parallel_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor,
                          cp_group) -> torch.Tensor:
    """This CP rank's share of the micro-batch's masked mean loss, ``sum_local(loss * mask) /
    sum_CP(mask)``: the shares of the CP group add up to the whole sequence's loss. Gradients
    are averaged over ``data_parallel_with_cp``, so the trainer scales every backward by CP
    (:func:`_context_parallel_grad_scale`)."""
    mask = loss_mask.float()
    tokens = all_reduce_inplace(mask.sum(), cp_group)
    return (per_token_loss.float() * mask).sum() / tokens.clamp(min=1.0)


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor, cp_group=None):
    if cp_group is None:
        loss = masked_mean_loss(output, loss_mask)
        return loss, {"lm loss": loss.detach()}
    loss = context_parallel_loss(output, loss_mask, cp_group)
    # Logged as share x CP: the data_parallel_with_cp mean of the log is the sequence's loss.
    return loss, {"lm loss": loss.detach() * group_size(cp_group)}


def forward_step_func(data_iterator, model: nn.Module, cp_group=None):
    """Megatron-style step for the schedules: ``(output, loss_func)`` of the next micro-batch
    (``cp_group``: the context-parallel group when it has more than one rank)."""
    batch = next(data_iterator)
    return model_output(model, batch), partial(_loss_func, batch["loss_mask"],
                                               cp_group=cp_group)


def context_parallel_batch(batch: dict, ps: ParallelState) -> dict:
    """This CP rank's tokens of a micro-batch of ``[B, S]`` tensors (chunks ``r`` and
    ``2 CP - 1 - r`` of ``2 CP``, :func:`~moecore.transformer.context_parallel.zigzag_split`),
    with their global ``position_ids`` (for RoPE)."""
    if ps.cp_size == 1:
        return batch
    cp, r = ps.cp_size, ps.rank_in("context_parallel")
    batch = dict(batch)
    if batch.get("position_ids") is None:
        B, S = batch["tokens"].shape
        batch["position_ids"] = torch.arange(S, device=batch["tokens"].device).expand(B, S)
    return {k: zigzag_split(v, cp, r, dim=1) if isinstance(v, torch.Tensor) and v.dim() == 2
            else v for k, v in batch.items()}


def _token_sum_loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """``--calculate-per-token-loss``: the masked loss *sum* (the schedule's grad-scale function
    divides it by the global batch's token count) and ``(sum, tokens)`` for the log."""
    mask = loss_mask.float()
    total = (output.float() * mask).sum()
    return total, {"lm loss": total.detach(), "tokens": mask.sum()}


def per_token_forward_step_func(data_iterator, model: nn.Module):
    """:func:`forward_step_func` for ``--calculate-per-token-loss``."""
    batch = next(data_iterator)
    return model_output(model, batch), partial(_token_sum_loss_func, batch["loss_mask"])


def _per_token_grad_scale(batches: list[dict], ps: ParallelState, scale_loss: Callable):
    """``--calculate-per-token-loss`` (Megatron's): the loss is the sum over the global batch's
    unmasked tokens divided by their number ``N`` (over all micro-batches and data-parallel
    ranks), not a mean of per-micro-batch means. The schedules divide each micro-batch's loss by
    ``num_microbatches`` and data parallelism averages gradients, so the loss-scale function
    the schedule applies multiplies by ``num_microbatches * dp / N``. The MoE aux losses take
    the same factor (``set_aux_loss_scale`` calls it), as in Megatron, where every gradient is
    divided by ``N`` in this mode. No host sync: ``N`` stays on the device."""
    tokens = torch.stack([b["loss_mask"].float().sum() for b in batches]).sum()
    dp_group = ps.group("data_parallel_with_cp")
    all_reduce_inplace(tokens, dp_group)
    dp = group_size(dp_group)
    factor = len(batches) * dp / tokens.clamp(min=1.0)
    return lambda t: scale_loss(t) * factor.to(t.device)


def _context_parallel_grad_scale(cp_size: int, scale_loss: Callable):
    """The loss-scale function times CP: each CP rank's loss (LM and MoE aux losses) is its
    share of the micro-batch's, and gradients are averaged over the CP ranks too."""
    return lambda t: scale_loss(t) * cp_size


class DataRanOut(RuntimeError):
    """The data iterator stopped before the run needed it to."""


class StartupError(ValueError):
    """A user mistake found while building the run (tokenizer, datasets); ``pretrain_gpt.py``
    prints it as one line."""


def _user_step(what: str, build: Callable, *args):
    """``build(*args)``, its input errors (bad paths, names, files) as :class:`StartupError`."""
    try:
        return build(*args)
    except (ValueError, OSError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StartupError(f"{what}: {first}") from e


def _next_batches(data_iterator, n: int, device: torch.device, what: str) -> list[dict]:
    batches = []
    for _ in range(n):
        try:
            batches.append(builders.batch_to_device(next(data_iterator), device))
        except StopIteration:
            raise DataRanOut(what) from None
    return batches


_TRAIN_DATA_RAN_OUT = ("the training data ran out before --train-iters/--train-samples was "
                       "reached; the dataset is smaller than the run")


class BatchPrefetcher:
    """The training iterator, one iteration ahead: :meth:`prefetch` fetches the next
    iteration's micro-batches (to the device) while the GPU still runs this one's
    forward-backward, so the host does not fetch them after the optimizer's sync while the GPU
    waits. Running out of data is reported by the :meth:`take` that needs the batches.
    Prefetched batches are not counted as consumed: a checkpoint resumes from the run's
    ``consumed_train_samples``."""

    def __init__(self, data_iterator, device: torch.device):
        self.data_iterator, self.device = data_iterator, device
        self.ready: list[dict] | None = None
        self.ran_out = False

    def prefetch(self, n: int) -> None:
        if not self.ready and not self.ran_out:
            try:
                self.ready = _next_batches(self.data_iterator, n, self.device, "")
            except DataRanOut:
                self.ran_out = True

    def take(self, n: int) -> list[dict]:
        """This iteration's ``n`` micro-batches, in data order whatever was prefetched (a batch
        size ramp-up changes ``n`` between iterations)."""
        ready, self.ready = self.ready or [], None
        if len(ready) > n:  # keep the rest, in order, for the next iteration
            ready, self.ready = ready[:n], ready[n:]
        if len(ready) < n:
            if self.ran_out:
                raise DataRanOut(_TRAIN_DATA_RAN_OUT)
            ready += _next_batches(self.data_iterator, n - len(ready), self.device,
                                   _TRAIN_DATA_RAN_OUT)
        return ready


def _last_stage_mean(store: list[dict], ps: ParallelState, device) -> torch.Tensor:
    """Mean ``lm loss`` of the last stage's micro-batches, on every pipeline stage."""
    if ps.is_pipeline_last_stage():
        value = torch.stack([d["lm loss"].float() for d in store]).mean()
    else:
        value = torch.zeros((), dtype=torch.float32, device=device)
    all_reduce_inplace(value, ps.pp_group)  # the other stages contribute zeros
    return value


def _reported_loss(store: list[dict], ps: ParallelState, device,
                   per_token: bool = False) -> torch.Tensor:
    """The logged ``lm loss`` (every rank, collective): the data-parallel mean of
    :func:`_last_stage_mean`, or with ``per_token`` (``--calculate-per-token-loss``: entries
    hold ``tokens``) the loss sum over all micro-batches and data-parallel ranks divided by
    their token count. Every pipeline stage must pass the same ``per_token``."""
    if not per_token:
        return all_reduce_inplace(_last_stage_mean(store, ps, device),
                                  ps.group("data_parallel_with_cp"), average=True)
    value = torch.zeros(2, dtype=torch.float32, device=device)
    if ps.is_pipeline_last_stage():
        value = torch.stack([torch.stack([d["lm loss"].float(), d["tokens"].float()])
                             for d in store]).sum(0)
    all_reduce_inplace(value, ps.pp_group)
    all_reduce_inplace(value, ps.group("data_parallel_with_cp"))
    return value[0] / value[1].clamp(min=1.0)


def _run_schedule(chunks, batches, args, ps, forward_only, optimizer=None) -> list[dict]:
    schedule = get_forward_backward_func(args.virtual_pipeline_model_parallel_size, ps)
    per_token = args.calculate_per_token_loss
    batches = [context_parallel_batch(b, ps) for b in batches]
    step_func = per_token_forward_step_func if per_token else forward_step_func
    if ps.cp_size > 1 and not per_token:
        step_func = partial(forward_step_func, cp_group=ps.cp_group)
    grad_scale_func = None if optimizer is None else optimizer.scale_loss
    if per_token and grad_scale_func is not None:
        grad_scale_func = _per_token_grad_scale(batches, ps, grad_scale_func)
    elif ps.cp_size > 1 and grad_scale_func is not None:
        grad_scale_func = _context_parallel_grad_scale(ps.cp_size, grad_scale_func)
    return schedule(
        forward_step_func=step_func, data_iterator=make_data_iterators(batches, len(chunks)),
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches),
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        forward_only=forward_only, parallel_state=ps, grad_scale_func=grad_scale_func,
        grad_sync=None if optimizer is None else getattr(optimizer, "grad_sync", None))


class PhaseTimer:
    """CUDA events at the phase boundaries of one iteration (recording them does not sync);
    :meth:`elapsed_ms` reads them once the caller has synchronised. A no-op off CUDA."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self.marks: list[tuple[str, torch.cuda.Event]] = []

    def mark(self, name: str) -> None:
        """End the phase ``name`` (the first mark starts the clock)."""
        if self.enabled:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))

    def elapsed_ms(self) -> dict[str, float]:
        """``{phase: ms}`` between consecutive marks (GPU timeline, idle gaps included)."""
        return {name: start.elapsed_time(end)
                for (_, start), (name, end) in zip(self.marks, self.marks[1:])}


def train_step(model, optimizer: MegatronOptimizer, scheduler, data_iterator,
               args, ps: ParallelState, graphs: MicroBatchGraphs | None = None,
               num_microbatches: int | None = None, global_batch_size: int | None = None
               ) -> dict:
    """One iteration over ``num_microbatches`` micro-batches of a ``global_batch_size`` batch
    (default: ``args``'; under ``--rampup-batch-size`` the loop passes each step's).

    ``model`` is a module or this rank's list of pipeline model chunks; ``data_iterator``
    yields micro-batches, or is a :class:`BatchPrefetcher` (``pretrain``'s), which this step
    asks for the next iteration's batches once the forward-backward is queued. The schedule
    (no pipelining, 1F1B or interleaved; :func:`get_forward_backward_func`) back-propagates each
    micro-batch's masked-mean loss ``/ num_microbatches`` (times the fp16 loss scale), so
    gradients are the mean over the global batch; MoE aux losses reach each stage's routers
    through :class:`MoEAuxLossAutoScaler` with the same scaling. Returns ``{"lm loss": DP-mean
    loss (a 0-dim device tensor: reading it waits for the step), "grad_norm", "updated", "lr",
    "timer"}`` (the same on every rank; ``timer`` is the step's :class:`PhaseTimer`).
    With ``graphs`` (``--cuda-graph-impl local``) each micro-batch's forward-backward is a
    replayed CUDA graph after the warm-up iterations.
    """
    n = args.num_microbatches if num_microbatches is None else num_microbatches
    global_batch_size = args.global_batch_size if global_batch_size is None else global_batch_size
    chunks = _chunks(model)
    device = torch.device(args.device)
    timer = PhaseTimer(device)
    timer.mark("start")
    for c in chunks:
        c.train()
    prefetcher = data_iterator if isinstance(data_iterator, BatchPrefetcher) else None
    if prefetcher is not None:
        batches = prefetcher.take(n)
    else:
        batches = _next_batches(data_iterator, n, device, _TRAIN_DATA_RAN_OUT)
    optimizer.zero_grad()
    MoELossTracker.clear()
    timer.mark("batch")
    if graphs is None:
        store = _run_schedule(chunks, batches, args, ps, forward_only=False, optimizer=optimizer)
    else:
        store = graphs.run(batches, forward_step_func,
                           partial(_run_schedule, chunks, batches, args, ps, False, optimizer),
                           optimizer.scale_loss)
    if prefetcher is not None:  # the GPU is busy with this iteration: fetch the next one
        prefetcher.prefetch(n)
    timer.mark("forward-backward")
    finalize_model_grads(chunks, ps, getattr(optimizer, "grad_sync", None))
    timer.mark("grad-sync")
    updated, grad_norm = optimizer.step()
    WeightCache.weights_changed()
    timer.mark("optimizer")
    if args.num_experts is not None and args.moe_router_enable_expert_bias:
        update_expert_bias([m for c in chunks for m in c.modules()
                            if isinstance(m, TopKRouter)], ps)
    if updated:
        scheduler.step(increment=global_batch_size)
    lm_loss = _reported_loss(store, ps, device, args.calculate_per_token_loss)
    timer.mark("other")
    return {"lm loss": lm_loss.detach(), "grad_norm": grad_norm, "updated": updated,
            "lr": optimizer.param_groups[0]["lr"], "timer": timer,
            "num_zeros": getattr(optimizer, "num_zeros_in_grad", None) if updated else None}


@torch.no_grad()
def evaluate(model, data_iterator, args, ps: ParallelState, num_iters: int | None = None,
             graphs: MicroBatchGraphs | None = None, num_microbatches: int | None = None,
             global_batch_size: int | None = None) -> tuple[dict[str, float], int]:
    """Mean masked loss over ``num_iters`` (``--eval-iters``) global batches of
    ``num_microbatches`` micro-batches (default: ``args``'; the training step's under a batch
    ramp); returns ``({"lm loss": value}, samples consumed)``. With ``graphs`` the forwards are
    replays of one CUDA graph (after the run's first evaluation iteration, which warms up
    eagerly)."""
    num_iters = args.eval_iters if num_iters is None else num_iters
    n = args.num_microbatches if num_microbatches is None else num_microbatches
    global_batch_size = args.global_batch_size if global_batch_size is None else global_batch_size
    chunks = _chunks(model)
    device = torch.device(args.device)
    for c in chunks:
        c.eval()
    store: list[dict] = []
    for _ in range(num_iters):
        batches = _next_batches(data_iterator, n, device,
                                "the validation data ran out; raise the valid share of "
                                "--split or lower --eval-iters")
        if graphs is None:
            store += _run_schedule(chunks, batches, args, ps, forward_only=True)
        else:
            store += graphs.run(batches, forward_step_func,
                                partial(_run_schedule, chunks, batches, args, ps, True),
                                forward_only=True)
    MoELossTracker.clear()  # eval forwards must not leak into the next training log
    for c in chunks:
        c.train()
    per_token = args.calculate_per_token_loss
    mean = _reported_loss(store, ps, device, per_token) if num_iters else torch.zeros(())
    return {"lm loss": mean.item()}, num_iters * global_batch_size


def _build(args, ps, model_provider):
    tokenizer = _user_step("tokenizer", builders.build_tokenizer_from_args, args)
    model = builders.build_model(args, ps, model_provider)
    optimizer = get_megatron_optimizer(model, OptimizerConfig.from_args(args), ps)
    scheduler = build_scheduler(optimizer, args)
    return tokenizer, model, optimizer, scheduler


def pretrain(args: argparse.Namespace | list[str] | None = None,
             model_provider: Callable | None = None,
             log: Callable[[str], None] = print_rank_0) -> dict:
    """Train a GPT model from Megatron flags (``args`` parsed, or an argv list, or ``sys.argv``).

    ``model_provider(config, args, parallel_state) -> nn.Module`` replaces the default
    ``GPTModel``; its forward must take ``(tokens, position_ids, attention_mask=None,
    labels=...)`` and return the per-token loss ``[B, S]``. With pipeline parallelism it is
    called once per model chunk with the keywords ``pre_process``, ``post_process``,
    ``layer_offset``, ``num_layers``, and a chunk without ``post_process`` returns its hidden
    states (and takes its input through ``set_input_tensor``). Initialises ``torch.distributed``
    from the torchrun environment when needed, and the process groups; tears down what it
    created. Returns a summary: ``iterations``, ``lm_loss``, ``grad_norm``, ``lr`` per trained
    iteration, ``val_loss`` ``{iteration: loss}``, ``test_loss``, ``tokens_per_sec``, ``mfu``,
    ``start_iteration``, ``final_iteration``.
    """
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    if args.logging_level is not None:
        logging.getLogger().setLevel(args.logging_level)
    created_pg = initialize.initialize_distributed(args)
    ps = initialize.initialize_parallel_state_from_args(args)
    run = lock = None
    try:
        lock = on_rank0(_lock_save_dir, args.save, log) if args.save else None
        initialize.set_seeds(args, ps)
        tokenizer, model, optimizer, scheduler = _build(args, ps, model_provider)
        run = RunState(args, ps, model, optimizer, log)
        checkpoints = CheckpointConfig.from_args(args)
        loaded = None
        if args.load:
            on_rank0(lambda: check_checkpoint_args(args, saved_run_args(args.load), args.load))
            loaded = load_checkpoint(model, optimizer, scheduler, checkpoints, ps)
            if loaded is not None:
                run.restore(loaded)
        # This loop owns the optimizer: FP8 weights are quantised once per step (weights_changed
        # after each optimizer step), not once per micro-batch. Not under CUDA graphs: every
        # replay runs the casts it captured, and cached copies would only hold memory.
        WeightCache.enable(bool(args.fp8) and args.cuda_graph_impl != "local")
        if not args.skip_train:
            on_rank0(check_no_overwrite, checkpoints, run.start_iteration, loaded is not None)
        run.log_startup(tokenizer)
        train_ds, valid_ds, test_ds = _user_step("data", builders.build_datasets, args, tokenizer)
        train_it = builders.make_iterator(train_ds, args, run.consumed_train_samples, ps)
        valid_it = builders.make_iterator(valid_ds, args, run.consumed_valid_samples, ps)
        exited = False
        graphs = None
        if args.cuda_graph_impl == "local":
            graphs = MicroBatchGraphs(model, args.cuda_graph_warmup_steps)
            run.log(f" > CUDA graphs: each micro-batch's forward-backward (and evaluation "
                    f"forward) is captured after {args.cuda_graph_warmup_steps} eager "
                    "iterations and replayed")
        if not args.skip_train:
            exited = _train(run, model, optimizer, scheduler, train_it, valid_it, args, ps,
                            graphs, checkpoints)
        if not exited:  # --exit-interval/--exit-duration-in-mins stop right after the save
            _final_evals(run, model, valid_it, test_ds, args, ps, graphs)
        return run.summary()
    except RuntimeError as exc:  # name the group/op of a collective that timed out or lost a peer
        failure = collective_failure(exc, args.distributed_timeout_minutes)
        if failure is None:
            raise
        raise failure from exc
    finally:
        WeightCache.enable(False)
        if run is not None:
            run.close()
        mpu.destroy_model_parallel()
        if created_pg:
            dist.destroy_process_group()
        if lock is not None:
            lock.release()


def _lock_save_dir(save: str, log: Callable[[str], None]) -> RunLock:
    """``--save`` checked writable and locked for this run (rank 0; see ``run_lock``)."""
    check_save_writable(save)
    return acquire_run_lock(save, warn=log)


def _train(run: RunState, model, optimizer, scheduler, train_it, valid_it, args, ps,
           graphs: MicroBatchGraphs | None, checkpoints: CheckpointConfig) -> bool:
    """Iterate to ``--train-iters``; True when an exit condition stopped the run early."""
    profiler = TrainingProfiler(args) if args.profile or args.record_memory_history else None
    try:
        exited = _train_iterations(run, model, optimizer, scheduler, train_it, valid_it, args,
                                   ps, graphs, profiler, checkpoints)
    except BaseException:  # NaN check, errors, interrupts: publish an --async-save if complete
        published = publish_completed_async_save()  # no collectives: a rank may be gone
        if published is not None:
            run.log(f"published the --async-save checkpoint of iteration {published} on abort")
        raise
    finally:
        if profiler is not None:
            profiler.close()
    finalize_async_save()  # --async-save: the last checkpoint becomes the latest (collective)
    return exited


def _train_iterations(run: RunState, model, optimizer, scheduler, train_it, valid_it, args, ps,
                      graphs: MicroBatchGraphs | None, profiler: TrainingProfiler | None,
                      checkpoints: CheckpointConfig) -> bool:
    start = time.time()
    saved = False
    batches = BatchPrefetcher(train_it, torch.device(args.device))
    sizes = batch_sizes_from_args(args)  # --rampup-batch-size grows them with consumed samples
    while run.iteration < args.train_iters:
        run.set_batch(sizes.global_batch_size_at(run.consumed_train_samples),
                      sizes.num_microbatches_at(run.consumed_train_samples))
        run.iteration_start()
        it = run.iteration + 1
        if profiler is not None:
            profiler.before(it)
        out = train_step(model, optimizer, scheduler, batches, args, ps, graphs,
                         run.num_microbatches, run.global_batch_size)
        if profiler is not None:
            profiler.after(it)
        do_eval = bool(args.eval_interval and it % args.eval_interval == 0
                       and valid_it is not None and args.eval_iters > 0)
        exit_now = bool(args.exit_interval and it % args.exit_interval == 0)
        save = bool(args.save and args.save_interval and it % args.save_interval == 0)
        # Book the iteration; read its values now only when something else will wait anyway.
        run.iteration_end(out, flush=do_eval or save or exit_now or it == args.train_iters
                          or bool(args.exit_duration_in_mins))
        published = maybe_finalize_async_save()  # cheap check: every rank's write done?
        if published is not None:
            run.log(f"published the --async-save checkpoint of iteration {published}")
        if do_eval:
            losses, used = evaluate(model, valid_it, args, ps, graphs=graphs,
                                    **run.batch_kwargs())
            run.consumed_valid_samples += used
            run.log_validation(f"iteration {it}", losses, it)
        if args.exit_duration_in_mins:
            elapsed = torch.tensor([(time.time() - start) / 60.0], device=args.device)
            if dist.is_initialized():
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            exit_now = exit_now or elapsed.item() > args.exit_duration_in_mins
        saved = False
        if save or (args.save and exit_now):
            save_checkpoint(it, model, optimizer, scheduler, checkpoints, run.data_state(), ps)
            saved = True
        if exit_now:
            run.log(f"exiting program at iteration {it}")
            return True
        if args.empty_unused_memory_level and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.save and run.iteration > run.start_iteration and not saved:
        save_checkpoint(run.iteration, model, optimizer, scheduler, checkpoints, run.data_state(),
                        ps)
    return False


def _final_evals(run: RunState, model, valid_it, test_ds, args, ps,
                 graphs: MicroBatchGraphs | None) -> None:
    if args.eval_iters <= 0:
        return
    it = run.iteration
    if valid_it is not None and not (args.eval_interval and it % args.eval_interval == 0 and
                                     it > run.start_iteration):
        losses, used = evaluate(model, valid_it, args, ps, graphs=graphs, **run.batch_kwargs())
        run.consumed_valid_samples += used
        run.log_validation(f"iteration {it} on validation set", losses, it)
    test_it = builders.make_iterator(test_ds, args, 0, ps)
    if test_it is not None:
        losses, _ = evaluate(model, test_it, args, ps, graphs=graphs, **run.batch_kwargs())
        run.test_loss = losses["lm loss"]
        run.log_validation(f"iteration {it} on test set", losses, it, split="test")
