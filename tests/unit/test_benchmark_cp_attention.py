"""benchmarks/cp_attention.py runs on CPU (--smoke) and its ring equals full attention."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cp_attention.py"


def test_cp_attention_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("cp_attention_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--smoke", "--json", str(tmp_path / "r.json")])
    assert out["max_diff"]["torch"] < 1e-4 and out["backend"] == "torch"
    assert out["full_ms"] > 0 and out["ring_ms"]["torch"] > 0 and (tmp_path / "r.json").exists()
