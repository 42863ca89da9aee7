"""Build the pieces of a run from validated args: tokenizer, model, data iterators."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator

import torch
from torch import nn

from moecore.arguments import transformer_config_from_args
from moecore.config import TransformerConfig
from moecore.data import (
    build_data_loader,
    build_per_split_datasets,
    build_tokenizer,
    build_train_valid_test_datasets,
)
from moecore.data.tokenizers import vocab_size_with_padding
from moecore.models import GPTModel
from moecore.models.gpt import LanguageModelEmbedding
from moecore.moe import MoELayer
from moecore.parallel_state import ParallelState
from moecore.pipeline_parallel.layout import pipeline_layer_layout
from moecore.transformer.layer import TransformerLayer


def build_tokenizer_from_args(args):
    """The tokenizer; with ``--mock-data`` and no ``--tokenizer-type`` a NullTokenizer over
    ``--vocab-size`` ids. Sets ``args.padded_vocab_size`` (Megatron's padding rule)."""
    kind = args.tokenizer_type or "NullTokenizer"
    tokenizer = build_tokenizer(kind, tokenizer_model=args.tokenizer_model,
                                vocab_size=args.vocab_size, vocab_file=args.vocab_file,
                                merge_file=args.merge_file,
                                tiktoken_pattern=args.tiktoken_pattern,
                                tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
                                tiktoken_special_tokens=args.tiktoken_special_tokens,
                                hf_include_special_tokens=args.tokenizer_hf_include_special_tokens,
                                trust_remote_code=args.trust_remote_code)
    args.padded_vocab_size = vocab_size_with_padding(
        tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    return tokenizer


def default_model_provider(config: TransformerConfig, args, ps: ParallelState,
                           **stage) -> nn.Module:
    """``GPTModel`` from the flags (Megatron's ``model_provider`` in ``pretrain_gpt.py``).

    ``stage`` (pipeline parallel): ``pre_process``, ``post_process``, ``layer_offset``,
    ``num_layers`` of one model chunk.
    """
    tied = not args.untie_embeddings_and_output_weights
    return GPTModel(config, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings,
                    share_embeddings_and_output_weights=tied,
                    position_embedding_type=args.position_embedding_type, parallel_state=ps,
                    **stage)


def pipeline_layout(args, ps: ParallelState) -> list[tuple[int, int]]:
    """``[(layer_offset, num_layers)]`` of this rank's model chunks (one per virtual stage)."""
    return pipeline_layer_layout(
        args.num_layers, ps.pp_size, args.virtual_pipeline_model_parallel_size or 1,
        args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers)[ps.pp_rank]


def _stage_kwargs(layout: list[tuple[int, int]], ps: ParallelState) -> list[dict]:
    last = len(layout) - 1
    return [{"pre_process": ps.is_pipeline_first_stage() and v == 0,
             "post_process": ps.is_pipeline_last_stage() and v == last,
             "layer_offset": offset, "num_layers": n} for v, (offset, n) in enumerate(layout)]


def _gpt_chunks_as_one_model(config, args, ps: ParallelState, stages: list[dict]) -> list:
    """This rank's GPT chunks with the weights the one-stage model would get from the same seed.

    The one-stage model draws every weight from the default generator in order (embedding, layer
    1, 2, ..., output layer). Each rank replays that stream from pipeline stage 0's seed,
    building the pieces it does not hold (the embedding, layers before each chunk) and dropping
    them, so any pipeline layout starts from the same model. Costs the draws of the layers before
    this rank's last chunk, one layer in memory at a time.
    """
    chunks = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # stage 0's default seed (set_seeds adds 100 * pp_rank)
        cursor = 0
        for stage in stages:
            if cursor == 0 and not stage["pre_process"]:
                LanguageModelEmbedding(config, args.padded_vocab_size,
                                       args.max_position_embeddings,
                                       args.position_embedding_type, ps)
            for number in range(cursor + 1, stage["layer_offset"] + 1):
                TransformerLayer(config, number, parallel_state=ps, moe_layer=MoELayer)
            chunks.append(default_model_provider(config, args, ps, **stage))
            cursor = stage["layer_offset"] + stage["num_layers"]
    return chunks


def build_model(args, ps: ParallelState, model_provider: Callable | None = None
                ) -> list[nn.Module]:
    """This rank's model chunks (one, or one per virtual pipeline stage), on ``args.device``.

    Without pipeline parallelism the provider is called as ``provider(config, args, ps)``; with
    it, once per chunk with the keywords ``pre_process``, ``post_process``, ``layer_offset`` and
    ``num_layers``. The default GPT provider gives every pipeline layout the same initial
    weights as the one-stage model (:func:`_gpt_chunks_as_one_model`).
    """
    config = transformer_config_from_args(args)
    device = torch.device(args.device)
    if ps.pp_size == 1:
        provider = model_provider or default_model_provider
        return _check_mtp([provider(config, args, ps).to(device)], config, ps)
    stages = _stage_kwargs(pipeline_layout(args, ps), ps)
    if model_provider is None:
        chunks = _gpt_chunks_as_one_model(config, args, ps, stages)
    else:
        params = inspect.signature(model_provider).parameters
        takes_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        missing = [k for k in stages[0] if k not in params and not takes_kw]
        if missing:
            raise ValueError(f"with --pipeline-model-parallel-size {ps.pp_size} the "
                             f"model_provider must accept the keywords {missing} (one call per "
                             "pipeline model chunk)")
        chunks = [model_provider(config, args, ps, **stage) for stage in stages]
    return _check_mtp([c.to(device) for c in chunks], config, ps)


def _check_mtp(chunks: list[nn.Module], config, ps: ParallelState) -> list[nn.Module]:
    """With --mtp-num-layers the last stage's last chunk must hold the MTP block."""
    if config.mtp_num_layers and ps.is_pipeline_last_stage() and \
            getattr(chunks[-1], "mtp", None) is None:
        raise ValueError(f"--mtp-num-layers {config.mtp_num_layers}: the model "
                         f"({type(chunks[-1]).__name__}) has no multi-token prediction block; "
                         "use the GPT model (no custom model_provider) or drop the flag")
    return chunks


def train_valid_test_num_samples(args) -> tuple[int, int, int]:
    """Megatron's sizes: the train steps' samples; valid covers every evaluation."""
    train = args.train_samples or args.train_iters * args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters if args.eval_iters \
        else 0
    return train, evals * args.global_batch_size, args.eval_iters * args.global_batch_size


def build_datasets(args, tokenizer):
    if args.train_data_path:
        return build_per_split_datasets(
            [args.train_data_path, args.valid_data_path, args.test_data_path], args.seq_length,
            train_valid_test_num_samples(args), args.seed, tokenizer.eod, args.eod_mask_loss,
            vocab_size=tokenizer.vocab_size)
    return build_train_valid_test_datasets(
        args.data_path, args.split, args.seq_length, train_valid_test_num_samples(args),
        args.seed, args.mock_data, tokenizer.vocab_size, tokenizer.eod, args.eod_mask_loss)


def make_iterator(dataset, args, consumed_samples: int, ps: ParallelState) -> Iterator | None:
    """A micro-batch iterator starting after ``consumed_samples`` (None for an empty split).

    Creating a DataLoader iterator draws a seed from torch's default generator; it is drawn
    inside ``fork_rng`` so resuming (which restores the generator first) sees the same stream.
    """
    loader = build_data_loader(dataset, args.micro_batch_size, consumed_samples,
                               ps.dp_rank, ps.dp_size, num_workers=args.num_workers)
    if loader is None:
        return None
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def batch_to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
