"""Checkpoint conversion: Hugging Face Mixtral <-> moecore, and moecore between TP/PP/EP layouts.

``convert(loader, saver, load_dir, save_dir, target=Layout(...) or {"tp": 2, ...}, dtype=...)``
runs one conversion layer by layer (``tools/checkpoint/convert.py`` is its command line).
Modules: :mod:`~moecore.convert.hf_mixtral` (config and parameter mapping),
:mod:`~moecore.convert.reshard` (the sharding table: global tensors <-> TP/PP/EP shards),
:mod:`~moecore.convert.io` (streaming safetensors), :mod:`~moecore.convert.moecore_ckpt`
(moecore checkpoint files), :mod:`~moecore.convert.model_args` (args, configs, printed flags).
"""

from moecore.convert.pipeline import ConversionResult, convert
from moecore.convert.reshard import SHARDING_RULES, Layout

__all__ = ["SHARDING_RULES", "ConversionResult", "Layout", "convert"]
