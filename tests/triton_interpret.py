"""Run a checks module's Triton kernels under ``TRITON_INTERPRET=1`` (CPU) in a subprocess.

The interpreter must be switched on before Triton is imported, hence the fresh process. The
checks module prints ``PASS <name>`` for each check that passed; tests look for those lines.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path


def run_interpreted(module: str, checks: tuple[str, ...]) -> str:
    """stdout + stderr of ``python -m module *checks`` under the interpreter; skips the calling
    test when Triton is not installed (as in CI)."""
    import pytest

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", module, *checks], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.stdout + proc.stderr


def assert_checks_pass(module: str, checks: tuple[str, ...]) -> None:
    """Run ``module``'s ``checks`` under the interpreter (one subprocess) and fail the calling
    test, with the output, unless every one printed ``PASS``; skips without Triton."""
    out = run_interpreted(module, checks)
    failed = [name for name in checks if f"PASS {name}" not in out]
    assert not failed, f"{failed} did not pass under the Triton interpreter:\n{out}"


def _patch_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with ``int(array)``, which
    NumPy >= 2.4 refuses for its 1-element arrays: a ``range`` over a run-time bound (an
    argument or a loaded value) then fails under the interpreter only. Take the element."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "moecore_scalar_index", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__",
                       lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.moecore_scalar_index = True
    interpreter._patch_lang_tensor = patched


def run_checks(checks: dict[str, Callable], names: list[str]) -> int:
    """A checks module's ``main``: run ``checks`` (all, or those ``names``) under the
    interpreter, each given a seeded CPU ``torch.Generator`` if it takes an argument; print
    ``PASS name`` or ``FAIL name`` with the traceback; exit status 1 if any failed."""
    import torch

    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    _patch_interpreter_scalar_index()
    failed = 0
    for name in names or checks:
        fn = checks[name]
        try:
            fn(torch.Generator().manual_seed(0)) if inspect.signature(fn).parameters else fn()
            print(f"PASS {name}", flush=True)
        except Exception:  # noqa: BLE001 - report every check
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0
