"""Loss scalers for fp16 training (Megatron-Core's ``grad_scaler.py`` semantics).

The loss is multiplied by ``scale`` before backward; the optimizer divides the gradients by it
again (``inv_scale``) and skips the step when any gradient is inf/NaN.
"""

from __future__ import annotations

import torch

from moecore.optimizer.optimizer_config import OptimizerConfig


class ConstantGradScaler:
    """A fixed loss scale (``--loss-scale``); ``update`` never changes it."""

    def __init__(self, initial_scale: float):
        if initial_scale <= 0:
            raise ValueError(f"loss scale {initial_scale} must be > 0")
        self._scale = torch.tensor([float(initial_scale)], dtype=torch.float32)

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    @property
    def inv_scale(self) -> torch.Tensor:
        return self._scale.double().reciprocal().float()

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self._scale.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._scale = state["scale"].clone().float()


class DynamicGradScaler(ConstantGradScaler):
    """Megatron's dynamic loss scale.

    On an overflow the growth count resets and the hysteresis count drops by one; when it
    reaches zero the scale is multiplied by ``backoff_factor`` (never below ``min_scale``).
    After ``growth_interval`` clean steps in a row the scale is multiplied by
    ``growth_factor`` and the hysteresis count is restored.
    """

    def __init__(self, initial_scale: float, min_scale: float, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000,
                 hysteresis: int = 2):
        super().__init__(initial_scale)
        if not 0 < min_scale <= initial_scale:
            raise ValueError(f"min loss scale {min_scale} must be in (0, initial scale "
                             f"{initial_scale}]")
        if growth_factor <= 1 or not 0 < backoff_factor < 1:
            raise ValueError(f"growth_factor={growth_factor} must be > 1 and "
                             f"backoff_factor={backoff_factor} in (0, 1)")
        if growth_interval < 1 or hysteresis < 1:
            raise ValueError(f"loss scale window {growth_interval} and hysteresis "
                             f"{hysteresis} must be >= 1")
        self.min_scale = torch.tensor([float(min_scale)], dtype=torch.float32)
        self.growth_factor = torch.tensor([float(growth_factor)], dtype=torch.float32)
        self.backoff_factor = torch.tensor([float(backoff_factor)], dtype=torch.float32)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = torch.max(self._scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale = self._scale * self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self._scale.clone(), "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self._scale = state["scale"].clone().float()
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])


def build_grad_scaler(config: OptimizerConfig) -> ConstantGradScaler | None:
    """The scaler for ``config``: None unless ``fp16`` (bf16 and fp32 need no loss scaling)."""
    if not config.fp16:
        return None
    if config.loss_scale is not None:
        return ConstantGradScaler(config.loss_scale)
    return DynamicGradScaler(initial_scale=config.initial_loss_scale,
                             min_scale=config.min_loss_scale, growth_factor=2.0,
                             backoff_factor=0.5, growth_interval=int(config.loss_scale_window),
                             hysteresis=config.hysteresis)
