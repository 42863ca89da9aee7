"""What both checkpoint formats share: the iteration directory and tracker file names, the
tracker's durable replacement, every RNG state of a process, and :class:`CheckpointError`."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from moecore.checkpointing.errors import CheckpointError  # noqa: F401 - re-exported
from moecore.tensor_parallel.random import get_rng_tracker

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def published_iteration_dir(root: str, iteration: int) -> str:
    """The directory to read iteration ``iteration`` from: ``iter_N``, or ``iter_N.old`` when a
    crash fell between the two renames that replace an iteration saved again (see the
    publish step of either format): the tracker then names N, and the earlier save of N is
    complete there."""
    final = iteration_dir(root, iteration)
    old = final + ".old"
    return old if not os.path.isdir(final) and os.path.isdir(old) else final


def read_tracker(root: str) -> int | None:
    """The iteration in ``root``'s tracker file; None when there is none."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path} should hold an iteration number but contains "
                              f"{text[:40]!r}; fix or delete it") from None


# ---- RNG -------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    """This process's RNG states (plain Python types and tensors, loadable weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"random_rng_state": random.getstate(),
            "np_rng_state": (kind, [int(k) for k in keys], int(pos), int(has_gauss),
                             float(cached)),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "rng_tracker_states": get_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["random_rng_state"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["np_rng_state"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    get_rng_tracker().set_states(state["rng_tracker_states"])


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_tracker(root: str, iteration: int) -> None:
    tmp = os.path.join(root, TRACKER_FILENAME + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER_FILENAME))
    _fsync_dir(root)
