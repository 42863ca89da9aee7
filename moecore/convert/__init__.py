"""Checkpoint conversion: Hugging Face Mixtral and DeepSeek-V3 <-> moecore, and moecore between
TP/PP/EP layouts.

``convert(loader, saver, load_dir, save_dir, target=Layout(...) or {"tp": 2, ...}, dtype=...)``
runs one conversion layer by layer (``tools/checkpoint/convert.py`` is its command line).
Modules: :mod:`~moecore.convert.hf_mixtral`, :mod:`~moecore.convert.hf_deepseek_v3` and
:mod:`~moecore.convert.hf_qwen_moe` (config and parameter mapping of each family),
:mod:`~moecore.convert.hf_base` (their shared reader and writer of Hugging Face directories),
:mod:`~moecore.convert.reshard` (the sharding table: global tensors <-> TP/PP/EP shards),
:mod:`~moecore.convert.io` (streaming safetensors), :mod:`~moecore.convert.moecore_ckpt`
(moecore checkpoint files), :mod:`~moecore.convert.model_args` (args, configs, printed flags).
"""

from moecore.convert.pipeline import ConversionResult, convert
from moecore.convert.reshard import SHARDING_RULES, Layout

__all__ = ["SHARDING_RULES", "ConversionResult", "Layout", "convert"]
