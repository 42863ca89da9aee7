"""Data pipeline: Megatron ``.bin/.idx`` datasets, GPT samples, blending, tokenizers."""

from moecore.data.blended_dataset import BlendedDataset
from moecore.data.builder import (
    build_per_split_datasets,
    build_train_valid_test_datasets,
    parse_data_path,
    split_indices,
)
from moecore.data.data_samplers import MegatronPretrainingSampler, build_data_loader
from moecore.data.gpt_dataset import GPTDataset
from moecore.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, optimal_dtype
from moecore.data.mock import MockGPTDataset
from moecore.data.sample_index import build_blending_indices, build_sample_idx
from moecore.data.tokenizers import build_tokenizer

__all__ = [
    "BlendedDataset",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "MegatronPretrainingSampler",
    "MockGPTDataset",
    "build_blending_indices",
    "build_data_loader",
    "build_sample_idx",
    "build_tokenizer",
    "build_per_split_datasets",
    "build_train_valid_test_datasets",
    "optimal_dtype",
    "parse_data_path",
    "split_indices",
]
