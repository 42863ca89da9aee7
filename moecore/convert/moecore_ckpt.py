"""moecore checkpoints as a conversion source and sink, at any TP/PP/EP layout.

The files are those of :mod:`moecore.checkpointing` (``iter_XXXXXXX/mp_rank_.../
model_optim_rng.pt`` + ``latest_checkpointed_iteration.txt``), model only: ``pretrain_gpt.py``
loads them with ``--load DIR`` (the optimizer and RNG states are absent, so it starts them fresh;
say ``--no-load-optim --no-load-rng`` or ``--finetune`` to make that explicit).

Memory: the source files are memory-mapped, so only the layer being converted is read. The sink
spills each layer's shards to a scratch file and, at the end, assembles each shard file from its
memory-mapped spills, so it never holds more than one layer either (the price: the model is
written to disk twice).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

from moecore.checkpointing import (
    CHECKPOINT_FILENAME,
    CHECKPOINT_VERSION,
    _fsync_dir,
    _layout,
    _replace_tracker,
    _write_file,
    args_to_dict,
    iteration_dir,
    published_iteration_dir,
    read_tracker,
)
from moecore.checkpointing.guards import existing_iterations
from moecore.convert.io import load_torch_mmap
from moecore.convert.model_args import (
    args_from_dict,
    expected_shard_state,
    layout_of_args,
    true_vocab_size_of,
)
from moecore.convert.reshard import (
    Layout,
    layer_of,
    merge_tensors,
    model_keys,
    resize_vocab,
    set_expert_form,
    shard_name,
    shard_states,
    shard_tensor,
)

EMBEDDING_KEY = "embedding.word_embeddings.weight"
OUTPUT_KEY = "output_layer.weight"


def _layout_from_state(state: dict, ns: argparse.Namespace) -> Layout:
    from_args = layout_of_args(ns)
    saved = state.get("parallel_layout")
    if not saved:
        return from_args
    return Layout(tp=saved["tp"], pp=saved["pp"], ep=saved["ep"],
                  etp=None if saved["etp"] == saved["tp"] else saved["etp"],
                  order=saved.get("order", from_args.order), vp=saved.get("vp", 1),
                  first=from_args.first, last=from_args.last)


class MoecoreSource:
    """Reads a moecore checkpoint's latest iteration, merging each layer's shards."""

    def __init__(self, directory: str, true_vocab_size: int | None = None):
        self.iteration = read_tracker(directory)
        if self.iteration is None:
            raise ValueError(f"{directory} holds no moecore checkpoint (no "
                             "latest_checkpointed_iteration.txt)")
        idir = published_iteration_dir(directory, self.iteration)
        found = sorted(d for d in os.listdir(idir)
                       if os.path.isfile(os.path.join(idir, d, CHECKPOINT_FILENAME))) \
            if os.path.isdir(idir) else []
        if not found:
            raise ValueError(f"{idir} holds no shard files")
        first = load_torch_mmap(os.path.join(idir, found[0], CHECKPOINT_FILENAME))
        if "args" not in first:
            raise ValueError(f"{idir}/{found[0]} has no saved args; cannot tell the model")
        self.args = args_from_dict(first["args"])
        self.layout = _layout_from_state(first, self.args)
        self.states = shard_states(self.layout)
        self.paths = {}
        for ps in self.states:
            path = os.path.join(idir, shard_name(ps), CHECKPOINT_FILENAME)
            if not os.path.isfile(path):
                raise ValueError(f"{path} is missing: a checkpoint at {self.layout.describe()} "
                                 f"has {len(self.states)} shard files, found {found}")
            self.paths[(ps.pp_rank, shard_name(ps))] = path
        self.num_layers = self.args.num_layers
        self.tied = not self.args.untie_embeddings_and_output_weights
        self.gated = bool(self.args.swiglu)
        self.num_mtp = self.args.mtp_num_layers or 0
        self._stage, self._loaded = None, []
        emb = self._stage_shards(0)[0][1][model_keys(self.layout.vp)[0]].get(EMBEDDING_KEY)
        if emb is None:
            raise ValueError(f"the first shard of {idir} has no {EMBEDDING_KEY}")
        padded = emb.shape[0] * self.layout.tp
        self.true_vocab_size = true_vocab_size or true_vocab_size_of(self.args)
        if self.true_vocab_size is None:
            print(f"[convert] WARNING: the checkpoint's args do not tell the tokenizer's "
                  f"vocabulary size; keeping all {padded} (padded) rows. Pass --true-vocab-size "
                  "to drop the padding.", file=sys.stderr)
            self.true_vocab_size = padded
        self.dtype = emb.dtype

    def _stage_shards(self, stage: int) -> list[tuple]:
        """``[(state, checkpoint dict)]`` of one pipeline rank, memory-mapped (one rank's files
        open at a time)."""
        if stage != self._stage:
            self._loaded = [(ps, load_torch_mmap(self.paths[(stage, shard_name(ps))]))
                            for ps in self.states if ps.pp_rank == stage]
            self._stage = stage
        return self._loaded

    def _merge(self, stage: int, chunk: int, keep, layer_offset: int = 0
               ) -> dict[str, torch.Tensor]:
        chunks = self.layout.chunks(self.num_layers)[stage]
        key = model_keys(len(chunks))[chunk]
        shards = []
        for ps, state in self._stage_shards(stage):
            if key not in state:
                raise ValueError(f"shard {shard_name(ps)} has no {key!r} state; its layout is "
                                 f"not {self.layout.describe()}")
            shards.append((ps, {k: v for k, v in state[key].items() if keep(k)}))
        return merge_tensors(shards, gated=self.gated, num_experts=self.args.num_experts,
                             layer_offset=layer_offset)

    def read_embedding(self) -> dict[str, torch.Tensor]:
        return self._merge(0, 0, lambda k: k.startswith("embedding."))

    def read_layer(self, i: int) -> dict[str, torch.Tensor]:
        stage, chunk, offset = self.layout.locate(self.num_layers, i)
        sd = self._merge(stage, chunk, lambda k: layer_of(k) == i - offset, layer_offset=offset)
        return set_expert_form(sd, grouped=True)

    def read_final(self) -> dict[str, torch.Tensor]:
        last = self.layout.pp - 1
        # With tied embeddings a last stage's output layer is a copy of the embedding.
        return self._merge(last, self.layout.vp - 1,
                           lambda k: k.startswith("decoder.final_layernorm.")
                           or (k == OUTPUT_KEY and not self.tied))

    def read_mtp(self) -> dict[str, torch.Tensor]:
        """The MTP block (``mtp.layers.*``, grouped experts), from the last model chunk."""
        sd = self._merge(self.layout.pp - 1, self.layout.vp - 1, lambda k: k.startswith("mtp."))
        return set_expert_form(sd, grouped=True)

    def close(self) -> None:
        self._stage, self._loaded = None, []


class MoecoreSink:
    """Writes a moecore checkpoint of ``ns``'s model at ``layout`` (``ns`` from
    :func:`moecore.convert.model_args.target_args`), checking every shard against the model
    chunks built for its rank. A ``directory`` that already holds moecore checkpoints (e.g. a
    training run's) is refused unless ``overwrite``: the result would replace one of them and
    point the tracker at it."""

    def __init__(self, directory: str, ns: argparse.Namespace, layout: Layout, iteration: int,
                 overwrite: bool = False):
        held = existing_iterations(directory)
        tracker = read_tracker(directory) if os.path.isdir(directory) else None
        if (held or tracker is not None) and not overwrite:
            raise ValueError(f"--save-dir {directory} already holds moecore checkpoints "
                             f"(iterations {held}, tracker {tracker}); writing iteration "
                             f"{iteration} there would replace or hide them: pick an empty "
                             "--save-dir, or pass --overwrite")
        self.directory, self.ns, self.layout, self.iteration = directory, ns, layout, iteration
        self.states = shard_states(layout)
        self.chunks = layout.chunks(ns.num_layers)
        self.expected = {shard_name(ps): expected_shard_state(ns, ps) for ps in self.states}
        self.gated, self.tied = bool(ns.swiglu), not ns.untie_embeddings_and_output_weights
        self.final_dir = iteration_dir(directory, iteration)
        self.tmp_dir = self.final_dir + ".tmp"
        self.spill_dir = os.path.join(self.tmp_dir, ".spill")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        os.makedirs(self.spill_dir)
        self._staged: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self._spills: dict[str, list[str]] = {shard_name(ps): [] for ps in self.states}
        self._embedding_copy = None

    def _put(self, stage: int, chunk: int, name: str, tensor: torch.Tensor,
             layer_offset: int = 0) -> None:
        mkey = model_keys(len(self.chunks[stage]))[chunk]
        for ps in (p for p in self.states if p.pp_rank == stage):
            got = shard_tensor(name, tensor, ps, gated=self.gated,
                               num_experts=self.ns.num_experts, layer_offset=layer_offset)
            if got is None:
                continue
            local, shard = got
            key = shard_name(ps)
            expected = self.expected[key][mkey]
            if local not in expected:
                raise ValueError(f"{name} maps to {local!r} in shard {key} ({mkey}), which the "
                                 f"target model at {self.layout.describe()} does not have")
            shape, dtype = expected[local]
            if tuple(shard.shape) != shape:
                raise ValueError(f"{name}: shard {key} gets shape {tuple(shard.shape)} but the "
                                 f"target model's {local} is {shape}")
            self._staged.setdefault(key, {}).setdefault(mkey, {})[local] = shard.to(dtype)

    def _spill(self) -> None:
        """Move the staged shards to scratch files (read back memory-mapped at the end)."""
        for key, sd in self._staged.items():
            path = os.path.join(self.spill_dir, f"{key}.{len(self._spills[key]):05d}.pt")
            torch.save(sd, path)
            self._spills[key].append(path)
        self._staged = {}

    def _vocab(self, t: torch.Tensor, name: str) -> torch.Tensor:
        return resize_vocab(t, self.ns.padded_vocab_size, self.ns.true_vocab_size, name)

    def _last_chunk_has(self, name: str) -> bool:
        last = len(self.chunks[-1]) - 1
        mkey = model_keys(last + 1)[last]
        return any(name in self.expected[shard_name(ps)][mkey]
                   for ps in self.states if ps.pp_rank == self.layout.pp - 1)

    def write_embedding(self, sd: dict[str, torch.Tensor]) -> None:
        for name, t in sd.items():
            if name == EMBEDDING_KEY:
                t = self._vocab(t, name)
                if self.tied and self.layout.pp > 1:
                    self._embedding_copy = t
            self._put(0, 0, name, t)
            # Multi-token prediction embeds on the last stage: it holds a copy (PP > 1).
            if self.layout.pp > 1 and self._last_chunk_has(name):
                self._put(self.layout.pp - 1, len(self.chunks[-1]) - 1, name, t)
        self._spill()

    def write_layer(self, i: int, sd: dict[str, torch.Tensor]) -> None:
        sd = set_expert_form(sd, grouped=bool(self.ns.moe_grouped_gemm))
        stage, chunk, offset = self.layout.locate(self.ns.num_layers, i)
        for name, t in sd.items():
            if layer_of(name) != i:
                raise ValueError(f"layer {i} was given the tensor {name}")
            self._put(stage, chunk, name, t, layer_offset=offset)
        self._spill()

    def write_final(self, sd: dict[str, torch.Tensor]) -> None:
        sd = dict(sd)
        if OUTPUT_KEY in sd:
            sd[OUTPUT_KEY] = self._vocab(sd[OUTPUT_KEY], OUTPUT_KEY)
        elif self._embedding_copy is not None and self._last_chunk_has(OUTPUT_KEY):
            # The last stage's copy of the tied embedding (with MTP the stage's embedding copy
            # serves as the head instead).
            sd[OUTPUT_KEY] = self._embedding_copy
        for name, t in sd.items():
            self._put(self.layout.pp - 1, len(self.chunks[-1]) - 1, name, t)
        self._spill()

    def write_mtp(self, sd: dict[str, torch.Tensor]) -> None:
        """The MTP block's global tensors (``mtp.layers.*``) onto the last model chunk."""
        sd = set_expert_form(sd, grouped=bool(self.ns.moe_grouped_gemm))
        for name, t in sd.items():
            if not name.startswith("mtp."):
                raise ValueError(f"the MTP block was given the tensor {name}")
            self._put(self.layout.pp - 1, len(self.chunks[-1]) - 1, name, t)
        self._spill()

    def _write_shard(self, ps) -> None:
        """Assemble one shard file from its memory-mapped spills and write it."""
        key = shard_name(ps)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for path in self._spills[key]:
            spilled = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for mkey, sd in spilled.items():
                parts.setdefault(mkey, {}).update(sd)
        models = {}
        for mkey, expected in self.expected[key].items():
            missing = [k for k in expected if k not in parts.get(mkey, {})]
            if missing:
                raise ValueError(f"shard {key} ({mkey}) would lack {len(missing)} tensors of "
                                 f"the target model, e.g. {missing[:3]}; the source does not "
                                 "provide them")
            models[mkey] = {k: parts[mkey][k] for k in expected}
        state = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": self.iteration,
                 **models, "args": args_to_dict(self.ns),
                 "parallel_layout": _layout(ps, len(models)), "rng_ranks": []}
        os.makedirs(os.path.join(self.tmp_dir, key), exist_ok=True)
        _write_file(state, os.path.join(self.tmp_dir, key, CHECKPOINT_FILENAME))
        for path in self._spills[key]:
            os.remove(path)
        self._spills[key] = []

    def finish(self) -> str:
        """Write every shard file, move the iteration into place and point the tracker at it."""
        for ps in self.states:
            self._write_shard(ps)
        shutil.rmtree(self.spill_dir, ignore_errors=True)
        if os.path.exists(self.final_dir):
            shutil.rmtree(self.final_dir)
        os.rename(self.tmp_dir, self.final_dir)
        _fsync_dir(self.directory)
        _replace_tracker(self.directory, self.iteration)
        return self.final_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
