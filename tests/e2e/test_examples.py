"""The example launch scripts run to completion on CPU (shortened with extra flags)."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moecore.arguments import parse_args, transformer_config_from_args
from moecore.training.mfu import matmul_params

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


def test_deepseek_v3_tiny_script_runs_on_four_ranks():
    log = _run(["bash", "examples/deepseek_v3/train_deepseek_v3_tiny.sh", "--train-iters", "4",
                "--eval-interval", "4", "--eval-iters", "1", "--log-interval", "2"])
    assert len(_losses(log)) == 2
    assert len(re.findall(r"\| mtp_1 loss: [0-9.E+-]+", log)) == 2
    assert len(re.findall(r"\| seq_load_balancing_loss: [0-9.E+-]+", log)) == 2
    assert "validation loss at iteration 4" in log


@pytest.mark.parametrize("script,world,vocab,total,active", [
    # DeepSeek-V3: 671B parameters, 37B active (the paper's counts, without the MTP module).
    ("train_deepseek_v3_671b.sh", 1024, 129280, 671e9, 37e9),
    # Moonlight-16B-A3B: 16B (15.96B in Hugging Face's count), 3B active.
    ("train_moonlight_16b.sh", 8, 163840, 15.96e9, 3e9),
])
def test_full_size_scripts_parse_to_the_published_model(script, world, vocab, total, active):
    """The launch scripts' flags pass moecore's validation at their GPU count and build the
    published model: matmul weights plus the input embedding within 3% of its size."""
    out = _run(["bash", f"examples/deepseek_v3/{script}", "/ckpt", "tok", "/data/text"],
               timeout=60, DRY_RUN="1")
    args = parse_args(out.splitlines(), world_size=world)
    cfg = transformer_config_from_args(args)
    assert cfg.multi_latent_attention and cfg.moe_router_enable_expert_bias
    assert cfg.mtp_num_layers == (1 if "deepseek_v3" in script else None)
    cfg = dataclasses.replace(cfg, mtp_num_layers=None)  # the published counts leave MTP out
    embedding = vocab * cfg.hidden_size
    assert abs(matmul_params(cfg, vocab, active_only=False) + embedding - total) < 0.03 * total
    assert abs(matmul_params(cfg, vocab) + embedding - active) < 0.03 * active


def test_olmoe_tiny_script_runs_on_four_ranks():
    log = _run(["bash", "examples/olmoe/train_olmoe_tiny.sh", "--train-iters", "4",
                "--eval-interval", "4", "--eval-iters", "1", "--log-interval", "2"])
    assert len(_losses(log)) == 2
    assert len(re.findall(r"\| z_loss: [0-9.E+-]+", log)) == 2
    assert "validation loss at iteration 4" in log


def test_olmoe_full_size_script_parses_to_the_published_model():
    """OLMoE-1B-7B: 6.92B parameters, 1.28B active (Hugging Face's count of the released
    weights), with QK norm over the whole projections and no top-k renormalisation."""
    out = _run(["bash", "examples/olmoe/train_olmoe_1b_7b.sh", "/ckpt", "tok", "/data/text"],
               timeout=60, DRY_RUN="1")
    cfg = transformer_config_from_args(parse_args(out.splitlines(), world_size=32))
    assert cfg.qk_layernorm and cfg.qk_layernorm_hidden_dim and cfg.moe_router_pre_softmax
    total, active, embedding = 6.92e9, 1.28e9, 50304 * cfg.hidden_size
    assert abs(matmul_params(cfg, 50304, active_only=False) + embedding - total) < 0.03 * total
    assert abs(matmul_params(cfg, 50304) + embedding - active) < 0.03 * active


def test_qwen3_moe_tiny_script_runs_on_four_ranks():
    log = _run(["bash", "examples/qwen3_moe/train_qwen3_moe_tiny.sh", "--train-iters", "4",
                "--eval-interval", "4", "--eval-iters", "1", "--log-interval", "2"])
    assert len(_losses(log)) == 2
    assert len(re.findall(r"\| load_balancing_loss: [0-9.E+-]+", log)) == 2
    assert "validation loss at iteration 4" in log


def test_qwen3_30b_a3b_script_parses_to_the_published_model():
    """Qwen3-30B-A3B: 30.5B parameters, 3.3B active (Qwen's model card), at 16 GPUs."""
    out = _run(["bash", "examples/qwen3_moe/train_qwen3_30b_a3b.sh", "/ckpt", "tok",
                "/data/text"], timeout=60, DRY_RUN="1")
    cfg = transformer_config_from_args(parse_args(out.splitlines(), world_size=16))
    assert cfg.qk_layernorm and cfg.kv_channels == 128 and cfg.num_query_groups == 4
    assert not cfg.moe_router_pre_softmax and cfg.moe_shared_expert_intermediate_size is None
    vocab, total, active = 151936, 30.5e9, 3.3e9
    embedding = vocab * cfg.hidden_size
    assert abs(matmul_params(cfg, vocab, active_only=False) + embedding - total) < 0.03 * total
    assert abs(matmul_params(cfg, vocab) + embedding - active) < 0.03 * active


def test_gpt_oss_tiny_script_runs_on_four_ranks():
    log = _run(["bash", "examples/gpt_oss/train_gpt_oss_tiny.sh", "--train-iters", "4",
                "--eval-interval", "4", "--eval-iters", "1", "--log-interval", "2"])
    assert len(_losses(log)) == 2
    assert "validation loss at iteration 4" in log


def test_gpt_oss_20b_script_parses_to_the_published_model():
    """gpt-oss-20b's model card: 20.91B parameters, 3.61B active (without the input
    embedding); the flags pass moecore's validation on 8 GPUs."""
    out = _run(["bash", "examples/gpt_oss/train_gpt_oss_20b.sh", "/ckpt", "tok", "/data/text"],
               timeout=60, DRY_RUN="1")
    args = parse_args(out.splitlines(), world_size=8)
    cfg = transformer_config_from_args(args)
    assert cfg.softmax_type == "learnable" and cfg.window_size == (127, 0)
    assert cfg.add_bias_linear and cfg.glu_linear_offset == 1.0
    vocab = 201088
    total = matmul_params(cfg, vocab, active_only=False) + vocab * cfg.hidden_size
    assert abs(total - 20.91e9) < 0.03 * 20.91e9
    assert abs(matmul_params(cfg, vocab) - 3.61e9) < 0.03 * 3.61e9


def test_megatron_gpt_oss_recipe_flags_train_scaled_down():
    """Megatron-LM's gpt-oss recipe flags (GPT-OSS-specific block verbatim), sizes scaled
    down, train on CPU."""
    recipe = ["--quick-geglu", "--glu-linear-offset", "1.0", "--softmax-type", "learnable",
              "--window-attn-skip-freq", "2", "--window-size", "128,0",
              "--activation-func-clamp-value", "7.0", "--enable-gpt-oss",
              "--no-masked-softmax-fusion", "--no-rope-fusion", "--no-bias-gelu-fusion",
              "--no-bias-dropout-fusion", "--export-force-local-attention",
              "--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0.0",
              "--moe-router-dtype", "fp32", "--moe-router-score-function", "softmax",
              "--rotary-percent", "1.0", "--rotary-base", "150000", "--use-mcore-models"]
    log = _run([sys.executable, "pretrain_gpt.py", *recipe, "--num-layers", "2",
                "--hidden-size", "64", "--ffn-hidden-size", "32", "--num-attention-heads", "8",
                "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "16",
                "--seq-length", "32", "--max-position-embeddings", "32",
                "--position-embedding-type", "rope", "--normalization", "RMSNorm",
                "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--moe-router-topk", "2",
                "--moe-grouped-gemm", "--untie-embeddings-and-output-weights",
                "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
                "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
                "--train-iters", "2", "--log-interval", "1", "--eval-iters", "0",
                "--device", "cpu"])
    assert len(_losses(log)) == 2


def test_shakespeare_example_trains(tmp_path):
    log = _run(["bash", "examples/shakespeare_moe/run.sh", "--train-iters", "40",
                "--eval-interval", "40", "--log-interval", "10"])
    losses = _losses(log)
    assert len(losses) == 4 and losses[-1] < losses[0]
    sample = log.split("----- sample", 1)[-1]  # tools/generate.py on the saved checkpoint
    assert re.search(r"----- prompt: .* \((length|stop)\)\n\S", sample), log[-2000:]


def test_minimal_trainer_learns():
    log = _run([sys.executable, "examples/minimal_trainer.py", "--steps", "20"])
    losses = [float(x) for x in re.findall(r"lm loss ([0-9.]+)", log)]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0]
