"""Config from one place: every ``TransformerConfig`` field has a flag (or is derived or marked
library-only), the Megatron renames reach their fields, and the typed optimizer/checkpoint
configs default as the parser does."""

from __future__ import annotations

import dataclasses

import pytest

from moecore.arguments import build_parser, parse_args, transformer_config_from_args
from moecore.arguments.config_flags import (
    DERIVED_FIELDS,
    FLAG_RENAMES,
    INVERTED_FLAGS,
    LIBRARY_ONLY_FIELDS,
    config_flag_problems,
    field_flags,
    flag_dest,
    name_flags_in_error,
)
from moecore.checkpointing import CheckpointConfig
from moecore.config import TransformerConfig
from moecore.optimizer import OptimizerConfig
from tests.cli import BASE

DESTS = {a.dest for a in build_parser()._actions}


def test_every_config_field_has_a_flag_or_a_mark():
    assert config_flag_problems(DESTS) == []


def test_a_field_without_flag_or_mark_is_reported():
    problems = config_flag_problems(DESTS - {"moe_shared_expert_gate", "num_experts"})
    assert any(p.startswith("moe_shared_expert_gate: no flag") for p in problems)
    assert any(p.startswith("num_moe_experts: no flag") for p in problems)
    assert any(p.startswith("num_experts: no flag has this dest") for p in problems)


def test_each_field_has_one_source():
    for name in (f.name for f in dataclasses.fields(TransformerConfig)):
        kinds = [name in DERIVED_FIELDS, name in LIBRARY_ONLY_FIELDS, flag_dest(name) in DESTS]
        assert sum(kinds) == 1, name


@pytest.mark.parametrize("flags, field, value", [
    (["--num-experts", "4", "--disable-bias-linear"], "num_moe_experts", 4),
    (["--swiglu"], "gated_linear_unit", True),
    (["--norm-epsilon", "1e-6"], "layernorm_epsilon", 1e-6),
    (["--untie-embeddings-and-output-weights"], "share_embeddings_and_output_weights", False),
    (["--disable-bias-linear"], "add_bias_linear", False),
    (["--num-experts", "4", "--disable-bias-linear", "--moe-shared-expert-intermediate-size",
      "8", "--moe-shared-expert-gate"], "moe_shared_expert_gate", True),
    (["--rotary-base", "500000"], "rotary_base", 500000.0),
])
def test_flags_reach_their_fields(flags, field, value):
    default = getattr(transformer_config_from_args(parse_args(BASE)), field)
    got = getattr(transformer_config_from_args(parse_args(BASE + flags)), field)
    assert got == value and got != default
    assert set(FLAG_RENAMES) | set(INVERTED_FLAGS) <= DESTS


def test_typed_configs_default_as_the_parser():
    defaults = build_parser().parse_args([])
    assert OptimizerConfig.from_args(defaults) == OptimizerConfig()
    assert dataclasses.replace(CheckpointConfig.from_args(defaults), run_args={}) == \
        CheckpointConfig()


def test_typed_configs_take_the_flags():
    args = parse_args(BASE + ["--adam-beta2", "0.95", "--clip-grad", "0.5",
                              "--use-distributed-optimizer", "--save", "/tmp/x",
                              "--no-save-optim", "--async-save"])
    opt = OptimizerConfig.from_args(args)
    assert (opt.adam_beta2, opt.clip_grad, opt.use_distributed_optimizer) == (0.95, 0.5, True)
    assert opt.initial_weight_decay == args.start_weight_decay == args.weight_decay
    ckpt = CheckpointConfig.from_args(args)
    assert (ckpt.save, ckpt.no_save_optim, ckpt.no_save_rng, ckpt.async_save) == \
        ("/tmp/x", True, False, True)
    assert ckpt.run_args["adam_beta2"] == 0.95


def test_config_errors_are_rewritten_with_flags():
    flags = field_flags(build_parser())
    assert flags["num_moe_experts"] == ("--num-experts", True)
    assert flags["moe_router_pre_softmax"] == ("--moe-router-pre-softmax", False)
    assert "share_embeddings_and_output_weights" not in flags  # inverted: the sense would flip
    assert "add_bias_linear" not in flags  # store_false (--disable-bias-linear)
    msg = ("moe_router_topk=3 must be between 1 and num_moe_experts=2; "
           "moe_router_score_function='sigmoid', moe_router_pre_softmax=True, "
           "moe_router_topk_scaling_factor, add_bias_linear=True, --bf16 and bf16=True; "
           "use bf16 or fp32")
    assert name_flags_in_error(msg, flags) == (
        "--moe-router-topk 3 must be between 1 and --num-experts 2; "
        "--moe-router-score-function sigmoid, --moe-router-pre-softmax, "
        "--moe-router-topk-scaling-factor, add_bias_linear=True, --bf16 and --bf16; "
        "use bf16 or fp32")  # a bare name without "_" is more likely a value than a field
