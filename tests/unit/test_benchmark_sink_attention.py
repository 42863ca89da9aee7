"""benchmarks/sink_attention.py: the CPU smoke run reports every row, checked against the
reference."""

from __future__ import annotations

from benchmarks.sink_attention import main


def test_smoke_run_rows(capsys):
    result = main(["--smoke"])
    assert result["backend"] == "torch"  # FlexAttention is the CUDA path
    assert set(result["fwd_bwd_ms"]) == {"torch SDPA causal", "moecore causal + sinks",
                                         "moecore window 128 + sinks"}
    assert all(ms > 0 for ms in result["fwd_bwd_ms"].values())
    assert all(d < 1e-5 for d in result["max_abs_diff_vs_reference"].values())
    assert "SDPA / window" in capsys.readouterr().out
