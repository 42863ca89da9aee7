"""Which flag sets each :class:`~moecore.config.TransformerConfig` field, and the mapping
:func:`transformer_config_from_args` (Megatron's ``core_transformer_config_from_args``).

A field is set by the flag whose ``dest`` has the field's name, unless it is listed here:
renamed (:data:`FLAG_RENAMES`, Megatron's flag names another field), inverted
(:data:`INVERTED_FLAGS`), computed from several flags (:data:`DERIVED_FIELDS`), or without a
flag on purpose (:data:`LIBRARY_ONLY_FIELDS`). ``tests/unit/test_config_flags.py`` fails when a
field is none of these. Negative flags need no entry when their ``dest`` is the field (e.g.
``--disable-bias-linear`` -> ``add_bias_linear``, ``--no-rope-fusion`` -> ``apply_rope_fusion``).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import fields

import torch
import torch.nn.functional as F

from moecore.config import TransformerConfig
from moecore.transformer.mlp import quick_gelu

# flag dest -> config field, where Megatron's flag and Megatron-Core's field differ in name.
FLAG_RENAMES: dict[str, str] = {
    "num_experts": "num_moe_experts",
    "norm_epsilon": "layernorm_epsilon",
}
# flag dest -> config field that holds its negation.
INVERTED_FLAGS: dict[str, str] = {
    "untie_embeddings_and_output_weights": "share_embeddings_and_output_weights",
}
# config field -> the flags it is computed from.
DERIVED_FIELDS: dict[str, str] = {
    "activation_func": "--swiglu / --quick-geglu / --squared-relu / --openai-gelu (gelu "
                       "otherwise)",
    "gated_linear_unit": "--swiglu / --quick-geglu",
    "params_dtype": "--bf16 / --fp16 (fp32 otherwise)",
    "vocab_size": "the tokenizer's vocabulary (--vocab-size or --tokenizer-*) padded by "
                  "--make-vocab-size-divisible-by x TP: args.padded_vocab_size, set by the "
                  "trainer once the tokenizer is built",
}
# config field -> why it has no flag (settable from Python only).
LIBRARY_ONLY_FIELDS: dict[str, str] = {
    "beta_fast": "YaRN's ramp bound; Megatron has no flag for it either (default 32)",
    "beta_slow": "YaRN's ramp bound; Megatron has no flag for it either (default 1)",
}
# config field -> conversion of the flag's value.
_CONVERT: dict[str, Callable] = {
    "rotary_base": float,  # Megatron's flag is an int
    "window_size": lambda v: None if v is None else tuple(v),
    "recompute_modules": lambda v: None if v is None else tuple(v),
    "moe_router_dtype": lambda v: v or "fp32",  # the flag's None means fp32, as in Megatron
    # Unset: Megatron's MLA config default.
    "original_max_position_embeddings": lambda v: 4096 if v is None else v,
}
_DEST_OF = {field: dest for dest, field in {**FLAG_RENAMES, **INVERTED_FLAGS}.items()}


def flag_dest(field: str) -> str | None:
    """The ``dest`` of the flag that sets ``field``; None for derived and library-only fields."""
    if field in DERIVED_FIELDS or field in LIBRARY_ONLY_FIELDS:
        return None
    return _DEST_OF.get(field, field)


def config_flag_problems(dests: set[str]) -> list[str]:
    """What is wrong between the config fields, the tables above and the parser's flag
    ``dests``: a field with neither a flag nor a library-only mark, a table entry naming an
    unknown field or flag. Empty when all is consistent."""
    names = {f.name for f in fields(TransformerConfig)}
    problems = [f"{name}: no flag sets it; add its Megatron flag (or a FLAG_RENAMES entry) or "
                "mark it in LIBRARY_ONLY_FIELDS with the reason"
                for name in sorted(names) if flag_dest(name) not in dests | {None}]
    for table, keys in (("FLAG_RENAMES", FLAG_RENAMES.values()),
                        ("INVERTED_FLAGS", INVERTED_FLAGS.values()),
                        ("DERIVED_FIELDS", DERIVED_FIELDS), ("LIBRARY_ONLY_FIELDS",
                                                             LIBRARY_ONLY_FIELDS)):
        problems += [f"{table}: {k} is not a TransformerConfig field" for k in keys
                     if k not in names]
    problems += [f"{dest}: no flag has this dest" for dest in {**FLAG_RENAMES, **INVERTED_FLAGS}
                 if dest not in dests]
    problems += [f"{name}: both derived and library-only" for name in DERIVED_FIELDS
                 if name in LIBRARY_ONLY_FIELDS]
    problems += [f"LIBRARY_ONLY_FIELDS: {name} gives no reason"
                 for name, why in LIBRARY_ONLY_FIELDS.items() if not why.strip()]
    return problems


def field_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, bool]]:
    """``field -> (flag, takes_value)`` for the config fields a flag names directly: flags
    that take values and ``store_true`` switches (inverted, ``store_false`` and derived
    fields keep their field names, whose sense the flag would flip)."""
    by_dest = {a.dest: a for a in parser._actions if a.option_strings}
    out = {}
    for f in fields(TransformerConfig):
        dest = flag_dest(f.name)
        action = by_dest.get(dest)
        if action is None or dest in INVERTED_FLAGS:
            continue
        if action.nargs == 0 and action.const is not True:
            continue
        flag = next((o for o in action.option_strings if o.startswith("--")),
                    action.option_strings[0])
        out[f.name] = (flag, action.nargs != 0)
    return out


class ConfigFieldError(ValueError):
    """A :class:`TransformerConfig` check failed on values that came from flags: its message
    names config fields, which :func:`name_flags_in_error` rewrites as the flags."""


def name_flags_in_error(message: str, flags: dict[str, tuple[str, bool]]) -> str:
    """``message`` (a :class:`TransformerConfig` ``ValueError``) with each field written as
    the flag that sets it, for command-line users: ``moe_router_topk=3`` -> ``--moe-router-topk
    3``, ``num_moe_experts`` -> ``--num-experts``, ``moe_router_pre_softmax=True`` ->
    ``--moe-router-pre-softmax``. A name without ``_`` (``bf16``, ``fp16``) is rewritten only
    in the ``name=value`` form: bare, it is more likely a value than the field. ``flags``:
    :func:`field_flags` of the parser."""
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w-])({names})(?![\w-])(?:=('[^']*'|[^\s,;)]+))?")

    def flag_for(m: re.Match) -> str:
        flag, takes_value = flags[m.group(1)]
        value = m.group(2)
        if value is None:
            return flag if "_" in m.group(1) else m.group(0)
        if takes_value:
            return f"{flag} {value.strip(chr(39))}"
        return flag if value == "True" else m.group(0)

    named = pattern.sub(flag_for, message)
    return re.sub(r"(--[\w-]+) \(\1\)", r"\1", named)  # "field (--flag)" said it twice


def _activation(args: argparse.Namespace) -> Callable:
    if args.swiglu:
        return F.silu
    if args.quick_geglu:
        return quick_gelu
    if args.squared_relu:
        return lambda x: torch.pow(F.relu(x), 2)
    if args.openai_gelu:
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


def _derived(args: argparse.Namespace) -> dict:
    return {"activation_func": _activation(args),
            "gated_linear_unit": bool(args.swiglu or args.quick_geglu),
            "params_dtype": torch.bfloat16 if args.bf16 else torch.float16 if args.fp16
            else torch.float32,
            "vocab_size": vars(args).get("padded_vocab_size")}


def transformer_config_from_args(args: argparse.Namespace) -> TransformerConfig:
    """Map validated args to :class:`TransformerConfig` through the tables above.

    ``vocab_size`` is ``args.padded_vocab_size`` when the trainer has set it (after building the
    tokenizer), else None.
    """
    values = _derived(args)
    for f in fields(TransformerConfig):
        dest = flag_dest(f.name)
        if dest is None:
            continue
        value = vars(args)[dest]
        if dest in INVERTED_FLAGS:
            value = not value
        values[f.name] = _CONVERT.get(f.name, lambda v: v)(value)
    return TransformerConfig(**values)
