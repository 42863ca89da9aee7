"""benchmarks/fp8_quality.py: its log parsing against the trainer's own log lines, and the
BPE run end to end on CPU (--smoke: a SentencePiece BPE model trained on a small text, the tiny
e2e model, emulated FP8 GEMMs); benchmarks/e2e_profile.py's --contender argv;
benchmarks/e2e.py's --compare-fp8 names."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

from moecore.training.logger import format_train_line, format_validation_lines

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(it, loss, skipped=0, nan=0):
    return format_train_line(it, 100, it * 8, 10.0, 1e-3, 8, {"lm loss": loss, "z_loss": 9.0},
                             1.5, 1000.0, None, skipped=skipped, nan=nan)


def test_parse_log_reads_the_trainers_lines():
    mod = _module("fp8_quality")
    text = "\n".join([_train(10, 4.0), format_validation_lines("iteration 10", {"lm loss": 3.5}),
                      _train(20, 3.0, skipped=1),
                      format_validation_lines("iteration 20", {"lm loss": 3.25}),
                      format_validation_lines("iteration 20 on validation set",
                                              {"lm loss": 3.3})])
    r = mod.parse_log(text)
    assert r["train"] == [(10, 4.0), (20, 3.0)] and r["skipped"] == 1 and r["nan"] == 0
    assert r["val"] == {10: 3.5, 20: 3.3} and r["best_val"] == 3.3 and r["final_val"] == 3.3
    assert r["finite"]
    assert not mod.parse_log(_train(5, math.nan, nan=1))["finite"]


def test_e2e_bpe_smoke(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("".join(f"LINE {i}: to be, or not to be, that is the question.\n"
                            for i in range(3000)))
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(BENCH / "fp8_quality.py"), "--smoke", "--size",
                           "e2e-bpe", "--bpe-vocab", "300", "--input", str(text), "--json",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json  # noqa: PLC0415

    (rec,) = json.loads(out.read_text())
    assert rec["status"] == "ok" and rec["recipe"] == "tensorwise" and rec["diverged"] is False
    assert rec["best_val"] is not None and rec["nan"] == 0


def test_e2e_profile_contender_argv():
    mod = _module("e2e_profile")
    dense = mod._argv(2, 6, 2, ["--global-batch-size", "4"], "moecore-dense")
    moe = mod._argv(2, 6, 2, [], "moecore")
    assert "--num-experts" not in dense and "--num-experts" in moe
    i = dense.index("--global-batch-size")  # e2e_compare's recipe takes the global batch given
    assert dense[i + 1] == "4" and moe[moe.index("--global-batch-size") + 1] == "2"


def test_e2e_compare_fp8_flags_come_from_the_layer_benchmarks_variant_names():
    import argparse

    import pytest

    e2e = _module("e2e")
    assert e2e.fp8_flags("blockwise+bf16wgrad") == [
        "--fp8-format", "hybrid", "--fp8-recipe", "blockwise", "--no-fp8-wgrad"]
    assert e2e.fp8_flags("tensorwise")[-1] == "tensorwise"
    assert e2e.fp8_flags("blockwise@torch")[-2:] == ["--fp8-gemm-backend", "torch"]
    assert e2e.fp8_flags("blockwise@torch", emulated=True)[-1] == "emulated"
    for bad in ("tensorwise+cache", "e5m2", "tensorwise+fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            e2e.fp8_flags(bad)
