"""Each rank's tensors as slices of layout-independent global tensors, for ``torch_dist``.

A rank's parameter ``decoder.layers.1.mlp.experts.weight1`` on pipeline stage 2 / EP rank 1 /
expert-TP rank 0 is a rectangular block of the global (single-rank model) tensor
``decoder.layers.5.mlp.experts.weight1``: :func:`global_slices` names that tensor (global layer
and expert numbers) and gives the block's offsets, from the table of
:mod:`moecore.checkpointing.sharding`. A SwiGLU ``[gate_r; up_r]`` shard is two blocks, of the
global ``name#gate`` and ``name#up`` halves. A tied output layer (pipeline stages > 1) is a
block of ``embedding.word_embeddings.weight``.

:class:`GlobalSlice` carries one block into ``torch.distributed.checkpoint`` (DCP): it speaks
DCP's chunk protocol (``__create_write_items__`` / ``__create_chunk_list__``), so DCP's default
planners write each block once (data-parallel replicas save the same ``(key, offsets)`` chunk,
which DCP deduplicates) and read any overlap of saved blocks on load (resharding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from moecore.checkpointing.sharding import layer_of, rename_numbers, rule_for
from moecore.parallel_state import ParallelState

EMBEDDING_KEY = "embedding.word_embeddings.weight"
OUTPUT_KEY = "output_layer.weight"


@dataclass
class GlobalSlice:
    """``local`` (a view of a rank's tensor) is the block ``[offsets, offsets + local.shape)`` of
    a global tensor of shape ``global_shape``."""

    local: torch.Tensor
    global_shape: torch.Size
    offsets: torch.Size

    def size(self) -> torch.Size:  # DCP compares it with the saved global size
        return self.global_shape

    def chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=self.offsets, sizes=self.local.shape)

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, self.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=self.chunk(), size=self.global_shape,
                              properties=TensorProperties.create_from_tensor(self.local)))]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self.chunk()]


class SliceSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, finding :class:`GlobalSlice` data (not tensors) by key."""

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        return obj.local if isinstance(obj, GlobalSlice) else obj


class SliceLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading into :class:`GlobalSlice` views of a flat state
    dict (its set-up would replace objects it does not know, and flattening is not needed)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.original_state_dict = self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        return obj.local if isinstance(obj, GlobalSlice) else obj


@dataclass(frozen=True)
class ChunkInfo:
    """What places one model chunk's tensors in the global model."""

    layer_offset: int
    gated: bool
    num_experts: int | None
    tied_output: bool


def chunk_info(chunk: nn.Module) -> ChunkInfo:
    """The :class:`ChunkInfo` of a :class:`~moecore.models.GPTModel` chunk."""
    config = chunk.config
    return ChunkInfo(layer_offset=chunk.decoder.layer_offset,
                     gated=bool(config.gated_linear_unit), num_experts=config.num_moe_experts,
                     tied_output=bool(chunk.share_embeddings_and_output_weights))


def _split_of(rule, ps: ParallelState) -> tuple[int | None, int, int]:
    """(dim, parts, this rank's part) of the TP or expert-TP split of ``rule``."""
    if rule.tp_dim is not None:
        return rule.tp_dim, ps.tp_size, ps.tp_rank
    if rule.etp_dim is not None:
        return rule.etp_dim, ps.etp_size, ps.etp_rank
    return None, 1, 0


def global_slices(name: str, t: torch.Tensor, ps: ParallelState, info: ChunkInfo
                  ) -> list[tuple[str, GlobalSlice]]:
    """``[(global key, slice)]`` of local tensor ``name`` of a chunk (one or two blocks)."""
    rule, m = rule_for(name)
    layer = layer_of(name)
    expert = None
    shape, offsets = list(t.shape), [0] * t.dim()
    if rule.ep == "index":
        expert = ps.ep_rank * (info.num_experts // ps.ep_size) + int(m.group("expert"))
    elif rule.ep == "dim0":
        offsets[0], shape[0] = ps.ep_rank * t.shape[0], t.shape[0] * ps.ep_size
    key = rename_numbers(name, m, None if layer is None else layer + info.layer_offset, expert)
    if key == OUTPUT_KEY and info.tied_output:
        key = EMBEDDING_KEY  # the last stage's copy of the tied embedding
    dim, parts, r = _split_of(rule, ps)
    if dim is None:
        return [(key, GlobalSlice(t, torch.Size(shape), torch.Size(offsets)))]
    if not (rule.glu and info.gated):
        offsets[dim], shape[dim] = r * t.shape[dim], t.shape[dim] * parts
        return [(key, GlobalSlice(t, torch.Size(shape), torch.Size(offsets)))]
    half = t.shape[dim] // 2
    offsets[dim], shape[dim] = r * half, half * parts
    return [(f"{key}#{which}", GlobalSlice(t.narrow(dim, i * half, half), torch.Size(shape),
                                           torch.Size(offsets)))
            for i, which in enumerate(("gate", "up"))]


def model_slices(chunks: list[nn.Module], ps: ParallelState) -> dict[str, GlobalSlice]:
    """Every model tensor of this rank, ``{"model.<global key>": slice}`` (views of the live
    tensors: loading into them loads the model)."""
    out = {}
    for chunk in chunks:
        info = chunk_info(chunk)
        for name, t in chunk.state_dict(keep_vars=True).items():
            for key, s in global_slices(name, t.detach(), ps, info):
                out[f"model.{key}"] = s
    return out


def param_names(chunks: list[nn.Module], model_params: list) -> list[tuple[str, ChunkInfo]]:
    """For each optimizer parameter (``model_params`` order), its chunk-local name and chunk:
    :func:`global_slices` of that name cuts any tensor of the parameter's shape (the fp32 main
    value, Adam's moments) as the parameter is cut."""
    found = {}
    for chunk in chunks:
        info = chunk_info(chunk)
        for name, p in chunk.named_parameters():
            found[id(p)] = (name, info)
    missing = [i for i, p in enumerate(model_params) if id(p) not in found]
    if missing:
        raise ValueError(f"optimizer parameters {missing[:5]} are not parameters of the model "
                         "chunks being checkpointed")
    return [found[id(p)] for p in model_params]
