"""Build the pieces of a run from validated args: tokenizer, model, data iterators."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from moecore.arguments import transformer_config_from_args
from moecore.config import TransformerConfig
from moecore.data import build_data_loader, build_tokenizer, build_train_valid_test_datasets
from moecore.data.tokenizers import vocab_size_with_padding
from moecore.parallel_state import ParallelState


def build_tokenizer_from_args(args):
    """The tokenizer; with ``--mock-data`` and no ``--tokenizer-type`` a NullTokenizer over
    ``--vocab-size`` ids. Sets ``args.padded_vocab_size`` (Megatron's padding rule)."""
    kind = args.tokenizer_type or "NullTokenizer"
    tokenizer = build_tokenizer(kind, tokenizer_model=args.tokenizer_model,
                                vocab_size=args.vocab_size, vocab_file=args.vocab_file,
                                merge_file=args.merge_file)
    args.padded_vocab_size = vocab_size_with_padding(
        tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    return tokenizer


def default_model_provider(config: TransformerConfig, args, ps: ParallelState) -> nn.Module:
    """``GPTModel`` from the flags (Megatron's ``model_provider`` in ``pretrain_gpt.py``)."""
    from moecore.models import GPTModel

    tied = not args.untie_embeddings_and_output_weights
    return GPTModel(config, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings,
                    share_embeddings_and_output_weights=tied,
                    position_embedding_type=args.position_embedding_type, parallel_state=ps)


def build_model(args, ps: ParallelState, model_provider: Callable | None = None) -> nn.Module:
    """Config from the args, the model from the provider, moved to ``args.device``."""
    config = transformer_config_from_args(args)
    provider = model_provider or default_model_provider
    model = provider(config, args, ps)
    return model.to(torch.device(args.device))


def train_valid_test_num_samples(args) -> tuple[int, int, int]:
    """Megatron's sizes: the train steps' samples; valid covers every evaluation."""
    train = args.train_samples or args.train_iters * args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters if args.eval_iters \
        else 0
    return train, evals * args.global_batch_size, args.eval_iters * args.global_batch_size


def build_datasets(args, tokenizer):
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
