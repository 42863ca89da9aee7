"""What every Hugging Face family shares: reading ``config.json`` and a safetensors directory
layer by layer (:class:`HFSourceBase`), and streaming a model out as sharded safetensors with
an index (:class:`HFSinkBase`).

A family (``hf_mixtral``, ``hf_deepseek_v3``) subclasses both, setting ``family`` to its own
module, whose module-level functions the hooks call: the config mapping
(``args_from_hf_config(cfg)`` / ``hf_config_from_args(ns, vocab_size, dtype)``) and the
per-layer tensor mapping (``hf_layer_entries(i, ns)``, ``global_from_hf_layer(i, get, ns)``,
``hf_from_global_layer(i, sd, ns)``); a family whose functions take more overrides the hook.
The pieces those mappings share live here too: refusals (:func:`unsupported`, :func:`refuse_fields`,
:func:`refuse_flags`), Llama-style config reading (:func:`rope_theta`, :func:`llama_moe_flags`,
:func:`gqa_flags`) and the q/k/v row order of ``linear_qkv`` (:func:`interleave_qkv`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

from moecore.convert.io import SafetensorsReader, ShardedSafetensorsWriter, write_json
from moecore.convert.model_args import args_from_flags

EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def read_hf_config(directory: str, model_name: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory} has no config.json; point --load-dir at a Hugging Face "
                         f"{model_name} model directory")
    with open(path) as f:
        return json.load(f)


# ---- config reading and refusals shared by the families ------------------------------------------
def unsupported(field: str, value, why: str) -> ValueError:
    """The error for a ``config.json`` field moecore cannot represent."""
    return ValueError(f"config.json field {field}={value!r} cannot be represented in moecore: "
                      f"{why}")


def refuse_fields(cfg: dict, checks: list[tuple[str, bool, str]]) -> None:
    """Raise :func:`unsupported` for the first ``(field, ok, why)`` of ``checks`` not ok."""
    for field, ok, why in checks:
        if not ok:
            raise unsupported(field, cfg.get(field), why)


def refuse_flags(architecture: str, checks: list[tuple[str, bool, str]]) -> None:
    """Raise for the first ``(flag, ok, why)`` of ``checks`` that keeps the moecore model from
    being written as ``architecture``."""
    for flag, ok, why in checks:
        if not ok:
            raise ValueError(f"the moecore model cannot be written as {architecture}: {flag} "
                             f"({why})")


def rope_theta(cfg: dict) -> float:
    """The RoPE base of a Llama-style config (``rope_parameters`` of newer transformers, else
    ``rope_theta``); scaled RoPE is refused."""
    params = cfg.get("rope_parameters")
    if params is not None:  # newer transformers keep the RoPE settings in one dict
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise unsupported("rope_parameters", params, "only plain RoPE (rope_type "
                              "'default') is implemented; scaled RoPE is not")
        return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    return float(cfg.get("rope_theta", 10000.0))


def refuse_fractional_theta(theta: float) -> None:
    if theta != int(theta):
        raise unsupported("rope_theta", theta, "pretrain_gpt.py's --rotary-base takes integers")


def warn_unknown_fields(cfg: dict, known) -> None:
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        print(f"[convert] WARNING: config.json fields {unknown} are not used by the converter",
              file=sys.stderr)


def gqa_flags(cfg: dict) -> list:
    """Flags for a Llama-style config's query groups, ``head_dim`` and untied embeddings."""
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    ng = cfg.get("num_key_value_heads") or nh
    flags = []
    if ng != nh:
        flags += ["--group-query-attention", "--num-query-groups", ng]
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != h // nh:
        flags += ["--kv-channels", head_dim]
    if not cfg.get("tie_word_embeddings", False):
        flags += ["--untie-embeddings-and-output-weights"]
    return flags


def llama_moe_flags(cfg: dict, *, num_experts: int, moe_ffn_hidden_size: int,
                    max_positions: int, norm_eps: float, aux_loss_coeff: float) -> list:
    """``pretrain_gpt.py`` flags of a Llama-style MoE config (RoPE, RMSNorm, SwiGLU experts, no
    linear biases, a softmax router with an auxiliary loss, :func:`gqa_flags`); the keyword
    arguments are what differs between families (defaults of absent fields)."""
    return [
        "--num-layers", cfg["num_hidden_layers"], "--hidden-size", cfg["hidden_size"],
        "--ffn-hidden-size", cfg["intermediate_size"],
        "--num-attention-heads", cfg["num_attention_heads"],
        "--max-position-embeddings", cfg.get("max_position_embeddings", max_positions),
        "--position-embedding-type", "rope", "--rotary-base", int(rope_theta(cfg)),
        "--normalization", "RMSNorm", "--norm-epsilon", cfg.get("rms_norm_eps", norm_eps),
        "--swiglu", "--disable-bias-linear",
        "--init-method-std", cfg.get("initializer_range", 0.02),
        "--attention-dropout", cfg.get("attention_dropout", 0.0), "--hidden-dropout", 0.0,
        "--num-experts", num_experts, "--moe-ffn-hidden-size", moe_ffn_hidden_size,
        "--moe-router-topk", cfg["num_experts_per_tok"],
        "--moe-router-score-function", "softmax", "--moe-router-load-balancing-type", "aux_loss",
        "--moe-aux-loss-coeff", cfg.get("router_aux_loss_coef", aux_loss_coeff),
        "--moe-grouped-gemm",
    ] + gqa_flags(cfg)


def args_from_hf_flags(flags: list, cfg: dict, stored: dict | None = None
                       ) -> argparse.Namespace:
    """Parse ``pretrain_gpt.py`` ``flags``; keep ``cfg``'s vocabulary and ``stored`` (default
    ``cfg``) as ``hf_config`` for the way back."""
    ns = args_from_flags([str(f) for f in flags])
    ns.true_vocab_size = cfg["vocab_size"]
    ns.hf_config = json.dumps(cfg if stored is None else stored, sort_keys=True)
    return ns


def llama_dims(ns: argparse.Namespace) -> tuple[int, int, int, int, int, int]:
    """``(hidden, heads, query groups, head dim, expert width, experts)`` of ``ns``."""
    d = ns.kv_channels or ns.hidden_size // ns.num_attention_heads
    return (ns.hidden_size, ns.num_attention_heads, ns.num_query_groups, d,
            ns.moe_ffn_hidden_size, ns.num_experts)


def set_head_dim(cfg: dict, ns: argparse.Namespace) -> None:
    """Write ``head_dim`` only where it is not ``hidden_size / num_attention_heads``."""
    d = ns.kv_channels or ns.hidden_size // ns.num_attention_heads
    if d != ns.hidden_size // ns.num_attention_heads:
        cfg["head_dim"] = d
    else:
        cfg.pop("head_dim", None)


def llama_attention_entries(p: str, ns: argparse.Namespace
                            ) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of the input norm and q, k, v, o projections under prefix ``p``."""
    h, nh, ng, d, _, _ = llama_dims(ns)
    return [(p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (nh * d, h)),
            (p + "self_attn.k_proj.weight", (ng * d, h)),
            (p + "self_attn.v_proj.weight", (ng * d, h)),
            (p + "self_attn.o_proj.weight", (h, nh * d))]


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   ns: argparse.Namespace) -> torch.Tensor:
    """``q [nh*d, ...]``, ``k``/``v [ng*d, ...]`` (weights or biases) -> moecore's
    ``linear_qkv`` rows per query group ``g``: its q heads, k head ``g``, v head ``g``."""
    ng = ns.num_query_groups
    rest = q.shape[1:]
    return torch.cat([q.reshape(ng, -1, *rest), k.reshape(ng, -1, *rest),
                      v.reshape(ng, -1, *rest)], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, ns: argparse.Namespace) -> list[torch.Tensor]:
    """Inverse of :func:`interleave_qkv`: ``[q, k, v]``."""
    nh, ng = ns.num_attention_heads, ns.num_query_groups
    d = ns.kv_channels or ns.hidden_size // nh
    rest = qkv.shape[1:]
    parts = torch.split(qkv.reshape(ng, (nh // ng + 2) * d, *rest), [nh // ng * d, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in parts]


# Fields of a Hugging Face config.json about tokens and the library, not the computation.
NON_MODEL_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "tokenizer_class",
                    "transformers_version", "use_cache")


def export_base_config(ns: argparse.Namespace) -> dict:
    """The non-model fields an export starts from: the original Hugging Face config when the
    converter wrote the checkpoint (``ns.hf_config``); for a checkpoint ``pretrain_gpt.py``
    saved, those of ``config.json`` / ``generation_config.json`` in its ``--tokenizer-model``
    directory (a Hugging Face model directory, as DeepSeek recipes pass it); else nothing."""
    if getattr(ns, "hf_config", None):
        return json.loads(ns.hf_config)
    directory = getattr(ns, "tokenizer_model", None)
    out: dict = {}
    if directory and os.path.isdir(directory):
        for name in ("generation_config.json", "config.json"):  # config.json wins
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path) as f:
                    found = json.load(f)
                out.update({k: found[k] for k in NON_MODEL_FIELDS if k in found})
    return out


# Files beside the weights that a Hugging Face model directory needs to tokenize and generate.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(sources: list[str | None], directory: str) -> list[str]:
    """Copy :data:`TOKENIZER_FILES` into ``directory`` from the first of ``sources`` (the
    converted directory, then e.g. a run's ``--tokenizer-model``) that holds any; files already
    in ``directory`` are kept. Returns the names copied."""
    for src in sources:
        if not src or not os.path.isdir(src) or os.path.realpath(src) == \
                os.path.realpath(directory):
            continue
        found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
        if found:
            copied = [n for n in found if not os.path.exists(os.path.join(directory, n))]
            for name in copied:
                shutil.copyfile(os.path.join(src, name), os.path.join(directory, name))
            return copied
    return []


class HFSourceBase:
    """Reads a Hugging Face directory (``config.json`` + safetensors) layer by layer."""

    model_name = "model"
    family = None  # the family's module (see the module docstring)

    def __init__(self, directory: str):
        self.hf_config = read_hf_config(directory, self.model_name)
        self.reader = SafetensorsReader(directory)
        self.args = self.args_from_hf_config(self.hf_config)
        self.num_layers = self.args.num_layers
        self.true_vocab_size = self.hf_config["vocab_size"]
        self.iteration = 0
        self.tied = not self.args.untie_embeddings_and_output_weights
        self._check_tensors(self.expected_shapes())
        self.dtype = self.reader.dtype(EMBED)

    # ---- family hooks ----
    def args_from_hf_config(self, cfg: dict) -> argparse.Namespace:
        """The moecore args of ``cfg`` (``self.reader`` is open)."""
        return self.family.args_from_hf_config(cfg)

    def layer_entries(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        return self.family.hf_layer_entries(i, self.args)

    def global_from_hf_layer(self, i: int) -> dict[str, torch.Tensor]:
        return self.family.global_from_hf_layer(i, self.reader.get, self.args)

    def ignored(self, name: str) -> bool:
        """Tensors present in the files that the model does not use (rotary caches of old
        exports; a tied model's ``lm_head``)."""
        return name.endswith("rotary_emb.inv_freq") or (self.tied and name == HEAD)

    # ---- shared ----
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        v, h = self.true_vocab_size, self.args.hidden_size
        shapes = {EMBED: (v, h), NORM: (h,)}
        for i in range(self.num_layers):
            shapes.update(self.layer_entries(i))
        if not self.tied:
            shapes[HEAD] = (v, h)
        return shapes

    def _check_tensors(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Before converting anything: every tensor the config implies is present with its
        shape, and nothing else is."""
        missing = [n for n in shapes if n not in self.reader]
        if missing:
            raise ValueError(f"{len(missing)} tensors of the {self.model_name} described by "
                             f"config.json are missing from {self.reader.directory}, e.g. "
                             f"{missing[:3]}")
        for name, shape in shapes.items():
            if self.reader.shape(name) != tuple(shape):
                raise ValueError(f"tensor {name} has shape {self.reader.shape(name)} but "
                                 f"config.json implies {tuple(shape)}")
        extra = [n for n in self.reader.keys() if n not in shapes and not self.ignored(n)]
        if extra:
            raise ValueError(f"{len(extra)} tensors in {self.reader.directory} are not part of "
                             f"the {self.model_name} that config.json describes: {extra[:5]}")

    def read_embedding(self) -> dict[str, torch.Tensor]:
        return {"embedding.word_embeddings.weight": self.reader.get(EMBED)}

    def read_layer(self, i: int) -> dict[str, torch.Tensor]:
        return self.global_from_hf_layer(i)

    def read_final(self) -> dict[str, torch.Tensor]:
        out = {"decoder.final_layernorm.weight": self.reader.get(NORM)}
        if not self.tied:
            out["output_layer.weight"] = self.reader.get(HEAD)
        return out

    def close(self) -> None:
        pass


class HFSinkBase:
    """Writes ``config.json`` and safetensors (sharded above ``max_shard_bytes``, with
    ``model.safetensors.index.json``), streaming one tensor at a time. Padded vocabulary rows
    are stripped to ``vocab_size``."""

    family = None  # the family's module (see the module docstring)

    def __init__(self, directory: str, ns: argparse.Namespace, vocab_size: int,
                 dtype: torch.dtype, max_shard_bytes: int):
        self.config = self.hf_config_from_args(ns, vocab_size, dtype)
        self.directory, self.ns, self.vocab_size, self.dtype = directory, ns, vocab_size, dtype
        self.tied = not ns.untie_embeddings_and_output_weights
        os.makedirs(directory, exist_ok=True)
        self.writer = ShardedSafetensorsWriter(
            directory, [(n, tuple(s), self.dtype_of(n)) for n, s in self.plan()],
            max_shard_bytes)

    # ---- family hooks ----
    def hf_config_from_args(self, ns, vocab_size: int, dtype: torch.dtype) -> dict:
        return self.family.hf_config_from_args(ns, vocab_size, dtype)

    def layer_entries(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        return self.family.hf_layer_entries(i, self.ns)

    def hf_from_global_layer(self, i: int, sd: dict[str, torch.Tensor]
                             ) -> dict[str, torch.Tensor]:
        return self.family.hf_from_global_layer(i, sd, self.ns)

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype tensor ``name`` is written in (the export dtype unless the family keeps
        a tensor in another)."""
        return self.dtype

    # ---- shared ----
    def plan(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` of every tensor in the order they are written."""
        h = self.ns.hidden_size
        plan = [(EMBED, (self.vocab_size, h))]
        for i in range(self.ns.num_layers):
            plan += self.layer_entries(i)
        plan.append((NORM, (h,)))
        if not self.tied:
            plan.append((HEAD, (self.vocab_size, h)))
        return plan

    def _write(self, name: str, t: torch.Tensor) -> None:
        self.writer.write(name, t.to(self.dtype_of(name)).contiguous())

    def _vocab_rows(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if t.shape[0] < self.vocab_size:
            raise ValueError(f"{name} has {t.shape[0]} rows, fewer than the vocabulary "
                             f"{self.vocab_size}; pass the right --true-vocab-size")
        return t[:self.vocab_size]

    def write_embedding(self, sd: dict[str, torch.Tensor]) -> None:
        name = "embedding.word_embeddings.weight"
        self._write(EMBED, self._vocab_rows(sd[name], name))

    def write_layer(self, i: int, sd: dict[str, torch.Tensor]) -> None:
        hf = self.hf_from_global_layer(i, sd)
        for name, _ in self.layer_entries(i):
            self._write(name, hf[name])

    def write_final(self, sd: dict[str, torch.Tensor]) -> None:
        self._write(NORM, sd["decoder.final_layernorm.weight"])
        if not self.tied:
            self._write(HEAD, self._vocab_rows(sd["output_layer.weight"], "output_layer.weight"))

    def finish(self) -> list[str]:
        files = self.writer.close()
        write_json(os.path.join(self.directory, "config.json"), self.config)
        return files

    def abort(self) -> None:
        self.writer.abort()
