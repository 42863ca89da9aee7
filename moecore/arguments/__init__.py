"""Command-line surface of ``pretrain_gpt.py`` with Megatron-LM's flag names, defaults and groups.

``parse_args(argv)`` parses and validates; :func:`transformer_config_from_args` builds the
:class:`~moecore.config.TransformerConfig`. See :mod:`moecore.arguments.parser` for how
accepted-but-harmless (:data:`NOOP_FLAGS`) and refused (:data:`UNSUPPORTED_FLAGS`) Megatron
flags are handled.
"""

from moecore.arguments.checkpoint_args import MODEL_DESTS, PARALLEL_DESTS
from moecore.arguments.config_flags import transformer_config_from_args
from moecore.arguments.parser import NOOP_FLAGS, UNSUPPORTED_FLAGS, build_parser, parse_args
from moecore.arguments.validation import parse_moe_layer_freq, validate_args
from moecore.checkpointing import args_to_dict

__all__ = ["MODEL_DESTS", "NOOP_FLAGS", "PARALLEL_DESTS", "UNSUPPORTED_FLAGS", "args_to_dict",
           "build_parser", "parse_args", "parse_moe_layer_freq", "transformer_config_from_args",
           "validate_args"]
