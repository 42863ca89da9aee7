"""Isolation between tests that share one process: MoE loss bookkeeping is process-global."""

import pytest

from moecore import parallel_state
from moecore.moe.losses import MoEAuxLossAutoScaler, MoELossTracker


@pytest.fixture(autouse=True)
def _fresh_moe_globals():
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MoELossTracker.clear()
    yield
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MoELossTracker.clear()
    parallel_state.destroy_model_parallel()
