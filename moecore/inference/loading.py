"""Build a model for generation from ``pretrain_gpt.py``'s flags and load its checkpoint.

The flags are the training ones (``--use-checkpoint-args`` takes the model's shape, layout and
tokenizer from ``--load``); flags only training needs (``--train-iters``, a data source) get
harmless defaults. The model is built as the trainer builds it, with two inference changes that
leave its weights alone: no sequence parallelism (a decode step has one token per sequence;
tokens are replicated over TP instead, which MoE dispatchers handle) and no token dropping.
Pipeline parallelism is refused.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from moecore.arguments import parse_args, transformer_config_from_args
from moecore.checkpointing import (
    CheckpointError,
    check_model_state,
    checkpoint_file,
    read_checkpoint_args,
    read_tracker,
)
from moecore.parallel_state import ParallelState
from moecore.training.builders import build_tokenizer_from_args, default_model_provider
from moecore.training.initialize import (
    initialize_distributed,
    initialize_parallel_state_from_args,
    set_seeds,
)

_DATA_FLAGS = ("--mock-data", "--data-path", "--train-data-path")


def parse_generation_args(argv: list[str]) -> argparse.Namespace:
    """``pretrain_gpt.py``'s parser over ``argv`` plus the training-only defaults."""
    argv = list(argv)
    if "--train-iters" not in argv and "--train-samples" not in argv:
        argv += ["--train-iters", "1"]
    for flag, value in (("--micro-batch-size", "1"), ("--lr", "0")):
        if flag not in argv:
            argv += [flag, value]
    if not any(f in argv for f in _DATA_FLAGS):
        argv += ["--mock-data"]
    if "--seq-length" not in argv:  # generation's length limit is the position table's
        length = None
        if "--max-position-embeddings" in argv:
            length = argv[argv.index("--max-position-embeddings") + 1]
        elif "--use-checkpoint-args" in argv and "--load" in argv:
            saved = read_checkpoint_args(argv[argv.index("--load") + 1])
            length = saved.get("seq_length") or saved.get("max_position_embeddings")
        if length:
            argv += ["--seq-length", str(length)]
    return parse_args(argv)


def inference_config(args):
    """The model's :class:`TransformerConfig` for generation (see the module doc)."""
    config = transformer_config_from_args(args)
    config.sequence_parallel = False
    config.moe_expert_capacity_factor = None
    config.moe_pad_expert_input_to_capacity = False
    return config


def load_model_weights(model: nn.Module, root: str, ps: ParallelState) -> int:
    """Load this rank's shard of ``root``'s latest checkpoint into ``model``; the iteration."""
    iteration = read_tracker(root)
    if iteration is None:
        raise CheckpointError(f"--load {root} holds no checkpoint (no tracker file); point "
                              "--load at a directory pretrain_gpt.py --save wrote")
    path = checkpoint_file(root, iteration, ps)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist: the checkpoint was saved with another "
                              "TP/EP layout; pass --use-checkpoint-args (or its sizes), or "
                              "reshard it with tools/checkpoint/convert.py")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state.get("model", state.get("model0"))
    if saved is None:
        raise CheckpointError(f"checkpoint file {path} has no model state")
    check_model_state(model, saved, path)
    model.load_state_dict(saved, strict=True)
    return iteration


def build_model_from_args(args: argparse.Namespace):
    """``(model, tokenizer, parallel_state, created_process_group)`` for validated args;
    initialises torch.distributed (torchrun) and the process groups as ``pretrain`` does."""
    if args.pipeline_model_parallel_size > 1:
        raise ValueError("generation does not support --pipeline-model-parallel-size > 1; "
                         "reshard the checkpoint to PP=1 with tools/checkpoint/convert.py")
    created = initialize_distributed(args)
    ps = initialize_parallel_state_from_args(args)
    set_seeds(args, ps)
    tokenizer = build_tokenizer_from_args(args)
    model = default_model_provider(inference_config(args), args, ps)
    model = model.to(torch.device(args.device))
    if args.load:
        load_model_weights(model, args.load, ps)
    return model.eval(), tokenizer, ps, created
