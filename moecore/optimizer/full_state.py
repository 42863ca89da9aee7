"""The data-parallel-independent optimizer state: per parameter (``model_params`` order) its
full fp32 main value and Adam's two moments (``FULL_STATE_FORMAT``).

The distributed optimizer saves and loads this form; :class:`~moecore.optimizer.optimizer.
MegatronOptimizer` loads it too (:func:`full_state_to_plain`), and the distributed optimizer
loads a plain optimizer's state (:func:`plain_state_to_full`). Below both optimizer modules, so
neither imports the other.
"""

from __future__ import annotations

import torch

FULL_STATE_FORMAT = "moecore-per-parameter-adam"
MOMENTS = ("exp_avg", "exp_avg_sq")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def group_hparams(g: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
            if k in ("lr", "weight_decay", "betas", "eps", "name")}


def check_full_state(state: dict, model_params: list) -> None:
    """Raise ``ValueError`` when a per-parameter state does not fit ``model_params``."""
    params = state["params"]
    if len(params) != len(model_params):
        raise ValueError(f"optimizer state has {len(params)} parameters but the model has "
                         f"{len(model_params)}")
    for i, (s, p) in enumerate(zip(params, model_params)):
        if tuple(s["main"].shape) != tuple(p.shape):
            raise ValueError(f"optimizer state of parameter #{i} has shape "
                             f"{tuple(s['main'].shape)} but the model's is {tuple(p.shape)}")


def plain_state_to_full(state: dict, model_params: list) -> dict:
    """:class:`MegatronOptimizer` state -> per-parameter form (fp32 params' main values are the
    model's current weights, which the checkpoint loaded first)."""
    if "optimizer" not in state:
        raise ValueError("unrecognised optimizer state (neither a plain nor a distributed "
                         "optimizer checkpoint)")
    torch_state = state["optimizer"]
    halves = iter(state.get("fp32_from_fp16_params") or [])
    per_param = torch_state.get("state", {})
    full, steps = [], []
    for i, p in enumerate(model_params):
        main = next(halves, None) if p.dtype in HALF_DTYPES else p.detach()
        if main is None:
            raise ValueError("the plain optimizer state has no fp32 main copy of parameter "
                             f"#{i} (saved with a different precision)")
        s = per_param.get(i, {})
        if "step" in s:
            steps.append(float(s["step"]))
        full.append({"main": main.float().cpu(),
                     **{k: s[k].float().cpu() if k in s else torch.zeros(p.shape)
                        for k in MOMENTS}})
    return {"format": FULL_STATE_FORMAT, "step": int(max(steps)) if steps else 0,
            "param_groups": torch_state.get("param_groups", []), "params": full,
            "grad_scaler": state.get("grad_scaler")}


def full_state_to_plain(state: dict, optimizer) -> dict:
    """Per-parameter form -> the state dict ``optimizer`` (a :class:`~moecore.optimizer.
    optimizer.MegatronOptimizer`) loads."""
    check_full_state(state, optimizer.model_params)
    torch_sd = optimizer.optimizer.state_dict()
    step = int(state["step"])
    params = state["params"]
    torch_sd["state"] = {} if step == 0 else {
        i: {"step": torch.tensor(float(step)), **{k: params[i][k].clone() for k in MOMENTS}}
        for i in range(len(params))}
    for g, saved in zip(torch_sd["param_groups"], state["param_groups"]):
        g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()
                  if k in ("lr", "weight_decay", "betas", "eps")})
    halves = [params[i]["main"] for i, (m, p) in
              enumerate(zip(optimizer.main_params, optimizer.model_params)) if m is not p]
    return {"optimizer": torch_sd, "grad_scaler": state.get("grad_scaler"),
            "fp32_from_fp16_params": halves}
