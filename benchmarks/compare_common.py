"""Shared pieces of ``benchmarks/e2e_compare.py``'s contenders: the model shape, the data (the
same mock tokens for every framework), the training recipe, interval timing and the result
record (tokens/s, MFU by moecore's formula, peak memory, loss at the last step)."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import statistics
import time
from pathlib import Path

import torch

from moecore.config import TransformerConfig
from moecore.data.mock import MockGPTDataset
from moecore.training import mfu as mfu_lib

SEED = 1234  # moecore's --seed default: its mock train split draws from this seed


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model and run shape shared by every contender (``benchmarks/e2e.py``'s moe-1b)."""

    layers: int = 16
    hidden: int = 1024
    heads: int = 16
    experts: int = 16
    topk: int = 2
    expert_ffn: int = 2816
    seq: int = 2048
    vocab: int = 32000  # --vocab-size; the NullTokenizer adds EOD and Megatron pads to 128

    @property
    def data_vocab(self) -> int:
        """Ids the mock data draws from: the vocabulary plus EOD (as moecore's NullTokenizer)."""
        return self.vocab + 1

    @property
    def padded_vocab(self) -> int:
        """Embedding / output-head rows: ``data_vocab`` padded up to a multiple of 128."""
        return 128 * math.ceil(self.data_vocab / 128)

    @property
    def dense_ffn(self) -> int:
        """The dense twin's FFN: the ``topk`` active experts side by side (same active FLOPs)."""
        return self.topk * self.expert_ffn


FULL = Shape()
SMOKE = Shape(layers=2, hidden=64, heads=4, experts=4, topk=2, expert_ffn=64, seq=64, vocab=255)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Training settings shared by every contender: AdamW, linear warm-up then cosine decay
    to ``min_lr``, clip 1.0, ``global_batch`` sequences per step, ``steps`` steps, timed in
    intervals of ``log_interval`` steps of which the first ``warmup // log_interval`` are
    dropped (compilation, CUDA-graph capture)."""

    steps: int = 30
    warmup: int = 10
    log_interval: int = 5
    global_batch: int = 32
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup: int = 5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float = 1.0

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step`` (moecore's / Megatron's warm-up + cosine rule)."""
        if step < self.lr_warmup:
            return self.lr * (step + 1) / self.lr_warmup
        frac = (step - self.lr_warmup) / max(self.steps - self.lr_warmup, 1)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(frac, 1)))


def micro_batches(shape: Shape, recipe: Recipe, micro_batch: int, step: int):
    """The ``global_batch / micro_batch`` micro-batches of ``step``: (tokens, labels), each int64
    ``[micro_batch, seq]`` on CPU; sample ``i`` of the run is moecore's mock sample ``i``."""
    if recipe.global_batch % micro_batch:
        raise SystemExit(f"--global-batch-size {recipe.global_batch} is not a multiple of the "
                         f"micro-batch {micro_batch}; pick a divisor")
    data = MockGPTDataset(recipe.steps * recipe.global_batch, shape.seq, shape.data_vocab, SEED)
    first = step * recipe.global_batch
    for m in range(recipe.global_batch // micro_batch):
        rows = [data.get_text(first + m * micro_batch + i) for i in range(micro_batch)]
        text = torch.stack([torch.from_numpy(r) for r in rows])  # [mb, seq + 1]
        yield text[:, :-1].contiguous(), text[:, 1:].contiguous()


def moecore_config(shape: Shape, dense: bool = False) -> TransformerConfig:
    """moecore's config of the shape (for the FLOPs count that every contender's MFU uses)."""
    moe = {} if dense else {"num_moe_experts": shape.experts, "moe_router_topk": shape.topk,
                            "moe_ffn_hidden_size": shape.expert_ffn}
    return TransformerConfig(num_layers=shape.layers, hidden_size=shape.hidden,
                             num_attention_heads=shape.heads, gated_linear_unit=True,
                             ffn_hidden_size=shape.dense_ffn if dense else shape.expert_ffn,
                             add_bias_linear=False, **moe)


def flops_per_token(shape: Shape, dense: bool = False) -> float:
    """Training FLOPs per token by ``moecore/training/mfu.py`` (identical for the MoE and its
    dense twin: 2 experts of 2816 = one MLP of 5632; the router's ``H x E`` aside)."""
    return mfu_lib.flops_per_token(moecore_config(shape, dense), shape.padded_vocab, shape.seq)


def cap_memory(device: torch.device, max_memory_gib: float | None) -> None:
    """Cap this process's CUDA allocations (``--max-memory-gib``, e.g. 79 for an 80 GB H100)."""
    if max_memory_gib is None or device.type != "cuda":
        return
    index = torch.cuda.current_device() if device.index is None else device.index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory_gib * 2**30 / total), index)


class IntervalTimer:
    """Wall time per ``log_interval`` steps, synchronising the device at interval ends only."""

    def __init__(self, device: torch.device, log_interval: int) -> None:
        self.device, self.log_interval = device, log_interval
        self.seconds: list[float] = []
        self._sync()
        self._t0 = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_done(self, step: int) -> None:
        """Call after 0-based ``step``; closes an interval every ``log_interval`` steps."""
        if (step + 1) % self.log_interval == 0:
            self._sync()
            now = time.perf_counter()
            self.seconds.append(now - self._t0)
            self._t0 = now


def result(name: str, shape: Shape, recipe: Recipe, interval_s: list[float], losses: list[float],
           device: torch.device, micro_batch: int, dense: bool = False, **extra) -> dict:
    """The record of one contender from its interval times (dropping warm-up intervals) and
    its per-step losses."""
    skip = recipe.warmup // recipe.log_interval
    timed = interval_s[skip:] or interval_s
    tok = recipe.global_batch * shape.seq * recipe.log_interval / statistics.median(timed)
    return {"name": name, "status": "ok", "tokens_per_sec": tok,
            "mfu_percent": mfu_percent(tok, shape, device, dense),
            "peak_memory_gib": peak_memory_gib(device), "loss": losses[-1],
            "steps": len(losses), "micro_batch": micro_batch, **extra}


def mfu_percent(tokens_per_sec: float, shape: Shape, device: torch.device,
                dense: bool = False) -> float | None:
    peak = mfu_lib.peak_tflops(device, torch.bfloat16)
    value = mfu_lib.mfu(tokens_per_sec, flops_per_token(shape, dense), 1, peak)
    return None if value is None else 100 * value


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def write_result(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=1))


def init_single_process_group(device: torch.device) -> None:
    """A one-rank ``torch.distributed`` world (nccl on CUDA, gloo on CPU) on a free local port:
    torchtitan's meshes and Megatron-Core's parallel state need one even on one device."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
        rank=0, world_size=1,
        device_id=torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda"
        else None)
