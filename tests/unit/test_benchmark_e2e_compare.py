"""benchmarks/e2e_compare.py: each contender trains the tiny shape on CPU (the --smoke path)."""

import importlib.util
import math

import pytest
import torch

from benchmarks import compare_common as cc
from benchmarks import e2e_compare

RECIPE = cc.Recipe(steps=4, warmup=2, log_interval=2, global_batch=4, lr_warmup=1)
CPU = torch.device("cpu")


def _flag(argv, name):
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]  # the last occurrence wins


def test_moecore_argv_shape_and_dense_twin():
    moe = e2e_compare.moecore_argv(cc.FULL, RECIPE, 16, dense=False, device="cuda")
    dense = e2e_compare.moecore_argv(cc.FULL, RECIPE, 16, dense=True, device="cuda")
    assert _flag(moe, "--vocab-size") == "32000" and _flag(moe, "--num-experts") == "16"
    assert _flag(moe, "--recompute-modules") == "layernorm" and "moe_act" in moe
    assert "--num-experts" not in dense and "--moe-grouped-gemm" not in dense
    assert _flag(dense, "--ffn-hidden-size") == "5632" and "moe_act" not in dense
    smoke = e2e_compare.moecore_argv(cc.SMOKE, RECIPE, 2, dense=False, device="cpu")
    assert _flag(smoke, "--vocab-size") == "255" and _flag(smoke, "--hidden-size") == "64"
    assert cc.flops_per_token(cc.FULL, dense=True) == pytest.approx(
        cc.flops_per_token(cc.FULL), rel=1e-3)


@pytest.mark.parametrize("dense", [False, True])
def test_moecore_contenders_train(dense):
    rec = e2e_compare.run_moecore(cc.SMOKE, RECIPE, CPU, 2, dense)
    assert rec["status"] == "ok" and rec["steps"] == 4 and rec["tokens_per_sec"] > 0
    # uniform ids over 256: the loss starts near ln(256)
    assert abs(rec["loss"] - math.log(cc.SMOKE.data_vocab)) < 1.0


@pytest.mark.skipif(importlib.util.find_spec("torchtitan") is None,
                    reason="torchtitan is not installed")
def test_torchtitan_contender_trains():
    from benchmarks import compare_torchtitan

    try:
        rec = compare_torchtitan.run(cc.SMOKE, RECIPE, CPU, 2, compile_model=False)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert rec["status"] == "ok" and rec["steps"] == 4
    assert abs(rec["loss"] - math.log(cc.SMOKE.data_vocab)) < 1.0


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                    reason="megatron-core is not installed")
def test_megatron_contender_builds_on_cpu():
    from megatron.core import parallel_state

    from benchmarks import compare_megatron

    try:
        rec = compare_megatron.run(cc.SMOKE, RECIPE, CPU, 2)
    finally:
        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert rec["status"].startswith("built only")


def test_table_reports_failures():
    out = e2e_compare.table([{"name": "x", "status": "timeout after 5 s", "micro_batch": 2},
                             {"name": "y", "status": "ok", "tokens_per_sec": 1234.5,
                              "mfu_percent": 40.0, "peak_memory_gib": 3.0, "loss": 5.5,
                              "micro_batch": 4}])
    assert "timeout after 5 s" in out and "1,234" in out and "40.0" in out
