"""Activation-memory accounting: which tensors autograd keeps for backward, and their bytes.

``saved_activations(fn, exclude=params)`` runs ``fn()`` under
:func:`torch.autograd.graph.saved_tensors_hooks` and reports every distinct storage saved for
backward (a tensor saved by several ops counts once; views of one storage count once, at the
storage's size), leaving out the storages of ``exclude`` (parameters are not activations).
Device-agnostic, so the same accounting runs in CPU tests and in GPU benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class SavedActivations:
    """``total_bytes`` over distinct storages; ``shapes``: (shape, dtype, bytes) of each."""

    total_bytes: int = 0
    shapes: list[tuple[tuple[int, ...], torch.dtype, int]] = field(default_factory=list)

    def largest(self, n: int = 8) -> list[tuple[tuple[int, ...], torch.dtype, int]]:
        return sorted(self.shapes, key=lambda s: -s[2])[:n]


def _storage_key(t: torch.Tensor) -> tuple:
    # The storage object itself, not its address: memory freed during ``fn`` (selective
    # recompute) may be handed to a later tensor of the same size at the same address.
    return (t.device, t.untyped_storage()._cdata)


def saved_activations(fn: Callable[[], object],
                      exclude: Iterable[torch.Tensor] = ()) -> tuple[object, SavedActivations]:
    """``(fn(), report)``: run ``fn`` and account the tensors saved for its backward.

    Storages are measured when ``fn`` returns, so memory freed until backward (selective
    recompute, :func:`moecore.transformer.recompute.discard_until_backward`) counts as 0."""
    skip = {_storage_key(t) for t in exclude}
    saved: dict = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in skip and key not in saved and t.untyped_storage().nbytes():
            saved[key] = (tuple(t.shape), t.dtype, t.untyped_storage())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    report = SavedActivations()
    for shape, dtype, storage in saved.values():
        nbytes = storage.nbytes()
        if nbytes:
            report.total_bytes += nbytes
            report.shapes.append((shape, dtype, nbytes))
    return out, report
