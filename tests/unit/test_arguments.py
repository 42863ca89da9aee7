"""Megatron flag surface: the Mixtral 8x7B script parses; unsupported and unknown flags fail with
messages naming them; validation of batch/parallel sizes; --moe-layer-freq patterns."""

from __future__ import annotations

import re
import shlex

import pytest
import torch
import torch.nn.functional as F

from moecore.arguments import (
    NOOP_FLAGS,
    UNSUPPORTED_FLAGS,
    build_parser,
    parse_args,
    parse_moe_layer_freq,
    transformer_config_from_args,
    validate_args,
    validation,
)
from tests.cli import BASE, parse_error

# The argument arrays of Megatron-LM's examples/mixtral/train_mixtral_8x7b_distributed.sh (the
# seed script), with $CHECKPOINT_PATH, $TOKENIZER_MODEL and $DATA_PATH filled in and the wandb
# block enabled. Comments are kept as in the script (shlex drops them, as bash does).
MIXTRAL_SCRIPT = """
    --use-mcore-models
    --disable-bias-linear
    --seq-length 2048
    --max-position-embeddings 32768
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --init-method-std 0.01
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --normalization RMSNorm
    --position-embedding-type rope
    --swiglu
    --untie-embeddings-and-output-weights
    --group-query-attention
    --num-query-groups 8
    --no-masked-softmax-fusion
    --no-position-embedding

    --num-experts 8
    --expert-model-parallel-size 4
    --moe-router-load-balancing-type aux_loss # options: aux_loss, sinkhorn, None.
    --moe-router-topk 2
    --moe-aux-loss-coeff 1e-2
    --moe-grouped-gemm

    --tokenizer-type Llama2Tokenizer
    --tokenizer-model {tokenizer_model}
    --data-path {data_path}
    --split 99990,8,2

    --micro-batch-size 1
    --global-batch-size 128
    --lr 1e-4
    --train-iters 500000
    --lr-decay-iters 320000
    --lr-decay-style cosine
    --min-lr 1.0e-5
    --weight-decay 0.1
    --lr-warmup-iters 500
    --clip-grad 1.0
    --bf16

    --tensor-model-parallel-size 4
    --pipeline-model-parallel-size 1
    --sequence-parallel
    --use-distributed-optimizer

    --log-interval 1
    --save-interval 10000
    --eval-interval 1000
    --eval-iters 10
    --save {checkpoint_path}
    --load {checkpoint_path}
    --tensorboard-dir "{checkpoint_path}/tensorboard"
    --no-load-optim
    --no-load-rng
    --wandb-project Mixtral-Finetuning
    --wandb-exp-name Mixtral_8x7B
"""



def mixtral_argv(tmp="/ckpt") -> list[str]:
    text = MIXTRAL_SCRIPT.format(tokenizer_model="/models/tokenizer.model",
                                 data_path="/data/mixtral_text_document", checkpoint_path=tmp)
    return shlex.split(text, comments=True)


def test_mixtral_script_parses_with_megatron_meanings():
    args = parse_args(mixtral_argv(), validate=False)
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size) == (32, 4096, 14336)
    assert (args.num_attention_heads, args.num_query_groups) == (32, 8)
    assert args.group_query_attention and args.swiglu and args.untie_embeddings_and_output_weights
    assert args.add_bias_linear is False and args.add_position_embedding is False
    assert args.normalization == "RMSNorm" and args.position_embedding_type == "rope"
    assert (args.num_experts, args.expert_model_parallel_size, args.moe_router_topk) == (8, 4, 2)
    assert args.moe_router_load_balancing_type == "aux_loss" and args.moe_grouped_gemm
    assert args.moe_aux_loss_coeff == pytest.approx(1e-2)
    assert args.tokenizer_type == "Llama2Tokenizer"
    assert args.tokenizer_model == "/models/tokenizer.model"
    assert args.data_path == ["/data/mixtral_text_document"] and args.split == "99990,8,2"
    assert (args.micro_batch_size, args.global_batch_size, args.train_iters) == (1, 128, 500000)
    assert (args.lr_decay_iters, args.lr_warmup_iters, args.lr_decay_style) == (320000, 500,
                                                                                 "cosine")
    assert args.min_lr == pytest.approx(1e-5) and args.weight_decay == pytest.approx(0.1)
    assert args.bf16 and args.sequence_parallel and args.tensor_model_parallel_size == 4
    assert args.use_distributed_optimizer
    assert (args.save, args.load, args.tensorboard_dir) == ("/ckpt", "/ckpt", "/ckpt/tensorboard")
    assert args.no_load_optim and args.no_load_rng and args.save_interval == 10000
    assert (args.eval_interval, args.eval_iters, args.log_interval) == (1000, 10, 1)
    assert (args.wandb_project, args.wandb_exp_name) == ("Mixtral-Finetuning", "Mixtral_8x7B")
    assert args.noop_flags_given == ["--use-mcore-models", "--no-masked-softmax-fusion"]


def test_mixtral_script_validates_on_16_ranks():
    args = parse_args(mixtral_argv(), validate=False)
    validate_args(args, world_size=16)
    assert args.use_distributed_optimizer and args.pipeline_model_parallel_size == 1
    assert args.virtual_pipeline_model_parallel_size is None
    assert args.data_parallel_size == 4 and args.num_microbatches == 32
    assert args.position_embedding_type == "rope"
    cfg = transformer_config_from_args(args)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels) == (
        32, 4096, 14336, 128)
    assert cfg.num_query_groups == 8 and cfg.gated_linear_unit and cfg.activation_func is F.silu
    assert cfg.num_moe_experts == 8 and cfg.moe_ffn_hidden_size == 14336
    assert cfg.expert_model_parallel_size == 4 and cfg.expert_tensor_parallel_size == 4
    assert cfg.sequence_parallel and cfg.params_dtype == torch.bfloat16
    assert cfg.moe_layer_pattern() == [True] * 32
    assert cfg.share_embeddings_and_output_weights is False
    assert cfg.init_method_std == pytest.approx(0.01) and cfg.normalization == "RMSNorm"


def test_help_shows_megatron_groups_and_noop_markers(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for title in ("network size:", "regularization:", "training:", "initialization:",
                  "learning rate:", "checkpointing:", "mixed precision:", "distributed:",
                  "validation:", "data and dataloader:", "tokenizer:", "moe:", "logging:"):
        assert title in out
    assert "[no effect in moecore]" in out and "--use-mcore-models" in out
    assert "Megatron-LM flags refused with an error: --fp8-format" in out


def test_every_unsupported_flag_fails_naming_it(capsys):
    for flag in UNSUPPORTED_FLAGS:
        err = parse_error(BASE + [flag, "x"], capsys)
        assert f"{flag} is a Megatron-LM flag that moecore does not support" in err, flag


def test_unknown_flag_fails():
    with pytest.raises(SystemExit):
        build_parser().parse_args(BASE + ["--no-such-megatron-flag"])


def test_noop_flags_parse_and_are_reported():
    parser = build_parser()
    argv = list(BASE)
    for action in parser._actions:
        flag = next((s for s in action.option_strings if s in NOOP_FLAGS), None)
        if flag is None:
            continue
        argv.append(flag)
        if action.nargs != 0:
            argv.append(str(action.choices[0]) if action.choices else "1")
    args = parse_args(argv)
    assert sorted(args.noop_flags_given) == sorted(NOOP_FLAGS)


@pytest.mark.parametrize("extra, match", [
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--pipeline-model-parallel-size", "3"], "world size 1 is not divisible by tensor \\(1\\) "
                                              "x pipeline \\(3\\)"),
    (["--moe-token-dispatcher-type", "flex", "--num-experts", "4", "--disable-bias-linear"],
     "flex"),
    (["--tokenizer-type", "BertWordPieceCase"], "BertWordPieceCase is not supported"),
])
def test_not_yet_supported_features_fail_clearly(extra, match, capsys):
    assert re.search(match, parse_error(BASE + extra, capsys))


def test_pipeline_size_one_is_fine():
    assert parse_args(BASE + ["--pipeline-model-parallel-size", "1"]).pipeline_model_parallel_size \
        == 1


def _validated(extra: list[str], world_size: int):
    args = parse_args(BASE + extra, validate=False)
    return validate_args(args, world_size=world_size)


def test_pipeline_virtual_and_uneven_stage_validation():
    args = _validated(["--num-layers", "8", "--pipeline-model-parallel-size", "2",
                       "--num-layers-per-virtual-pipeline-stage", "2",
                       "--global-batch-size", "8", "--use-distributed-optimizer",
                       "--overlap-grad-reduce", "--overlap-param-gather"], 4)
    assert args.virtual_pipeline_model_parallel_size == 2 and args.num_microbatches == 2
    args = _validated(["--num-layers", "6", "--pipeline-model-parallel-size", "2",
                       "--num-virtual-stages-per-pipeline-rank", "2",
                       "--decoder-first-pipeline-num-layers", "2",
                       "--decoder-last-pipeline-num-layers", "4", "--global-batch-size", "4"], 2)
    assert args.virtual_pipeline_model_parallel_size == 2
    bad = [
        (["--num-layers", "3", "--pipeline-model-parallel-size", "2"],
         "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"),
        (["--num-layers", "8", "--pipeline-model-parallel-size", "2",
          "--num-layers-per-virtual-pipeline-stage", "3"],
         "must be a multiple of --pipeline-model-parallel-size 2 x "
         "--num-layers-per-virtual-pipeline-stage 3 = 6"),
        (["--num-layers", "8", "--pipeline-model-parallel-size", "4",
          "--decoder-first-pipeline-num-layers", "3"],
         "5 of --num-layers 8 remain for 3 other pipeline stages"),
        (["--num-layers", "4", "--pipeline-model-parallel-size", "2",
          "--decoder-first-pipeline-num-layers", "1", "--decoder-last-pipeline-num-layers", "2"],
         "= 3 must equal --num-layers 4"),
        (["--num-layers", "4", "--num-virtual-stages-per-pipeline-rank", "2"],
         "need --pipeline-model-parallel-size >= 2"),
        (["--num-layers", "6", "--pipeline-model-parallel-size", "2",
          "--num-virtual-stages-per-pipeline-rank", "2",
          "--decoder-first-pipeline-num-layers", "1", "--decoder-last-pipeline-num-layers", "5"],
         "stage 0 holds 1 layers, which do not split into 2 virtual stages"),
        (["--ddp-bucket-size", "0"], "--ddp-bucket-size 0 must be >= 1"),
    ]
    for extra, match in bad:
        with pytest.raises(ValueError, match=re.escape(match)):
            _validated(extra, 4)


def test_batch_and_world_size_validation():
    args = parse_args(BASE, validate=False)
    validate_args(args, world_size=4)
    assert args.data_parallel_size == 4 and args.global_batch_size == 8
    assert args.num_microbatches == 1
    args = parse_args(BASE + ["--global-batch-size", "24"], validate=False)
    validate_args(args, world_size=4)
    assert args.num_microbatches == 3
    args = parse_args(BASE + ["--global-batch-size", "12"], validate=False)
    with pytest.raises(ValueError, match=r"--global-batch-size 12 is not divisible by "
                                         r"--micro-batch-size 2 x data-parallel size 4 = 8"):
        validate_args(args, world_size=4)
    args = parse_args(BASE + ["--tensor-model-parallel-size", "2"], validate=False)
    with pytest.raises(ValueError, match="world size 3 is not divisible by tensor"):
        validate_args(args, world_size=3)
    args = parse_args(BASE + ["--num-experts", "4", "--expert-model-parallel-size", "4",
                              "--disable-bias-linear"], validate=False)
    with pytest.raises(ValueError, match="world size 2 is not divisible by expert-tensor"):
        validate_args(args, world_size=2)
    args = parse_args(BASE + ["--num-experts", "6", "--expert-model-parallel-size", "4",
                              "--disable-bias-linear"], validate=False)
    with pytest.raises(ValueError, match="num_moe_experts=6 is not divisible"):
        validate_args(args, world_size=4)


def test_schedule_and_misc_validation(capsys):
    no_iters = [a for a in BASE if a not in ("--train-iters", "10")]
    assert "exactly one of --train-iters and --train-samples" in parse_error(no_iters, capsys)
    both = BASE + ["--train-samples", "100"]
    assert "exactly one of --train-iters" in parse_error(both, capsys)
    assert "only one of --lr-warmup-fraction" in parse_error(
        BASE + ["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], capsys)
    args = parse_args(no_iters + ["--train-samples", "100", "--global-batch-size", "8"])
    assert args.train_iters == 12 and args.lr_decay_samples == 100
    no_lr = [a for a in BASE if a not in ("--lr", "1e-3")]
    assert "--lr is required" in parse_error(no_lr, capsys)
    assert "--bf16 and --fp16" in parse_error(BASE + ["--bf16", "--fp16"], capsys)
    no_data = [a for a in BASE if a != "--mock-data"]
    assert "--data-path" in parse_error(no_data, capsys)
    assert "--disable-bias-linear" in parse_error(BASE + ["--num-experts", "4"], capsys)
    assert "--save-interval needs --save" in parse_error(BASE + ["--save-interval", "5"], capsys)


def test_model_shape_defaults_follow_megatron():
    args = parse_args(BASE + ["--swiglu"])
    assert args.ffn_hidden_size == int(4 * 64 * 2 / 3 / 64) * 64 == 128
    assert parse_args(BASE).ffn_hidden_size == 256
    assert parse_args(BASE).num_query_groups == 4  # without --group-query-attention
    assert parse_args(BASE).max_position_embeddings == 32
    assert parse_args(BASE).position_embedding_type == "learned_absolute"
    assert parse_args(BASE + ["--no-position-embedding"]).position_embedding_type == "none"
    assert parse_args(BASE + ["--use-rotary-position-embeddings"]).position_embedding_type == \
        "rope"
    args = parse_args(BASE + ["--sequence-parallel"])  # TP=1: SP is meaningless, dropped
    assert args.sequence_parallel is False
    cfg = transformer_config_from_args(parse_args(BASE + ["--bf16", "--squared-relu"]))
    assert cfg.params_dtype == torch.bfloat16 and cfg.share_embeddings_and_output_weights
    x = torch.tensor([-1.0, 2.0])
    assert torch.equal(cfg.activation_func(x), torch.tensor([0.0, 4.0]))
    assert parse_args(BASE + ["--recompute-activations"]).recompute_granularity == "selective"


def test_moe_layer_freq_patterns():
    assert parse_moe_layer_freq("([0]*1+[1]*3)*4") == [0, 1, 1, 1] * 4
    assert parse_moe_layer_freq("[1]*3+[0]") == [1, 1, 1, 0]
    assert parse_moe_layer_freq("([1, 0])*2") == [1, 0, 1, 0]
    assert parse_moe_layer_freq("2*[0,1]") == [0, 1, 0, 1]
    assert parse_moe_layer_freq("3") == 3 and parse_moe_layer_freq(2) == 2
    args = parse_args(BASE + ["--num-experts", "4", "--disable-bias-linear", "--num-layers", "4",
                              "--moe-layer-freq", "([0]*1+[1]*1)*2"])
    assert transformer_config_from_args(args).moe_layer_pattern() == [False, True, False, True]
    args = parse_args(BASE + ["--num-experts", "4", "--disable-bias-linear", "--num-layers", "4",
                              "--moe-layer-freq", "2"])
    assert transformer_config_from_args(args).moe_layer_pattern() == [True, False, True, False]


@pytest.mark.parametrize("bad, match", [
    ("__import__('os').system('true')", "neither an integer"),
    ("[__import__('os')]", "may only contain"),
    ("[1]*(2**4)", "may only contain"),
    ("[1]*[1]", "cannot multiply two lists"),
    ("[1]+2", "joins two lists"),
    ("[2]*4", "must be 0 \\(dense\\) or 1"),
    ("[1]*10000000", "expands to 10000000 entries"),
    ("[1,", "not a valid expression"),
    ("[1.0]*2", "may only contain"),
    ("abc", "neither an integer"),
])
def test_moe_layer_freq_rejects_anything_but_int_lists(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_moe_layer_freq(bad)


def test_moe_layer_freq_length_must_match_layers(capsys):
    err = parse_error(BASE + ["--num-experts", "4", "--disable-bias-linear",
                               "--moe-layer-freq", "[1]*3"], capsys)
    assert "--moe-layer-freq pattern has 3 entries but --num-layers is 2" in err
    err = parse_error(BASE + ["--moe-layer-freq", "[1]*(3)+x"], capsys)
    assert "argument --moe-layer-freq" in err


MOE = ["--num-experts", "4", "--disable-bias-linear"]


def test_load_balancing_types_and_coefficients_take_lists(capsys):
    args = parse_args(BASE + MOE + ["--moe-router-load-balancing-type", "seq_aux_loss",
                                    "global_aux_loss", "--moe-aux-loss-coeff", "1e-4", "1e-3"])
    assert args.moe_router_load_balancing_type == ["seq_aux_loss", "global_aux_loss"]
    assert args.moe_aux_loss_coeff == [1e-4, 1e-3]
    cfg = transformer_config_from_args(args)
    assert cfg.moe_router_load_balancing_type == ["seq_aux_loss", "global_aux_loss"]
    # One value keeps Megatron's scalar form (saved args and configs as before).
    args = parse_args(BASE + MOE + ["--moe-router-load-balancing-type", "seq_aux_loss",
                                    "--moe-aux-loss-coeff", "1e-4"])
    assert args.moe_router_load_balancing_type == "seq_aux_loss"
    assert args.moe_aux_loss_coeff == 1e-4
    err = parse_error(BASE + MOE + ["--moe-router-load-balancing-type", "seq_aux_loss",
                                    "global_aux_loss", "--moe-aux-loss-coeff", "1e-4"], capsys)
    line = err.strip().splitlines()[-1]
    assert "--moe-router-load-balancing-type has 2 types but --moe-aux-loss-coeff has 1 " \
           "value; give one coefficient per type" in line
    err = parse_error(BASE + MOE + ["--moe-router-load-balancing-type", "aux_loss", "bogus"],
                      capsys)
    assert "argument --moe-router-load-balancing-type: invalid choice: 'bogus'" in err


def test_pre_softmax_is_accepted_with_sigmoid():
    args = parse_args(BASE + MOE + ["--moe-router-score-function", "sigmoid",
                                    "--moe-router-pre-softmax"])
    cfg = transformer_config_from_args(args)
    assert cfg.moe_router_pre_softmax and cfg.moe_router_score_function == "sigmoid"


@pytest.mark.parametrize("extra,message", [
    (["--moe-router-topk", "5"], "--moe-router-topk 5 must be between 1 and --num-experts 4"),
    (["--moe-router-num-groups", "3", "--moe-router-group-topk", "1"],
     "--num-experts 4 must be divisible by --moe-router-num-groups 3"),
    (["--moe-router-num-groups", "2"],
     "set both --moe-router-num-groups and --moe-router-group-topk, or neither"),
    (["--moe-shared-expert-overlap"], "--moe-shared-expert-overlap needs shared experts: set "
     "--moe-shared-expert-intermediate-size or drop --moe-shared-expert-overlap"),
    (["--moe-token-drop-policy", "position", "--moe-pad-expert-input-to-capacity"],
     "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"),
])
def test_config_errors_name_flags(extra, message, capsys):
    """TransformerConfig's checks name fields; parse_args shows command-line users the flags."""
    err = parse_error(BASE + MOE + extra, capsys).strip().splitlines()[-1]
    assert err.endswith("error: " + message), err


# ---- value ranges (issue #24): zero/negative values where they mean nothing ------------------
_DATA = ["--data-path", "corpus", "--tokenizer-type", "NullTokenizer"]


def _without_mock(argv):
    return [a for a in argv if a != "--mock-data"]


@pytest.mark.parametrize("argv,message", [
    (BASE + ["--micro-batch-size", "0"], "--micro-batch-size 0 must be >= 1"),
    (BASE + ["--log-interval", "0"], "--log-interval 0 must be >= 1"),
    (BASE + MOE + ["--moe-ffn-hidden-size", "0"], "--moe-ffn-hidden-size 0 must be >= 1"),
    (BASE + ["--eval-iters=-1"], "--eval-iters -1 must be >= 0"),
    (BASE + ["--num-layers", "0"], "--num-layers 0 must be >= 1"),
    (BASE + ["--split=-10,60,50"], "--split '-10,60,50' must be 1 to 3 non-negative numbers"),
    (BASE + ["--split", "1,2,3,4"], "--split '1,2,3,4' must be 1 to 3 non-negative numbers"),
    (_without_mock(BASE) + _DATA + ["--split", "100,0,0"],
     "--split '100,0,0' leaves the validation set empty but --eval-iters 100 asks for "
     "evaluation; give validation a share (e.g. 969,30,1) or pass --eval-iters 0"),
    (BASE + ["--num-attention-heads", "0"], "--num-attention-heads 0 must be >= 1"),
    (BASE + ["--global-batch-size", "0"], "--global-batch-size 0 must be >= 1"),
    (BASE + ["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size 0 must be >= 1"),
    (BASE + ["--save", "x", "--save-interval", "0"], "--save-interval 0 must be >= 1"),
    (BASE + MOE + ["--moe-router-topk", "0"], "--moe-router-topk 0 must be >= 1"),
    (BASE + MOE + ["--moe-aux-loss-coeff=-0.1"], "--moe-aux-loss-coeff -0.1 must be >= 0"),
    (BASE + ["--num-experts", "0"], "--num-experts 0 must be >= 1"),
    (BASE + ["--seed=-1"], "--seed -1 must be >= 0"),
    (BASE + ["--num-workers=-1"], "--num-workers -1 must be >= 0"),
    (BASE + ["--lr=-1e-3"], "--lr -0.001 must be >= 0"),
    (BASE + ["--adam-eps", "0"], "--adam-eps 0.0 must be > 0"),
    (BASE + ["--norm-epsilon", "0"], "--norm-epsilon 0.0 must be > 0"),
    (BASE + ["--init-method-std=-0.02"], "--init-method-std -0.02 must be > 0"),
    (BASE + ["--hidden-dropout", "1.0"], "--hidden-dropout 1.0 must be in [0, 1)"),
    (BASE + ["--adam-beta2", "1.5"], "--adam-beta2 1.5 must be in [0, 1)"),
    (BASE + ["--rotary-percent", "0"], "--rotary-percent 0.0 must be in (0, 1]"),
    (BASE + ["--clip-grad", "nan"], "--clip-grad nan must be a finite number"),
    (BASE + ["--profile-ranks", "0", "-1"], "--profile-ranks -1 must be >= 0"),
])
def test_meaningless_numbers_fail_in_one_line_naming_the_flag(argv, message, capsys):
    err = parse_error(argv, capsys).strip().splitlines()[-1]
    assert "error: " + message in err, err


# Numeric flags without a range check, each with the reason (a new int/float flag must be
# checked in validation._AT_LEAST_1 / _AT_LEAST_0 / _ABOVE_0 / _INTERVALS or listed here).
_UNRANGED = {
    "glu_linear_offset": "any real offset is meaningful",
    "mtp_num_layers": "checked in _validate_model_shape", "mtp_loss_scaling_factor": "idem",
    "rampup_batch_size": "checked by batch_rampup", "cuda_graph_warmup_steps": "checked with "
    "--cuda-graph-impl", "decoupled_lr": "checked in _validate_decoupled_lr",
    "decoupled_min_lr": "idem", "num_layers_per_virtual_pipeline_stage": "checked with the "
    "pipeline", "decoder_first_pipeline_num_layers": "checked by pipeline_layer_layout",
    "decoder_last_pipeline_num_layers": "idem", "ddp_bucket_size": "checked with the DDP flags",
    "profile_step_start": "checked with --profile", "profile_step_end": "idem",
    "empty_unused_memory_level": "choices", "local_rank": "set by the launcher",
    "logging_level": "Python logging levels", "train_sync_interval": "no effect",
    "manual_gc_interval": "no effect", "timing_log_level": "no effect",
}


def test_every_numeric_flag_has_a_range_or_a_reason():
    ranged = {*validation._AT_LEAST_1, *validation._AT_LEAST_0, *validation._ABOVE_0,
              *validation._INTERVALS}
    numeric = {a.dest for a in build_parser()._actions if a.type in (int, float)}
    assert numeric - ranged - set(_UNRANGED) == set()
    assert ranged <= numeric and not ranged & set(_UNRANGED)
