"""benchmarks/cp_attention.py runs on CPU (--smoke) and its ring equals full attention (at
a short sequence and at the timed length)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cp_attention.py"


def test_cp_attention_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("cp_attention_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--smoke", "--json", str(tmp_path / "r.json")])
    assert out["max_diff"]["torch"] < 1e-4 and out["rel_error"]["torch"] < 1e-5
    assert out["backend"] == "torch"
    assert out["full_ms"] > 0 and out["ring_ms"]["torch"] > 0 and (tmp_path / "r.json").exists()


def test_cp_attention_benchmark_flags_a_wrong_ring(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("cp_attention_bench_wrong", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    right = mod.ring_step_forward

    def wrong(fwd, q, kv, src, rank, out, lse, scale):  # a merge that loses 10% of a block
        out, lse = right(fwd, q, kv, src, rank, out, lse, scale)
        if src != rank:
            out.mul_(0.9)
        return out, lse

    monkeypatch.setattr(mod, "ring_step_forward", wrong)
    out = mod.main(["--smoke"])
    assert out["rel_error"]["torch"] > mod.REL_ERROR_LIMIT
    assert "WRONG: the ring with torch blocks" in capsys.readouterr().out
