"""Text generation from moecore checkpoints: KV-cache decoding, sampling, tensor/expert parallel
serving (rank 0 serves, all ranks compute) and CUDA-graphed decode steps. See docs/generation.md.
"""

from moecore.inference.engine import InferenceEngine
from moecore.inference.kv_cache import KVCache
from moecore.inference.sampling import Completion, SamplingParams, select_tokens

__all__ = ["Completion", "InferenceEngine", "KVCache", "SamplingParams", "select_tokens"]
