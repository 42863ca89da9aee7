"""``--log-num-zeros-in-grad``: zero gradient entries counted like the global norm counts
them (replicas once), the same for the plain and the distributed optimizer, and logged."""

from __future__ import annotations

import torch

from moecore.optimizer.clip_grads import count_zeros_fp32
from moecore.parallel_state import ParallelState
from moecore.training import pretrain
from tests.cli import BASE
from tests.unit.test_optimizer_fused import _steps
from tests.unit.test_precision_aware_optimizer import _optimizers


def test_counts_zero_entries():
    a, b = torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)
    a.grad = torch.tensor([[0.0, 1.0, 0.0, 2.0]] * 3)
    b.grad = torch.tensor([0.0, -0.0, 3.0, 0.0, 1e-30])
    b.shared_embedding = True  # counted on the first pipeline stage (here: the only one)
    count = count_zeros_fp32([a, b], ParallelState.single())
    assert count.dtype == torch.float64 and count.item() == 6 + 3


def test_plain_and_distributed_optimizers_count_the_same():
    counts = []
    for distributed in (False, True):
        model, opt = _optimizers(distributed, (None, None))
        opt.log_num_zeros_in_grad = True
        with torch.no_grad():  # LayerNorm outputs 0..2 unused: their weight and bias get 0
            model[2].weight[:, :3] = 0.0
            opt.reload_model_params()
        _steps(model, opt, 1)
        counts.append(opt.num_zeros_in_grad.item())
    assert counts[0] == counts[1] >= 6, counts


def test_logged_every_interval():
    lines = []
    pretrain(BASE + ["--log-num-zeros-in-grad", "--log-interval", "2", "--eval-iters", "0"],
             log=lines.append)
    train = [line for line in lines if "iteration" in line and "lm loss" in line]
    assert len(train) == 5 and all(" num zeros: " in line for line in train)
