"""InferenceEngine: batched autoregressive generation from a ``GPTModel`` with a KV cache.

One request = a batch of token prompts and one :class:`SamplingParams`. Prompts of different
lengths are padded on the right; each token keeps its true position, so a batched prompt
generates what it generates alone (:mod:`moecore.inference.kv_cache`). Prefill runs the padded
prompts in one forward; each decode step runs one token per sequence, eagerly or as a replayed
CUDA graph (:mod:`moecore.inference.graphs`).

Tensor / expert parallel (torchrun): every rank holds its shard and computes; rank 0 serves.
:meth:`InferenceEngine.generate` on rank 0 broadcasts the request over the world group, while
the other ranks loop in :meth:`serve_forever` (alias :meth:`follow`) until rank 0 calls
:meth:`stop`. Logits are gathered over the TP group, so every rank samples the same tokens
from the same generator state.
"""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.distributed as dist
from torch import nn

from moecore.inference.graphs import DecodeGraphs
from moecore.inference.kv_cache import KVCache
from moecore.inference.loading import build_model_from_args, parse_generation_args
from moecore.inference.moe import dropless
from moecore.inference.sampling import Completion, SamplingParams, select_tokens
from moecore.parallel_state import ParallelState, destroy_model_parallel

_STOP = "stop"
# Decode steps between host checks of "every sequence has stopped" (each check syncs).
STOP_CHECK_INTERVAL = 8


class InferenceEngine:
    """Generation over ``model`` (a ``GPTModel`` without pipeline stages, in eval mode).

    ``cuda_graphs``: replay decode steps as CUDA graphs where they can be captured (None: on
    CUDA). ``max_sequence_length``: prompt + generated tokens (default: the model's).
    """

    def __init__(self, model: nn.Module, tokenizer=None, max_sequence_length: int | None = None,
                 parallel_state: ParallelState | None = None, cuda_graphs: bool | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.ps = parallel_state or model.ps
        self.config = model.config
        if not (model.pre_process and model.post_process):
            raise ValueError("generation needs the whole model on each rank (no pipeline "
                             "stages); reshard the checkpoint to PP=1")
        if self.config.sequence_parallel and self.ps.tp_size > 1:
            raise ValueError("build the model for generation without sequence parallel "
                             "(InferenceEngine.from_args does); it has one token per sequence "
                             "in each decode step")
        self.max_sequence_length = max_sequence_length or model.max_sequence_length
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = model.vocab_size if tokenizer is None else tokenizer.vocab_size
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self.graphs = DecodeGraphs(model, self.device) if cuda_graphs else None
        self._created_process_group = self._owns_parallel_state = False

    # ---- construction from a checkpoint --------------------------------------------------------
    @classmethod
    def from_args(cls, args, cuda_graphs: bool | None = None) -> InferenceEngine:
        """From ``pretrain_gpt.py`` args (a parsed namespace or an argv list): builds the model
        as the trainer does and loads ``--load`` (see :mod:`moecore.inference.loading`)."""
        if not hasattr(args, "load"):
            args = parse_generation_args(list(args))
        model, tokenizer, ps, created = build_model_from_args(args)
        engine = cls(model, tokenizer, args.max_position_embeddings, ps, cuda_graphs)
        engine._created_process_group, engine._owns_parallel_state = created, True
        return engine

    @classmethod
    def from_checkpoint(cls, load: str, extra_args: list[str] = (), device: str | None = None,
                        cuda_graphs: bool | None = None) -> InferenceEngine:
        """From a checkpoint directory alone: ``--use-checkpoint-args`` supplies the model."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        argv = ["--load", load, "--use-checkpoint-args", "--device", device, *extra_args]
        return cls.from_args(argv, cuda_graphs)

    # ---- serving protocol ----------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Complete each prompt (rank 0; the other ranks must be in :meth:`serve_forever`)."""
        if self.rank != 0:
            raise RuntimeError("generate() runs on rank 0; other ranks call serve_forever()")
        prompts = self._check_request(prompts, params)
        if params.seed is None:  # every rank must draw from the same generator state
            params = dataclasses.replace(params, seed=random.SystemRandom().getrandbits(62))
        if self.world_size > 1:
            self._broadcast((prompts, params))
        return self._generate(prompts, params)

    def serve_forever(self) -> None:
        """Ranks other than 0: compute rank 0's requests until it calls :meth:`stop`."""
        while True:
            message = self._broadcast(None)
            if message == _STOP:
                return
            self._generate(*message)

    follow = serve_forever

    def stop(self) -> None:
        """Rank 0: release the ranks in :meth:`serve_forever`."""
        if self.world_size > 1 and self.rank == 0:
            self._broadcast(_STOP)

    def _broadcast(self, obj):
        box = [obj]
        device = self.device if self.device.type == "cuda" else None
        dist.broadcast_object_list(box, src=0, device=device)
        return box[0]

    def _check_request(self, prompts, params: SamplingParams) -> list[list[int]]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not prompts:
            raise ValueError("prompts is empty; pass at least one list of token ids")
        out = []
        for i, p in enumerate(prompts):
            p = [int(t) for t in p]
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary "
                                 f"[0, {self.vocab_size})")
            if len(p) + params.max_new_tokens > self.max_sequence_length:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens="
                                 f"{params.max_new_tokens} that exceeds max_sequence_length="
                                 f"{self.max_sequence_length}; lower max_new_tokens or shorten "
                                 "the prompt")
            out.append(p)
        return out

    # ---- generation ----------------------------------------------------------------------------
    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        with torch.no_grad(), dropless(self.config):
            tokens, logprobs = self._decode_loop(prompts, params)
        return _completions(prompts, tokens, logprobs, params)

    def _cache(self, batch: int, length: int):
        """``(cache, decode step fn, rows)``: graphed where possible, else eager."""
        if self.graphs is not None:
            found = self.graphs.get(batch, length, self.max_sequence_length, self.dtype)
            if found is not None:
                return found
        cache = KVCache(batch, length, self.device, self.dtype)
        return cache, lambda ids, pos, kv_len: self._forward(cache, ids, pos, kv_len)[:, -1], \
            batch

    def _forward(self, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor,
                 kv_len: int | None) -> torch.Tensor:
        """``ids``, ``positions [B, S]`` -> this rank's logits ``[B, S, V/tp]``."""
        cache.set_positions(positions, kv_len)
        return self.model(ids, position_ids=positions, inference_context=cache)

    def _full_logits(self, local: torch.Tensor) -> torch.Tensor:
        """``[B, V/tp]`` -> fp32 ``[B, vocab]`` gathered over the TP group."""
        if self.ps.tp_size > 1:
            parts = [torch.empty_like(local) for _ in range(self.ps.tp_size)]
            dist.all_gather(parts, local.contiguous(), group=self.ps.tp_group)
            local = torch.cat(parts, dim=-1)
        return local[:, :self.vocab_size].float()

    def _decode_loop(self, prompts, params: SamplingParams):
        """-> generated tokens ``[B, n]`` and their log-probs ``[B, n]`` (device tensors)."""
        B, lens = len(prompts), [len(p) for p in prompts]
        longest = max(lens)
        cache, step, rows = self._cache(B, longest + params.max_new_tokens)
        ids = torch.zeros(rows, longest, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p)
        ids = ids.to(self.device)
        positions = torch.arange(longest, device=self.device).expand(rows, longest)
        logits = self._forward(cache, ids, positions, longest)  # [rows, S, V/tp]
        last = torch.tensor([n - 1 for n in lens] + [0] * (rows - B), device=self.device)
        logits = logits[torch.arange(rows, device=self.device), last]
        generator = torch.Generator(self.device).manual_seed(params.seed)
        stops = torch.tensor(params.stop_token_ids, dtype=torch.long, device=self.device)
        pos = last + 1  # [rows]: the next token's position
        token, logprob = select_tokens(self._full_logits(logits), params, generator)
        out_tokens, out_logprobs = [token], [logprob]
        for i in range(1, params.max_new_tokens):
            if len(stops) and i % STOP_CHECK_INTERVAL == 0 and \
                    bool(torch.isin(torch.stack(out_tokens, 1)[:B], stops).any(1).all()):
                break
            logits = step(token[:, None], pos[:, None], longest + i)
            pos = pos + 1
            token, logprob = select_tokens(self._full_logits(logits), params, generator)
            out_tokens.append(token)
            out_logprobs.append(logprob)
        return torch.stack(out_tokens, 1)[:B], torch.stack(out_logprobs, 1)[:B]

    def close(self) -> None:
        """Release rank 0's followers and tear down what :meth:`from_args` created."""
        self.stop()
        if self._owns_parallel_state:
            destroy_model_parallel()
        if self._created_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _completions(prompts, tokens: torch.Tensor, logprobs: torch.Tensor,
                 params: SamplingParams) -> list[Completion]:
    """Cut each row after its first stop token."""
    tokens_list, logprobs_list = tokens.tolist(), logprobs.tolist()
    stops = set(params.stop_token_ids)
    out = []
    for prompt, toks, lps in zip(prompts, tokens_list, logprobs_list):
        reason = "length"
        for j, t in enumerate(toks):
            if t in stops:
                toks, lps, reason = toks[:j + 1], lps[:j + 1], "stop"
                break
        toks, lps = toks[:params.max_new_tokens], lps[:params.max_new_tokens]
        out.append(Completion(prompt_tokens=list(prompt), tokens=toks,
                              logprobs=lps if params.return_logprobs else None,
                              finish_reason=reason))
    return out
