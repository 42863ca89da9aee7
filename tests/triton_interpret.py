"""Run a checks module's Triton kernels under ``TRITON_INTERPRET=1`` (CPU) in a subprocess.

The interpreter must be switched on before Triton is imported, hence the fresh process. The
checks module prints ``PASS <name>`` for each check that passed; tests look for those lines.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_interpreted(module: str, checks: tuple[str, ...]) -> str:
    """stdout + stderr of ``python -m module *checks`` under the interpreter; skips the calling
    test when Triton is not installed (as in CI)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", module, *checks], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.stdout + proc.stderr
