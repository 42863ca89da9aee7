"""A small registry of interchangeable implementations ("backends") of one accelerated op.

Each op (grouped GEMM, permute, norm, attention, ...) keeps one :class:`BackendRegistry`. A
:class:`Backend` is a name, an ``is_available(**ctx) -> (ok, reason)`` probe and the function
itself. ``ctx`` carries what availability depends on (for example ``device=`` and ``dtype=``);
probes must accept and ignore keys they do not use.

Selection is explicit (a backend name from a config field or flag) or ``"auto"`` (the first
backend of the registry's preference order that is available and whose ``auto_ok`` accepts the
context). The request comes from a config field with a flag (Megatron's fusion flag where one
exists, else ``--<op>-backend``). A requested backend that is not available raises
:class:`BackendUnavailableError` with the probe's reason, which names what to install or change,
and the flag. The chosen backend is logged once per process per op on the ``"moecore"`` logger
(:func:`log_choice`); :func:`chosen` returns those choices for a checkpoint's args.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger("moecore")

AUTO = "auto"

# (op, backend) pairs already logged by this process, in the order they were first picked.
_LOGGED: dict[tuple[str, str], None] = {}


class BackendUnavailableError(ValueError, ImportError):
    """A backend was requested by name but cannot run here.

    Subclasses both ``ValueError`` (a bad setting) and ``ImportError`` (usually a missing
    package), so callers may catch either.
    """


def _always(**ctx) -> bool:
    return True


def always_available(**ctx) -> tuple[bool, str]:
    """``is_available`` of a backend that runs anywhere (the torch references)."""
    return True, ""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``is_available(**ctx) -> (bool, reason)``: the reason is empty when available, else it says
    what is missing and how to get it. ``auto_ok(**ctx) -> bool`` narrows when ``"auto"`` may pick
    this backend (an available backend can still be a poor default, e.g. a slow fallback).
    """

    name: str
    is_available: Callable[..., tuple[bool, str]]
    fn: Callable
    auto_ok: Callable[..., bool] = _always
    description: str = ""


class BackendRegistry:
    """Backends of one op, in ``"auto"`` preference order (registration order by default).

    ``flag``: the command-line flag that sets the request (named in errors).
    """

    def __init__(self, op: str, flag: str = ""):
        self.op, self.flag = op, flag
        self._backends: dict[str, Backend] = {}
        self._resolved: dict[tuple, Backend] = {}

    def register(self, backend: Backend) -> Backend:
        if backend.name == AUTO or backend.name in self._backends:
            raise ValueError(f"{self.op}: backend name {backend.name!r} is reserved or taken")
        self._backends[backend.name] = backend
        return backend

    def names(self) -> list[str]:
        return list(self._backends)

    def get(self, name: str) -> Backend:
        if name not in self._backends:
            raise ValueError(f"unknown {self.op} backend {name!r}; choose one of "
                             f"{[AUTO, *self._backends]}")
        return self._backends[name]

    def availability(self, **ctx) -> dict[str, tuple[bool, str]]:
        """``{name: (available, reason)}`` for every backend under ``ctx``."""
        return {name: b.is_available(**ctx) for name, b in self._backends.items()}

    def available(self, **ctx) -> list[str]:
        return [name for name, (ok, _) in self.availability(**ctx).items() if ok]

    def select(self, requested: str = AUTO, *, auto_order: Sequence[str] | None = None,
               log: bool = True, **ctx) -> Backend:
        """Resolve ``requested`` (a name or ``"auto"``) to a backend that can run under ``ctx``.

        Raises ``ValueError`` for an unknown name, :class:`BackendUnavailableError` when the named
        backend (or, for auto, every backend) is unavailable.
        """
        if requested == AUTO:
            chosen = self._select_auto(auto_order or self.names(), ctx)
        else:
            chosen = self.get(requested)
            ok, reason = chosen.is_available(**ctx)
            if not ok:
                via = f" (set by {self.flag})" if self.flag else ""
                raise BackendUnavailableError(
                    f"{self.op} backend {requested!r}{via} is not available: {reason}. "
                    f"Available here: {self.available(**ctx) or 'none'} (or use {AUTO!r}).")
        if log:
            log_choice(self.op, chosen.name, requested, ctx)
        return chosen

    def resolve(self, requested: str = AUTO, **ctx) -> Backend:
        """:meth:`select` once per ``(requested, ctx)`` (hashable values): for per-call paths."""
        key = (requested, *sorted(ctx.items()))
        backend = self._resolved.get(key)
        if backend is None:
            backend = self._resolved[key] = self.select(requested, **ctx)
        return backend

    def clear_cache(self) -> None:
        """Forget :meth:`resolve`'s results (after a probe's answer changed, e.g. in tests)."""
        self._resolved.clear()

    def _select_auto(self, order: Sequence[str], ctx: dict) -> Backend:
        reasons = []
        for name in order:
            backend = self.get(name)
            ok, reason = backend.is_available(**ctx)
            if ok and backend.auto_ok(**ctx):
                return backend
            reasons.append(f"{name}: {reason or 'not a good default here'}")
        raise BackendUnavailableError(
            f"no {self.op} backend can run here ({_describe(ctx)}): " + "; ".join(reasons))


def _describe(ctx: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(ctx.items())) or "no context"


def log_choice(op: str, name: str, requested: str, ctx: dict, warn: bool = False) -> None:
    """Log ``op -> name`` the first time this process picks it (``warn``: as a warning, for a
    fallback away from an explicitly requested backend)."""
    if (op, name) in _LOGGED:
        return
    _LOGGED[(op, name)] = None
    log = logger.warning if warn else logger.info
    log("%s backend: %s (requested %r; %s)", op, name, requested, _describe(ctx))


def chosen() -> dict[str, str]:
    """``{op: backend}`` of every choice this process made so far (``"a,b"`` when one op ran two
    backends, e.g. on two devices): what ``auto`` resolved to, saved with a checkpoint's args."""
    out: dict[str, str] = {}
    for op, name in _LOGGED:
        out[op] = f"{out[op]},{name}" if op in out else name
    return out
