"""benchmarks/moe_layer.py runs end to end on CPU (--tiny), --cuda-graphs included (CUDA-only
timings are None there)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_layer.py"


def test_moe_layer_benchmark_tiny_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("moe_layer_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.main(["--device", "cpu", "--tiny", "--cuda-graphs", "--warmup", "1",
                       "--repeats", "2", "--json", str(tmp_path / "r.json")])
    (row,) = report["layers"]
    assert row["layer_ms"] > 0 and row["dense_ms"] > 0 and row["saved_bytes_per_token"] > 0
    assert row["layer_graph_ms"] is None and row["dense_graph_ms"] is None
    assert "ratio_dense_over_layer_graph" not in row and (tmp_path / "r.json").exists()


def test_profile_moe_layer_host_python_on_cpu(capsys):
    path = SCRIPT.with_name("profile_moe_layer.py")
    spec = importlib.util.spec_from_file_location("profile_moe_layer_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--config", "tiny", "--device", "cpu", "--host-python", "2", "--rows", "5"])
    out = capsys.readouterr().out
    assert "ms per iteration to issue" in out and "moe/layer.py" in out
