"""benchmarks/fp8_moe_layer.py runs its variants on CPU (--smoke, emulated FP8 GEMMs)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fp8_moe_layer.py"


def _module():
    spec = importlib.util.spec_from_file_location("fp8_moe_layer_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fp8_moe_layer_variants_smoke(tmp_path):
    from moecore.fp8.scaling import WeightCache  # noqa: PLC0415

    mod = _module()
    assert mod.parse_variant("blockwise+cache+bf16wgrad") == {
        "recipe": "blockwise", "cache": True, "wgrad": False, "gemm_backend": None}
    assert mod.parse_variant("blockwise+cache@triton")["gemm_backend"] == "triton"
    for bad in ("tensorwise+fast", "blockwise@cublas"):
        with pytest.raises(argparse.ArgumentTypeError, match="recipe"):
            mod.parse_variant(bad)
    out = mod.main(["--smoke", "--variants", "tensorwise,tensorwise+cache+bf16wgrad,"
                    "blockwise@torch", "--json", str(tmp_path / "r.json")])
    row = out["rows"][0]
    assert row["tensorwise_rel_err"] < 0.15 and row["tensorwise+cache+bf16wgrad_ms"] > 0
    assert WeightCache.enabled is False and (tmp_path / "r.json").exists()
