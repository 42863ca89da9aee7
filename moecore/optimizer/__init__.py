"""Optimizer: AdamW over fp32 main params (replicated, or sharded over data parallel by the
distributed optimizer), loss scaling, global-norm clipping, gradient sync across
data/expert-data/tensor/embedding groups (bucketed and overlapped with backward on request),
and Megatron's LR/weight-decay schedule."""

from moecore.optimizer.builder import get_megatron_optimizer
from moecore.optimizer.clip_grads import clip_grad_norm, get_grad_norm_fp32, get_params_norm
from moecore.optimizer.distributed import DistributedOptimizer
from moecore.optimizer.grad_buffer import DataParallelGradSync
from moecore.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler, build_grad_scaler
from moecore.optimizer.grad_sync import attach_main_grad, finalize_model_grads
from moecore.optimizer.lr_scheduler import OptimizerParamScheduler, build_scheduler
from moecore.optimizer.optimizer import MegatronOptimizer, get_param_groups
from moecore.optimizer.optimizer_config import OptimizerConfig

__all__ = [
    "ConstantGradScaler",
    "DataParallelGradSync",
    "DistributedOptimizer",
    "DynamicGradScaler",
    "MegatronOptimizer",
    "OptimizerConfig",
    "OptimizerParamScheduler",
    "attach_main_grad",
    "build_grad_scaler",
    "build_scheduler",
    "clip_grad_norm",
    "finalize_model_grads",
    "get_grad_norm_fp32",
    "get_megatron_optimizer",
    "get_param_groups",
    "get_params_norm",
]
