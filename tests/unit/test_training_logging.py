"""Log-line formats (Megatron's), the MFU formula, the peak table, and writer errors."""

from __future__ import annotations

import argparse
import re
import sys

import pytest
import torch

from moecore.config import TransformerConfig
from moecore.training import mfu
from moecore.training.logger import MetricWriters, format_train_line, format_validation_lines


def test_train_line_format():
    line = format_train_line(10, 100, 640, 51.24, 3e-4, 64,
                             {"lm loss": 2.345678, "load_balancing_loss": 1.01}, 0.8123,
                             80000.0, 0.412)
    pattern = (r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration       10/     100 \| "
               r"consumed samples:          640 \| elapsed time per iteration \(ms\): 51\.2 \| "
               r"learning rate: 3\.000000E-04 \| global batch size:    64 \| "
               r"lm loss: 2\.345678E\+00 \| load_balancing_loss: 1\.010000E\+00 \| "
               r"grad norm: 0\.812 \| tokens per sec: 80000\.0 \| MFU: 41\.20% \| "
               r"number of skipped iterations:   0 \| number of nan iterations:   0 \|$")
    assert re.match(pattern, line), line
    cpu = format_train_line(1, 2, 8, 1.0, 1.0, 8, {"lm loss": 1.0}, None, 1.0, None,
                            loss_scale=1024.0)
    assert "| MFU: n/a |" in cpu and "| loss scale: 1024.0 |" in cpu and "grad norm" not in cpu


def test_validation_block_format():
    block = format_validation_lines("iteration 5", {"lm loss": 2.0})
    bar, line, bar2 = block.split("\n")
    assert line == (" validation loss at iteration 5 | lm loss value: 2.000000E+00 | "
                    "lm loss PPL: 7.389056E+00 | ")
    assert bar == bar2 == "-" * (len(line) + 1)


def test_flops_per_token_by_hand():
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                            num_query_groups=2, ffn_hidden_size=128, num_moe_experts=8,
                            moe_ffn_hidden_size=32, moe_router_topk=2, moe_layer_freq=[0, 1],
                            gated_linear_unit=True, moe_shared_expert_intermediate_size=16)
    h, v, s = 64, 256, 32
    attn = h * (64 + 2 * 32) + 64 * h  # q=4 heads x 16, kv=2 groups x 16
    dense = h * 128 * 2 + 128 * h
    expert = h * 32 * 2 + 32 * h
    shared = h * 16 * 2 + 16 * h
    active = v * h + 2 * attn + dense + h * 8 + 2 * expert + shared
    assert mfu.matmul_params(cfg, v) == active
    assert mfu.matmul_params(cfg, v, active_only=False) == active + 6 * expert
    assert mfu.flops_per_token(cfg, v, s) == 6 * active + 12 * 2 * 64 * s
    assert mfu.mfu(1000.0, 1e9, 2, 1.0) == pytest.approx(0.5)
    assert mfu.mfu(1000.0, 1e9, 2, None) is None


def test_peak_table():
    assert mfu.peak_tflops("cpu", torch.bfloat16) is None
    assert mfu.peak_tflops("cpu", torch.bfloat16, override=123.0) == 123.0
    assert mfu.PEAK_TFLOPS["H100"]["bf16"] == 989.0 and mfu.PEAK_TFLOPS["A100"]["bf16"] == 312.0
    assert mfu.PEAK_TFLOPS["H200"]["bf16"] == 989.0


def test_tensorboard_missing_warns_and_trains_on(tmp_path, monkeypatch, capsys):
    """As Megatron: --tensorboard-dir without tensorboard warns once and the run goes on."""
    from moecore.training import pretrain

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    args = argparse.Namespace(tensorboard_dir=str(tmp_path), tensorboard_queue_size=10,
                              wandb_project="")
    writers = MetricWriters(args)
    assert writers.tb is None and not writers.active
    writers.scalars({"lm loss": 1.0}, 1)
    writers.close()
    err = capsys.readouterr().err
    assert err.count("WARNING: --tensorboard-dir") == 1 and "pip install tensorboard" in err
    out = pretrain(["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
                    "--seq-length", "8", "--mock-data", "--vocab-size", "32",
                    "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "2",
                    "--device", "cpu", "--tensorboard-dir", str(tmp_path / "tb")])
    assert out["iterations"] == [1, 2]
    assert capsys.readouterr().err.count("WARNING: --tensorboard-dir") == 1


def test_iteration_values_are_read_only_at_log_iterations(monkeypatch):
    """The loop keeps each step's loss on the device and reads the pending ones (one host copy)
    at log iterations, before evaluation and at the end; the logged numbers are unchanged."""
    from moecore.training import pretrain
    from moecore.training import state as state_mod

    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--ffn-hidden-size", "64", "--seq-length", "16", "--max-position-embeddings", "16",
            "--num-experts", "4", "--moe-router-topk", "2", "--mock-data", "--vocab-size", "64",
            "--tokenizer-type", "NullTokenizer", "--micro-batch-size", "2", "--lr", "1e-3",
            "--train-iters", "7", "--eval-iters", "1", "--eval-interval", "5",
            "--split", "90,10,0", "--device", "cpu", "--seed", "3", "--disable-bias-linear",
            "--moe-aux-loss-coeff", "1e-2"]
    reads: list[list[int]] = []
    orig = state_mod.RunState._read_pending

    def spy(self):
        reads.append([p["iteration"] for p in self._pending])
        orig(self)

    monkeypatch.setattr(state_mod.RunState, "_read_pending", spy)
    lazy = pretrain(argv + ["--log-interval", "3"])
    # log at 3 and 6, eval after 5, the last iteration (7), then summary() with nothing left
    assert reads == [[1, 2, 3], [4, 5], [6], [7], []]
    reads.clear()
    eager = pretrain(argv + ["--log-interval", "1"])
    assert reads[:7] == [[i] for i in range(1, 8)]
    assert lazy["lm_loss"] == eager["lm_loss"] and len(lazy["lm_loss"]) == 7
    assert lazy["iterations"] == list(range(1, 8))
    assert lazy["moe_losses"] == eager["moe_losses"] and lazy["moe_losses"][0]
