"""Learning-rate and weight-decay schedule (Megatron's ``OptimizerParamScheduler``).

Steps count *samples* when built by :func:`build_scheduler` (Megatron: each iteration advances
by the global batch size), so iteration- and sample-based flags share one schedule. With
``n`` steps done, warmup ``W`` and decay horizon ``D``:

* ``n <= W`` (and ``W > 0``): ``init_lr + (max_lr - init_lr) * n / W``;
* constant: ``max_lr``; ``n > D``: ``min_lr``;
* otherwise, with ``r = (n - W) / (D - W)``: linear ``coeff = 1 - r``, cosine
  ``coeff = (cos(pi r) + 1) / 2``; ``lr = min_lr + coeff * (max_lr - min_lr)``;
* inverse-square-root: ``max(min_lr, max_lr * sqrt(max(W, 1)) / sqrt(max(n, 1)))``;
* WSD: ``coeff = 1`` until ``D - wsd_decay_steps``, then the annealing style over the rest.

The learning rate an iteration uses is the one set after the previous iteration's step, so the
first iteration with warmup trains at ``init_lr`` (as Megatron does).
"""

from __future__ import annotations

import math


class OptimizerParamScheduler:
    """Sets ``lr = schedule * lr_mult`` and ``weight_decay = wd * wd_mult`` on every param group
    of ``optimizer`` (anything with ``param_groups``)."""

    _CHECKED = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                "start_wd", "end_wd")

    def __init__(self, optimizer, init_lr: float, max_lr: float, min_lr: float,
                 lr_warmup_steps: int, lr_decay_steps: int, lr_decay_style: str,
                 start_wd: float, end_wd: float, wd_incr_steps: int, wd_incr_style: str,
                 wsd_decay_steps: int | None = None, lr_wsd_decay_style: str | None = None,
                 use_checkpoint_opt_param_scheduler: bool = False,
                 override_opt_param_scheduler: bool = False):
        self.optimizer = optimizer
        self.init_lr, self.max_lr, self.min_lr = float(init_lr), float(max_lr), float(min_lr)
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"need 0 <= min_lr ({min_lr}) <= max_lr ({max_lr})")
        if not 0.0 <= self.init_lr <= self.max_lr:
            raise ValueError(f"need 0 <= warmup init lr ({init_lr}) <= max_lr ({max_lr})")
        self.lr_warmup_steps, self.lr_decay_steps = int(lr_warmup_steps), int(lr_decay_steps)
        if self.lr_decay_steps <= 0:
            raise ValueError(f"lr decay steps {lr_decay_steps} must be > 0")
        if self.lr_warmup_steps >= self.lr_decay_steps and lr_decay_style != "constant":
            raise ValueError(f"warmup ({lr_warmup_steps} steps) must end before the decay "
                             f"horizon ({lr_decay_steps} steps); shorten the warmup or "
                             "lengthen --lr-decay-iters/--lr-decay-samples")
        if lr_decay_style not in ("constant", "linear", "cosine", "inverse-square-root", "WSD"):
            raise ValueError(f"unknown lr decay style {lr_decay_style!r}")
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps = wsd_decay_steps
        self.lr_wsd_decay_style = lr_wsd_decay_style
        if lr_decay_style == "WSD" and not wsd_decay_steps:
            raise ValueError("WSD needs --lr-wsd-decay-iters or --lr-wsd-decay-samples")
        self.start_wd, self.end_wd = float(start_wd), float(end_wd)
        if not 0.0 <= self.start_wd <= self.end_wd:
            raise ValueError(f"need 0 <= start weight decay ({start_wd}) <= end ({end_wd})")
        self.wd_incr_steps, self.wd_incr_style = int(wd_incr_steps), wd_incr_style
        self.use_checkpoint = use_checkpoint_opt_param_scheduler
        self.override = override_opt_param_scheduler
        if self.use_checkpoint and self.override:
            raise ValueError("--use-checkpoint-opt-param-scheduler and "
                             "--override-opt-param-scheduler are mutually exclusive")
        self.num_steps = 0
        self.step(0)

    def get_wd(self) -> float:
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd  # constant style has start_wd == end_wd (checked by the args)
        ratio = self.num_steps / self.wd_incr_steps
        if self.wd_incr_style == "linear":
            coeff = ratio
        elif self.wd_incr_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        else:
            raise ValueError(f"unknown weight decay increment style {self.wd_incr_style!r}")
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self, param_group: dict | None = None) -> float:
        group = param_group or {}
        max_lr, min_lr = group.get("max_lr", self.max_lr), group.get("min_lr", self.min_lr)
        n, warm, decay = self.num_steps, self.lr_warmup_steps, self.lr_decay_steps
        if warm > 0 and n <= warm:
            return self.init_lr + (max_lr - self.init_lr) * float(n) / float(warm)
        if self.lr_decay_style == "constant":
            return max_lr
        if n > decay:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            lr = max_lr * math.sqrt(max(warm, 1)) / math.sqrt(max(n, 1))
            return max(min_lr, lr)
        ratio = float(n - warm) / float(decay - warm)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD
            anneal_start = decay - self.wsd_decay_steps
            if n <= anneal_start:
                coeff = 1.0
            else:
                r = float(n - anneal_start) / float(self.wsd_decay_steps)
                coeff = {"linear": lambda: 1.0 - r,
                         "cosine": lambda: 0.5 * (math.cos(math.pi * r) + 1.0),
                         "exponential": lambda: 2.0 * math.pow(0.5, r) - 1.0,
                         "minus_sqrt": lambda: 1.0 - math.sqrt(r)}[self.lr_wsd_decay_style]()
        return min_lr + coeff * (max_lr - min_lr)

    def step(self, increment: int) -> None:
        """Advance by ``increment`` steps (samples) and set every group's lr and weight decay."""
        self.num_steps += int(increment)
        wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict:
        return {"max_lr": self.max_lr, "init_lr": self.init_lr, "min_lr": self.min_lr,
                "lr_warmup_steps": self.lr_warmup_steps, "lr_decay_steps": self.lr_decay_steps,
                "lr_decay_style": self.lr_decay_style, "num_steps": self.num_steps,
                "start_wd": self.start_wd, "end_wd": self.end_wd,
                "wd_incr_steps": self.wd_incr_steps, "wd_incr_style": self.wd_incr_style}

    def _check_and_set(self, name: str, ours, saved):
        if self.override or saved is None:
            return ours
        if self.use_checkpoint:
            return saved
        if ours != saved:
            raise ValueError(
                f"scheduler {name}: the run asks for {ours!r} but the checkpoint has {saved!r}; "
                "pass --override-opt-param-scheduler to use the new value or "
                "--use-checkpoint-opt-param-scheduler to keep the checkpoint's")
        return ours

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count; schedule settings must match unless overridden."""
        for name in self._CHECKED:
            setattr(self, name, self._check_and_set(name, getattr(self, name), state.get(name)))
        self.num_steps = 0
        self.step(int(state["num_steps"]))


def build_scheduler(optimizer, args) -> OptimizerParamScheduler:
    """Megatron's ``get_optimizer_param_scheduler``: iteration flags are turned into samples."""
    gbs = args.global_batch_size
    if args.train_samples is None:
        decay_steps = args.lr_decay_iters * gbs
        wd_incr_steps = args.train_iters * gbs
        wsd = (args.lr_wsd_decay_iters or 0) * gbs
        warmup = (args.lr_warmup_fraction * decay_steps if args.lr_warmup_fraction is not None
                  else args.lr_warmup_iters * gbs)
    else:
        decay_steps = args.lr_decay_samples
        wd_incr_steps = args.train_samples
        wsd = args.lr_wsd_decay_samples or 0
        warmup = (args.lr_warmup_fraction * decay_steps if args.lr_warmup_fraction is not None
                  else args.lr_warmup_samples)
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=int(warmup), lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style, start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay, wd_incr_steps=wd_incr_steps,
        wd_incr_style=args.weight_decay_incr_style, wsd_decay_steps=wsd or None,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler)
