"""The example launch scripts run to completion on CPU (shortened with extra flags)."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(cmd, timeout=300, **env):
    """Run ``cmd`` at the repo root; the scripts start Python as ``$PYTHON`` (this interpreter,
    so the test does not depend on the venv's ``bin`` being on ``PATH``)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
                "PYTHON": sys.executable, **env}
    out = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _losses(log):
    return [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+)", log)]


def test_mixtral_tiny_script_runs_on_four_ranks():
    log = _run(["bash", "examples/mixtral/train_mixtral_tiny.sh", "--train-iters", "4",
                "--eval-interval", "4", "--eval-iters", "1", "--log-interval", "2"])
    assert len(_losses(log)) == 2
    assert "validation loss at iteration 4" in log


def test_shakespeare_example_trains(tmp_path):
    log = _run(["bash", "examples/shakespeare_moe/run.sh", "--train-iters", "40",
                "--eval-interval", "40", "--log-interval", "10"])
    losses = _losses(log)
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_minimal_trainer_learns():
    log = _run([sys.executable, "examples/minimal_trainer.py", "--steps", "20"])
    losses = [float(x) for x in re.findall(r"lm loss ([0-9.]+)", log)]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0]
