"""Split global moecore tensors into the shards of a TP/PP/EP layout, and merge shards back.

*Global* tensors are those of the single-rank model (TP = PP = EP = 1): the names of
``GPTModel(...).state_dict()`` with global layer numbers ``decoder.layers.{i}``. One table,
:data:`~moecore.checkpointing.sharding.SHARDING_RULES` (shared with the ``torch_dist``
checkpoint format), says for every parameter name how it is split; :func:`shard_tensor` and
:func:`merge_tensors` are its two directions, so sharding and merging cannot disagree.

Pipeline stages hold whole layers, renumbered from 0 in each model chunk (``layer_offset``); a
pipeline rank holds one chunk, or ``vp`` chunks (``model0``, ``model1``, ...) with the
interleaved schedule, split as :func:`moecore.pipeline_parallel.layout.pipeline_layer_layout`
splits them for the trainer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from moecore.checkpointing import _model_keys, shard_dirname, shard_key
from moecore.checkpointing.sharding import (  # noqa: F401 - SHARDING_RULES re-exported
    _E,
    _L,
    SHARDING_RULES,
    Rule,
    layer_of,
    rename_numbers,
    rule_for,
)
from moecore.parallel_state import DEFAULT_ORDER, ParallelSizes, ParallelState, all_rank_groups
from moecore.pipeline_parallel.layout import pipeline_layer_layout


# ---- layouts -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """A checkpoint's parallel layout: tp, pp, ep, etp (``None`` = tp), the rank order, and the
    pipeline split: ``vp`` model chunks per pipeline rank (interleaved schedule) and optional
    ``first``/``last`` stage sizes (``--decoder-first/last-pipeline-num-layers``)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    order: str = DEFAULT_ORDER
    vp: int = 1
    first: int | None = None
    last: int | None = None

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def sizes(self) -> ParallelSizes:
        """The smallest world holding every distinct shard (each larger valid world repeats it
        as data-parallel replicas)."""
        tp, etp = self.tp, self.expert_tp
        world = tp * etp * self.ep // math.gcd(tp, etp * self.ep) * self.pp
        return ParallelSizes(world_size=world, tp=tp, pp=self.pp, ep=self.ep, etp=self.etp,
                             order=self.order)

    def chunks(self, num_layers: int) -> list[list[tuple[int, int]]]:
        """``[pp_rank][chunk] = (layer_offset, num_layers)``, as the trainer builds them."""
        return pipeline_layer_layout(num_layers, self.pp, self.vp, self.first, self.last)

    def locate(self, num_layers: int, layer: int) -> tuple[int, int, int]:
        """``(pp_rank, chunk, chunk's first layer)`` of global layer ``layer``."""
        for rank, chunks in enumerate(self.chunks(num_layers)):
            for v, (offset, n) in enumerate(chunks):
                if offset <= layer < offset + n:
                    return rank, v, offset
        raise ValueError(f"layer {layer} is outside the model's {num_layers} layers")

    def describe(self) -> str:
        out = f"TP={self.tp} PP={self.pp} EP={self.ep} ETP={self.expert_tp}"
        if self.vp > 1:
            out += f" VP={self.vp}"
        if self.first is not None or self.last is not None:
            out += f" (first/last stage layers {self.first}/{self.last})"
        return out


def model_keys(num_chunks: int) -> list[str]:
    """Megatron's state keys: ``model``, or ``model0``, ``model1``, ... for several chunks."""
    return _model_keys(num_chunks)


def fake_parallel_state(sizes: ParallelSizes, rank: int) -> ParallelState:
    """Rank ``rank``'s view of ``sizes`` without process groups (every group is ``None``):
    enough to build that rank's modules on the meta device and to name its shard."""
    ranks = {}
    for kind, groups in all_rank_groups(sizes).items():
        for g in groups:
            if rank in g:  # as ParallelState.build: middle stages are in no embedding group
                ranks[kind] = g
    return ParallelState(sizes=sizes, rank=rank, groups={}, ranks=ranks)


def shard_states(layout: Layout) -> list[ParallelState]:
    """One (fake) parallel state per distinct shard file of ``layout``, ordered by
    ``(pp, tp, ep, etp)`` rank."""
    sizes = layout.sizes()
    seen: dict[tuple, ParallelState] = {}
    for rank in range(sizes.world_size):
        ps = fake_parallel_state(sizes, rank)
        seen.setdefault(shard_key(ps), ps)
    return sorted(seen.values(), key=lambda p: (p.pp_rank, p.tp_rank, p.ep_rank, p.etp_rank))


def shard_name(ps: ParallelState) -> str:
    return shard_dirname(ps)


# ---- split / merge -------------------------------------------------------------------------------
def _split(t: torch.Tensor, dim: int, n: int, r: int, glu: bool) -> torch.Tensor:
    if n == 1:
        return t
    if t.shape[dim] % (2 * n if glu else n):
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} cannot be split into {n} "
                         f"parts{' per [gate; up] half' if glu else ''}")
    if glu:
        gate, up = t.chunk(2, dim=dim)
        return torch.cat([gate.chunk(n, dim=dim)[r], up.chunk(n, dim=dim)[r]], dim=dim)
    return t.chunk(n, dim=dim)[r]


def _join(parts: list[torch.Tensor], dim: int, glu: bool) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if glu:
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def _split_axis(rule: Rule, ps: ParallelState) -> tuple[int | None, int, int]:
    """(dim, parts, this rank's part) of the TP or expert-TP split of ``rule``."""
    if rule.tp_dim is not None:
        return rule.tp_dim, ps.tp_size, ps.tp_rank
    if rule.etp_dim is not None:
        return rule.etp_dim, ps.etp_size, ps.etp_rank
    return None, 1, 0


def shard_tensor(name: str, tensor: torch.Tensor, ps: ParallelState, *, gated: bool,
                 num_experts: int | None, layer_offset: int = 0
                 ) -> tuple[str, torch.Tensor] | None:
    """Rank ``ps``'s ``(local name, shard)`` of global tensor ``name``, or ``None`` when that
    rank holds no part of it (an expert of another EP rank). The shard is a fresh contiguous
    tensor. ``layer_offset`` is the first global layer of the rank's pipeline stage."""
    rule, m = rule_for(name)
    layer = layer_of(name)
    expert = None
    if rule.ep == "index":
        per_rank = num_experts // ps.ep_size
        g = int(m.group("expert"))
        if g // per_rank != ps.ep_rank:
            return None
        expert = g % per_rank
    elif rule.ep == "dim0":
        tensor = _split(tensor, 0, ps.ep_size, ps.ep_rank, False)
    dim, n, r = _split_axis(rule, ps)
    if dim is not None:
        tensor = _split(tensor, dim, n, r, rule.glu and gated)
    local = rename_numbers(name, m, None if layer is None else layer - layer_offset, expert)
    return local, tensor.clone(memory_format=torch.contiguous_format)


def merge_tensors(shards: list[tuple[ParallelState, dict[str, torch.Tensor]]], *, gated: bool,
                  num_experts: int | None, layer_offset: int = 0) -> dict[str, torch.Tensor]:
    """Inverse of :func:`shard_tensor`: the global tensors from the local state dicts of every
    shard of one pipeline stage (``shards``: ``(state, {local name: tensor})``). Replicated
    tensors are taken from the first shard holding them. Raises ``ValueError`` naming a missing
    piece."""
    pieces: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    rules: dict[str, Rule] = {}
    for ps, sd in shards:
        for local, t in sd.items():
            rule, m = rule_for(local)
            layer = layer_of(local)
            expert = None
            if rule.ep == "index":
                expert = ps.ep_rank * (num_experts // ps.ep_size) + int(m.group("expert"))
            name = rename_numbers(local, m, None if layer is None else layer + layer_offset, expert)
            _, _, r = _split_axis(rule, ps)
            coord = (ps.ep_rank if rule.ep == "dim0" else 0, r)
            pieces.setdefault(name, {}).setdefault(coord, t)
            rules[name] = rule
    ps0 = shards[0][0]
    out = {}
    for name, by_coord in pieces.items():
        rule = rules[name]
        dim, n, _ = _split_axis(rule, ps0)
        n_ep = ps0.ep_size if rule.ep == "dim0" else 1
        missing = [c for c in ((e, r) for e in range(n_ep) for r in range(n)) if c not in by_coord]
        if missing:
            raise ValueError(f"cannot rebuild {name!r}: the shards for (ep rank, tp/etp rank) "
                             f"{missing} are missing from the checkpoint")
        per_ep = [_join([by_coord[(e, r)] for r in range(n)], dim if dim is not None else 0,
                        rule.glu and gated) for e in range(n_ep)]
        out[name] = per_ep[0] if n_ep == 1 else torch.cat(per_ep, dim=0)
    return out


# ---- representation helpers ----------------------------------------------------------------------
_SEQ_EXPERT = re.compile(f"(?P<prefix>{_L})" + _E + r"linear_fc(?P<fc>[12])\.weight")
_GROUPED_EXPERT = re.compile(f"(?P<prefix>{_L})" + r"mlp\.experts\.weight(?P<fc>[12])")


def set_expert_form(sd: dict[str, torch.Tensor], grouped: bool) -> dict[str, torch.Tensor]:
    """Global experts as :class:`GroupedMLP` (``weight1 [E, H, 2F]``, ``weight2 [E, F, H]``) or
    :class:`SequentialMLP` (``local_experts.{e}.linear_fc1.weight [2F, H]``,
    ``linear_fc2.weight [H, F]``) parameters; the two hold the same numbers transposed."""
    out, seq = {}, {}
    for name, t in sd.items():
        m = (_SEQ_EXPERT if grouped else _GROUPED_EXPERT).fullmatch(name)
        if m is None:
            out[name] = t
        elif grouped:
            seq.setdefault((m.group("prefix"), m.group("fc")), {})[int(m.group("expert"))] = t
        else:
            prefix = f"{m.group('prefix')}mlp.experts.local_experts."
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.linear_fc{m.group('fc')}.weight"] = t[e].t().contiguous()
    for (prefix, fc), by_expert in seq.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"{prefix}: experts {sorted(by_expert)} are not 0..E-1")
        out[f"{prefix}mlp.experts.weight{fc}"] = torch.stack(
            [by_expert[e].t() for e in range(len(by_expert))])
    return out


def resize_vocab(t: torch.Tensor, rows: int, true_vocab_size: int, name: str) -> torch.Tensor:
    """Pad with zero rows or drop padding rows so ``t`` has ``rows`` vocabulary rows; rows below
    ``true_vocab_size`` are never dropped."""
    if rows < true_vocab_size:
        raise ValueError(f"{name}: padded vocabulary {rows} is smaller than the true vocabulary "
                         f"{true_vocab_size}")
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        return t[:rows]
    pad = torch.zeros(rows - t.shape[0], *t.shape[1:], dtype=t.dtype)
    return torch.cat([t, pad], dim=0)
