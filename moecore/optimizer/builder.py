"""``get_megatron_optimizer``: the optimizer of a run from its :class:`OptimizerConfig`,
replicated (:class:`MegatronOptimizer`) or sharded over data parallel
(:class:`DistributedOptimizer`); above both, so neither optimizer module imports the other."""

from __future__ import annotations

from torch import nn

from moecore.optimizer.distributed import DistributedOptimizer
from moecore.optimizer.grad_buffer import DataParallelGradSync, default_bucket_size
from moecore.optimizer.grad_scaler import build_grad_scaler
from moecore.optimizer.optimizer import MegatronOptimizer, get_param_groups
from moecore.optimizer.optimizer_config import OptimizerConfig
from moecore.parallel_state import ParallelState, get_parallel_state


def _grad_sync(chunks: list[nn.Module], config: OptimizerConfig,
               ps: ParallelState) -> DataParallelGradSync | None:
    """Bucketed gradient buffers for the distributed optimizer or ``overlap_grad_reduce``."""
    if not (config.use_distributed_optimizer or config.overlap_grad_reduce):
        return None
    bucket = config.ddp_bucket_size
    if bucket is None and config.overlap_grad_reduce:
        bucket = default_bucket_size(ps.world_size_of("data_parallel_with_cp"))
    return DataParallelGradSync(
        chunks, ps, shard=config.use_distributed_optimizer,
        overlap_grad_reduce=config.overlap_grad_reduce,
        overlap_param_gather=config.overlap_param_gather, bucket_size=bucket)


def get_megatron_optimizer(model: nn.Module | list[nn.Module], config: OptimizerConfig,
                           parallel_state: ParallelState | None = None) -> MegatronOptimizer:
    """AdamW over ``model``'s parameters (one module or this rank's pipeline chunks) as
    ``config`` says (Megatron's ``--lr --weight-decay --adam-beta1/2 --adam-eps --clip-grad``,
    the fp16 loss-scale flags, see :func:`build_grad_scaler`); ``use_distributed_optimizer`` /
    ``overlap_grad_reduce`` / ``overlap_param_gather`` / ``ddp_bucket_size`` put the gradients
    in bucketed buffers (:class:`DataParallelGradSync`, as ``optimizer.grad_sync``).
    """
    ps = parallel_state or get_parallel_state()
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    grad_sync = _grad_sync(chunks, config, ps)
    kwargs = dict(lr=config.lr, weight_decay=config.initial_weight_decay,
                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                  clip_grad=config.clip_grad, grad_scaler=build_grad_scaler(config),
                  parallel_state=ps, check_for_nan=config.check_for_nan_in_loss_and_grad,
                  moment_dtypes=config.moment_dtypes,
                  log_num_zeros_in_grad=config.log_num_zeros_in_grad,
                  adamw_backend=config.adamw_backend)
    groups = get_param_groups(chunks, config.decoupled_lr, config.decoupled_min_lr)
    if config.use_distributed_optimizer:
        return DistributedOptimizer(groups, grad_sync, **kwargs)
    return MegatronOptimizer(groups, grad_sync=grad_sync, **kwargs)
