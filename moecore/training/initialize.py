"""Process start-up: torch.distributed from the torchrun environment, process groups, seeds."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from moecore import parallel_state
from moecore.parallel_state import ParallelState
from moecore.tensor_parallel.random import model_parallel_seed
from moecore.training.logger import print_rank_0


def initialize_distributed(args) -> bool:
    """Initialise ``torch.distributed`` when the environment describes more than one rank.

    Uses ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (torchrun). Returns True when
    this call created the process group (the caller destroys it at the end). A group that
    already exists (tests, notebooks) is reused. The world group gets
    ``--distributed-timeout-minutes``; so do the model-parallel groups
    (:func:`initialize_parallel_state_from_args`).
    """
    if args.device == "cuda":
        local_rank = int(os.getenv("LOCAL_RANK", str(args.local_rank)))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if dist.is_initialized():
        world = dist.get_world_size()
        created = False
    else:
        world = int(os.getenv("WORLD_SIZE", "1"))
        created = world > 1
        if created:
            nccl = args.distributed_backend == "nccl"
            fail_fast = enable_nccl_async_error_handling() if nccl else True
            timeout = timedelta(minutes=args.distributed_timeout_minutes)
            store = torchelastic_attempt_store(world, timeout)
            dist.init_process_group(
                backend=args.distributed_backend, timeout=timeout, store=store,
                rank=int(os.environ["RANK"]) if store is not None else -1,
                world_size=world if store is not None else -1)
            if not fail_fast:
                print_rank_0("WARNING: TORCH_NCCL_ASYNC_ERROR_HANDLING=0: a stalled or dead "
                             "rank hangs the job past --distributed-timeout-minutes; unset it "
                             "to fail fast")
    if world != args.world_size:
        raise ValueError(f"the arguments were validated for world size {args.world_size} but "
                         f"torch.distributed has {world} ranks; set WORLD_SIZE consistently")
    return created


def torchelastic_attempt_store(world: int, timeout: timedelta) -> dist.Store | None:
    """The world group's store under torchrun: the agent's TCPStore, with this attempt's
    keys under ``moecore/attempt_<TORCHELASTIC_RESTART_COUNT>``. torchrun (c10d rendezvous,
    store sharing on, its default) keeps one store for all restarts and torch adds no
    per-attempt prefix, so a restarted job would read the dead attempt's gloo/NCCL addresses
    (connection refused, or a hang). None outside torchrun's agent store (env:// as usual)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"moecore/attempt_{attempt}", store)


def enable_nccl_async_error_handling() -> bool:
    """Make NCCL's watchdog end the process when a collective exceeds its group's timeout
    (torch's own variable, read when an NCCL group is created; 3 is torch's default). False
    when the user turned it off (0): then a stalled rank blocks the others forever."""
    return os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3").strip() != "0"


def initialize_parallel_state_from_args(args) -> ParallelState:
    """The global :class:`ParallelState` for the flags' TP/PP/EP/ETP/CP sizes."""
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("model parallel groups already exist; call "
                           "moecore.parallel_state.destroy_model_parallel() before pretrain()")
    order = "tp-cp-ep-pp-dp" if args.use_tp_pp_dp_mapping else "tp-cp-ep-dp-pp"
    return parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        context_parallel_size=args.context_parallel_size, order=order,
        distributed_timeout_minutes=args.distributed_timeout_minutes)


def set_seeds(args, ps: ParallelState) -> int:
    """Seed Python, NumPy, torch and the TP/EP RNG tracker (Megatron's ``_set_random_seed``)."""
    if args.deterministic_mode:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return model_parallel_seed(args.seed, ps)
