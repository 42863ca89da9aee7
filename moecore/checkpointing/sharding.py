"""Which slice of a global (single-rank) tensor each rank's parameter holds: one table,
:data:`SHARDING_RULES`, read by both the ``torch_dist`` checkpoint format (which saves each
rank's slices of the global tensors) and the converter (:mod:`moecore.convert.reshard`, which
splits and merges whole checkpoints).

* ``tp_dim``: split over tensor parallelism along that dim (dense weights, vocab rows).
* ``etp_dim``: split over *expert* tensor parallelism (expert FFN dimension).
* ``ep``: ``"dim0"`` = grouped experts ``[E, ...]`` split by expert over EP; ``"index"`` = one
  parameter per expert (``local_experts.{e}``), renamed to the owning rank's local index.
* ``glu``: the ``[gate; up]`` halves of a SwiGLU projection are split separately, so rank ``r``
  holds ``[gate_r; up_r]`` (Megatron's ``partition_stride=2``); only when the model is gated.
* ``vocab``: rows are the (padded) vocabulary.

Names carry global layer numbers ``decoder.layers.{i}``; a pipeline stage's local names count
from its first layer (:func:`rename_numbers` moves between the two).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    tp_dim: int | None = None
    etp_dim: int | None = None
    ep: str | None = None
    glu: bool = False
    vocab: bool = False


# A decoder layer, or the transformer layer of an MTP depth (same parameters; never renumbered:
# the MTP block lives whole on the last pipeline stage).
_L = r"(?:decoder\.layers\.(?P<layer>\d+)|mtp\.layers\.\d+\.transformer_layer)\."
_MTP = r"mtp\.layers\.\d+\."
_E = r"mlp\.experts\.local_experts\.(?P<expert>\d+)\."
_SHARED = r"mlp\.(?:shared_experts\.mlp\.)?"
SHARDING_RULES: tuple[tuple[re.Pattern, Rule], ...] = tuple(
    (re.compile(pattern), rule) for pattern, rule in [
        (r"embedding\.word_embeddings\.weight", Rule(tp_dim=0, vocab=True)),
        (r"embedding\.position_embeddings\.weight", Rule()),
        (r"output_layer\.weight", Rule(tp_dim=0, vocab=True)),
        (r"decoder\.final_layernorm\.(?:weight|bias)", Rule()),
        (_L + r"(?:input_layernorm|pre_mlp_layernorm)\.(?:weight|bias)", Rule()),
        (_L + r"self_attention\.(?:q_layernorm|k_layernorm)\.(?:weight|bias)", Rule()),
        (_L + r"self_attention\.(?:q_proj_layernorm|k_proj_layernorm)\.weight", Rule(tp_dim=0)),
        (_L + r"self_attention\.linear_qkv\.(?:weight|bias)", Rule(tp_dim=0)),
        (_L + r"self_attention\.linear_proj\.weight", Rule(tp_dim=1)),
        (_L + r"self_attention\.linear_proj\.bias", Rule()),
        (_L + r"self_attention\.sinks", Rule(tp_dim=0)),
        # Multi-latent attention: up-projections split by heads, down-projections replicated.
        (_L + r"self_attention\.(?:linear_q_proj|linear_q_up_proj|linear_kv_up_proj)\.weight",
         Rule(tp_dim=0)),
        (_L + r"self_attention\.(?:linear_q_down_proj|linear_kv_down_proj)\.weight", Rule()),
        (_L + r"self_attention\.kv_layernorm\.(?:weight|bias)", Rule()),
        (_L + _SHARED + r"linear_fc1\.(?:weight|bias)", Rule(tp_dim=0, glu=True)),
        (_L + _SHARED + r"linear_fc2\.weight", Rule(tp_dim=1)),
        (_L + _SHARED + r"linear_fc2\.bias", Rule()),
        (_L + r"mlp\.shared_experts\.gate_weight", Rule()),
        (_L + r"mlp\.router\.(?:weight|bias|expert_bias|local_tokens_per_expert)", Rule()),
        (_MTP + r"(?:enorm|hnorm|final_layernorm)\.weight", Rule()),
        (_MTP + r"eh_proj\.weight", Rule(tp_dim=0)),
        (_L + r"mlp\.experts\.weight1", Rule(etp_dim=2, ep="dim0", glu=True)),
        (_L + r"mlp\.experts\.weight2", Rule(etp_dim=1, ep="dim0")),
        (_L + r"mlp\.experts\.bias1", Rule(etp_dim=1, ep="dim0", glu=True)),
        (_L + r"mlp\.experts\.bias2", Rule(ep="dim0")),
        (_L + _E + r"linear_fc1\.weight", Rule(etp_dim=0, ep="index", glu=True)),
        (_L + _E + r"linear_fc2\.weight", Rule(etp_dim=1, ep="index")),
    ])


def rule_for(name: str) -> tuple[Rule, re.Match]:
    """The sharding rule of parameter ``name`` (global or local; both have the same form)."""
    for pattern, rule in SHARDING_RULES:
        m = pattern.fullmatch(name)
        if m:
            return rule, m
    raise ValueError(f"parameter {name!r} is not in the converter's sharding table "
                     "(moecore.convert.reshard.SHARDING_RULES); add a rule for it")


def layer_of(name: str) -> int | None:
    """The decoder layer of ``name``; None outside the decoder layers (MTP included)."""
    m = re.match(_L, name)
    return int(m.group("layer")) if m and m.group("layer") is not None else None


def rename_numbers(name: str, m: re.Match, layer: int | None, expert: int | None) -> str:
    """``name`` with its layer (and expert) number replaced."""
    out, last = [], 0
    for group, value in (("layer", layer), ("expert", expert)):
        if group in m.re.groupindex and m.group(group) is not None and value is not None:
            out += [name[last:m.start(group)], str(value)]
            last = m.end(group)
    return "".join(out) + name[last:]
