"""Training: ``pretrain`` (the Megatron-style loop), its steps, and the MFU formula."""

from moecore.training.loop import (
    evaluate,
    forward_step_func,
    masked_mean_loss,
    model_output,
    pretrain,
    train_step,
)
from moecore.training.mfu import flops_per_token, matmul_params, peak_tflops

__all__ = ["evaluate", "flops_per_token", "forward_step_func", "masked_mean_loss", "matmul_params",
           "model_output", "peak_tflops", "pretrain", "train_step"]
