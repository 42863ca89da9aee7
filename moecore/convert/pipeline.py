"""Run one conversion: a source (HF or moecore) feeds a sink (HF or moecore) layer by layer.

Both sides speak *global* tensors (the single-rank model's names, grouped experts): embedding,
then layer 0..L-1, then final norm and output layer. One layer is in memory at a time.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch

from moecore.convert import hf_deepseek_v3, hf_gpt_oss, hf_mixtral, hf_olmoe, hf_qwen_moe
from moecore.convert.hf_base import copy_tokenizer_files, export_base_config, read_hf_config
from moecore.convert.io import parse_size
from moecore.convert.model_args import pretrain_flags, target_args
from moecore.convert.moecore_ckpt import MoecoreSink, MoecoreSource
from moecore.convert.reshard import Layout

FORMATS = ("hf", "moecore")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class ConversionResult:
    saver: str
    save_dir: str
    layout: Layout | None = None
    flags: list[str] = field(default_factory=list)  # pretrain_gpt.py flags (moecore saver)
    files: list[str] = field(default_factory=list)  # safetensors files (hf saver)
    vocab_size: int = 0
    padded_vocab_size: int = 0


def _hf_source(directory: str):
    """The Hugging Face family's reader for ``directory``, chosen by config.json's model_type
    (DeepSeek-V3 family, OLMoE, Qwen3-/Qwen2-MoE, gpt-oss, else Mixtral, whose reader names what it
    cannot read)."""
    model_type = read_hf_config(directory, "Mixtral, DeepSeek-V3, OLMoE, Qwen-MoE or gpt-oss"
                                ).get("model_type")
    if model_type in hf_deepseek_v3.MODEL_TYPES:
        return hf_deepseek_v3.HFSource(directory)
    if model_type in hf_olmoe.MODEL_TYPES:
        return hf_olmoe.HFSource(directory)
    if model_type in hf_qwen_moe.MODEL_TYPES:
        return hf_qwen_moe.HFSource(directory)
    if model_type in hf_gpt_oss.MODEL_TYPES:
        return hf_gpt_oss.HFSource(directory)
    return hf_mixtral.HFSource(directory)


def _hf_sink(directory: str, ns, vocab_size: int, dtype: torch.dtype, max_shard_bytes: int):
    """gpt-oss for a model with its layers (sinks, windows, biases, the clamped GLU), DeepSeek-V3
    for a multi-latent-attention model, OLMoE for QK norm over the whole projections,
    Qwen3-/Qwen2-MoE for one converted from those or with per-head QK norm / a gated shared
    expert, Mixtral otherwise."""
    if hf_gpt_oss.is_gpt_oss(ns):
        return hf_gpt_oss.HFSink(directory, ns, vocab_size, dtype, max_shard_bytes)
    if ns.multi_latent_attention:
        return hf_deepseek_v3.HFSink(directory, ns, vocab_size, dtype, max_shard_bytes,
                                     base=export_base_config(ns))
    if getattr(ns, "qk_layernorm_hidden_dim", False):  # QK norm over whole projections
        return hf_olmoe.HFSink(directory, ns, vocab_size, dtype, max_shard_bytes)
    if hf_qwen_moe.is_qwen_model(ns):
        return hf_qwen_moe.HFSink(directory, ns, vocab_size, dtype, max_shard_bytes,
                                  base=export_base_config(ns))
    return hf_mixtral.HFSink(directory, ns, vocab_size, dtype, max_shard_bytes)


def _mb(sd: dict[str, torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in sd.values()) / 1e6


_LAYOUT_FIELDS = ("tp", "pp", "ep", "etp", "vp", "first", "last")


def _target_layout(target: Layout | dict | None, default: Layout) -> Layout:
    """``target`` as a layout. A dict overrides ``default`` (the source's layout): ``tp``,
    ``pp``, ``ep`` default to the source's, ``etp``/``vp``/``first``/``last`` to moecore's
    defaults (etp = tp, one chunk, even stages) unless given."""
    if isinstance(target, Layout):
        return target
    target = {k: v for k, v in (target or {}).items() if v is not None}
    unknown = set(target) - set(_LAYOUT_FIELDS)
    if unknown:
        raise ValueError(f"unknown layout fields {sorted(unknown)}; use {_LAYOUT_FIELDS}")
    if not target:
        return default
    return Layout(tp=target.get("tp", default.tp), pp=target.get("pp", default.pp),
                  ep=target.get("ep", default.ep), etp=target.get("etp"), order=default.order,
                  vp=target.get("vp", 1), first=target.get("first"), last=target.get("last"))


def convert(loader: str, saver: str, load_dir: str, save_dir: str, *,
            target: Layout | dict | None = None, dtype: str | None = None,
            max_shard_size: str | int = "5GB", grouped_gemm: bool | None = None,
            make_vocab_size_divisible_by: int | None = None,
            true_vocab_size: int | None = None, log=None,
            overwrite: bool = False) -> ConversionResult:
    """Convert ``load_dir`` (format ``loader``) into ``save_dir`` (format ``saver``).

    ``target``: the moecore layout to write, or a dict of some of its fields (``tp``, ``pp``,
    ``ep``, ``etp``, ``vp``, ``first``, ``last``) over the source's layout (HF: all ones).
    ``dtype``: ``"bf16"``/``"fp32"`` (default: the source's). ``grouped_gemm``: write
    ``GroupedMLP`` (True) or ``SequentialMLP`` (False) expert weights (default: the source's
    choice; HF sources use grouped). ``true_vocab_size``: the tokenizer's vocabulary when a
    moecore source's args do not record it (padding rows beyond it are dropped). The tokenizer
    files of ``load_dir`` (else of a moecore source's ``--tokenizer-model`` directory) are
    copied beside the result. Progress lines go to ``log`` (default: stderr). A moecore
    ``save_dir`` that already holds checkpoints is refused unless ``overwrite``.
    """
    log = log or sys.stderr
    for what, value in (("--loader", loader), ("--saver", saver)):
        if value not in FORMATS:
            raise ValueError(f"{what} {value!r} is unknown; choose one of {list(FORMATS)}")
    if os.path.realpath(load_dir) == os.path.realpath(save_dir):
        raise ValueError(f"--save-dir {save_dir} is the --load-dir; write the converted "
                         "checkpoint to another directory")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is unknown; choose one of {list(DTYPES)}")
    source = (_hf_source(load_dir) if loader == "hf"
              else MoecoreSource(load_dir, true_vocab_size=true_vocab_size))
    out_dtype = DTYPES[dtype] if dtype else source.dtype
    result = ConversionResult(saver=saver, save_dir=save_dir, vocab_size=source.true_vocab_size)
    if saver == "moecore":
        layout = _target_layout(target, getattr(source, "layout", None) or Layout())
        ns = target_args(source.args, layout, source.true_vocab_size, out_dtype,
                         grouped_gemm=grouped_gemm, divisible_by=make_vocab_size_divisible_by)
        sink = MoecoreSink(save_dir, ns, layout, source.iteration, overwrite=overwrite)
        result.layout, result.padded_vocab_size = layout, ns.padded_vocab_size
        result.flags = pretrain_flags(ns)
    else:
        if target and _target_layout(target, Layout()) != Layout():
            raise ValueError("--target-*-parallel-size applies to --saver moecore; a Hugging "
                             "Face checkpoint has no parallel layout")
        sink = _hf_sink(save_dir, source.args, source.true_vocab_size, out_dtype,
                      parse_size(max_shard_size))
    print(f"[convert] {loader} {load_dir} -> {saver} {save_dir}"
          + (f" at {result.layout.describe()}" if result.layout else "")
          + f", {source.num_layers} layers, dtype {out_dtype}", file=log, flush=True)
    out = _run(source, sink, log)
    copied = copy_tokenizer_files([load_dir, getattr(source.args, "tokenizer_model", None)],
                                  save_dir)
    if copied:
        print(f"[convert] copied {', '.join(copied)} beside the weights", file=log, flush=True)
    if saver == "hf":
        result.files = out
    return result


def _run(source, sink, log):
    """Feed ``source`` into ``sink`` one layer at a time; on any failure the sink removes what
    it wrote. Returns what ``sink.finish()`` returns."""
    start = time.monotonic()
    try:
        sink.write_embedding(source.read_embedding())
        for i in range(source.num_layers):
            sd = source.read_layer(i)
            sink.write_layer(i, sd)
            print(f"[convert] layer {i + 1}/{source.num_layers}: {len(sd)} tensors, "
                  f"{_mb(sd):.1f} MB, {time.monotonic() - start:.1f} s", file=log, flush=True)
            del sd
        sink.write_final(source.read_final())
        if getattr(source, "num_mtp", 0):
            sd = source.read_mtp()
            sink.write_mtp(sd)
            print(f"[convert] MTP block: {len(sd)} tensors, {_mb(sd):.1f} MB", file=log,
                  flush=True)
        source.close()
        out = sink.finish()
    except BaseException:
        sink.abort()
        raise
    print(f"[convert] done in {time.monotonic() - start:.1f} s", file=log, flush=True)
    return out
