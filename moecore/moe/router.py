"""Top-k MoE router: scores, expert selection, token dropping and load-balancing losses.

``TopKRouter(hidden [S, B, H]) -> (probs [T, E], routing_map [T, E] bool)``, ``T = S * B``:
logits (fp32) -> z-loss -> softmax/sigmoid scores -> (group-limited) top-k, optionally biased
by the aux-loss-free expert bias, or Sinkhorn (S-BASE) -> capacity dropping -> load-balancing
losses (one per type of ``moe_router_load_balancing_type``, each with its own coefficient and
logged under Megatron-Core's name: ``load_balancing_loss``, ``seq_load_balancing_loss``,
``global_load_balancing_loss``). As in Megatron-Core, the balance losses count the plain top-k
of the unbiased, ungrouped scores (DeepSeek-V3's ``f_i``), not the biased/grouped selection.
Losses reach the router weight through :class:`MoEAuxLossAutoScaler` attached to ``probs``;
callers never add them to the main loss.

Sharded tokens: under sequence parallel (TP > 1) or context parallel each rank routes only its
slice of the micro-batch. Expert counts are summed over the *shard group*
(``tensor_and_context_parallel`` with SP, else ``context_parallel``) so each rank's loss is its
share of the micro-batch loss, and the shares' gradients add up (the trainer all-reduces the
router weight's grad over TP because ``weight.sequence_parallel`` is set).
"""

from __future__ import annotations

import torch
from torch import nn

from moecore.backends import log_choice
from moecore.collectives import all_reduce_inplace
from moecore.config import TransformerConfig
from moecore.kernels import fusion_request
from moecore.kernels.router import (
    RouterOutput,
    fused_router_unsupported,
    scores_for_aux_loss,
    select_router,
    topk_routing_with_score_function,
)
from moecore.kernels.router_gating import gating_fusable, gating_torch, select_gating
from moecore.moe.capacity import apply_token_drop, get_capacity
from moecore.moe.losses import (
    LOAD_BALANCING_LOSS_NAMES,
    MoEAuxLossAutoScaler,
    MoELossTracker,
    aux_loss_coeffs,
    sequence_load_balancing_loss_func,
    switch_load_balancing_loss_func,
    z_loss_func,
)
from moecore.moe.sinkhorn import sinkhorn
from moecore.parallel_state import ParallelState, get_parallel_state


def sinkhorn_routing(logits: torch.Tensor, topk: int, training: bool):
    """S-BASE routing: in training pick top-k of the Sinkhorn-balanced logits, in eval plain
    top-k; weights are ``sigmoid`` (top-1) or ``softmax`` over all experts of the original
    logits at the picked experts. Returns ``(probs [T, E], routing_map [T, E] bool)``."""
    activated = torch.sigmoid(logits) if topk == 1 else torch.softmax(logits, dim=-1)
    select_on = sinkhorn(logits) if training else activated.detach()
    idx = torch.topk(select_on, k=topk, dim=1)[1]
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
    return activated * routing_map, routing_map


class _RandomLogits(torch.autograd.Function):
    """``--moe-router-force-load-balancing`` (benchmarks): standard-normal logits of the same
    shape from the default generator (CUDA-graph safe, replayed by recompute), the gradient
    passed straight through, so the router still trains and costs what it costs."""

    @staticmethod
    def forward(ctx, logits):
        return torch.randn_like(logits)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _router_dtype(config: TransformerConfig) -> torch.dtype:
    if config.moe_router_dtype in (None, "fp32"):
        # float64 models (gradcheck) keep float64; everything else routes in fp32.
        return torch.float64 if config.params_dtype == torch.float64 else torch.float32
    if config.moe_router_dtype == "fp64":
        return torch.float64
    raise ValueError(f"moe_router_dtype={config.moe_router_dtype!r} is not supported; use "
                     "'fp32' or 'fp64'")


def _validate(config: TransformerConfig) -> None:
    if not config.is_moe:
        raise ValueError("TopKRouter needs config.num_moe_experts to be set")
    _router_dtype(config)
    if config.moe_router_load_balancing_type == "sinkhorn" and (
            config.moe_router_enable_expert_bias or config.moe_router_num_groups):
        raise ValueError("sinkhorn routing uses neither the expert bias nor group-limited "
                         "routing; turn off moe_router_enable_expert_bias and "
                         "moe_router_num_groups, or use another moe_router_load_balancing_type")


class TopKRouter(nn.Module):
    """Megatron-Core's top-k router. ``forward(hidden [S, B, H] or [T, H])`` returns
    ``(probs [T, E], routing_map [T, E] bool)`` in the router dtype (fp32; fp64 for fp64 models).

    After each forward:
      * ``last_capacity``: rows per expert when ``moe_expert_capacity_factor`` is set (computed
        from this rank's ``T * topk``), else ``None``; dispatchers pad to it under
        ``moe_pad_expert_input_to_capacity``. ``routing_map`` never contains padding.
      * ``last_stats``: ``tokens_per_expert`` [E] (summed over the shard group, before
        dropping), ``dropped_tokens`` (int64 scalar, same group), and this rank's share of
        each balance loss (by its logged name) / ``z_loss`` without their coefficients.
    Loss values also go to :class:`MoELossTracker` when ``layer_number`` is set.

    Buffers with ``moe_router_enable_expert_bias``: ``expert_bias`` [E] fp32 (added to the
    selection scores only) and ``local_tokens_per_expert`` [E] fp32, the counts since the last
    :func:`update_expert_bias`.
    """

    def __init__(self, config: TransformerConfig, layer_number: int | None = None,
                 parallel_state: ParallelState | None = None):
        super().__init__()
        _validate(config)
        self.config = config
        self.layer_number = layer_number
        self.parallel_state = parallel_state or get_parallel_state()
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.routing_type = config.moe_router_load_balancing_type
        self.router_dtype = _router_dtype(config)
        weight = torch.empty(self.num_experts, config.hidden_size, dtype=config.params_dtype)
        # Default generator, full tensor: every rank (and a TP=1 run) starts identical.
        weight.normal_(0.0, config.init_method_std)
        self.weight = nn.Parameter(weight)
        self.weight.sequence_parallel = config.sequence_parallel
        self.bias = None
        if config.add_bias_linear:  # gpt-oss: a bias on the router logits
            self.bias = nn.Parameter(torch.zeros(self.num_experts, dtype=config.params_dtype))
            self.bias.sequence_parallel = config.sequence_parallel
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts))
            self.register_buffer("local_tokens_per_expert", torch.zeros(self.num_experts))
        else:
            self.expert_bias = None
            self.local_tokens_per_expert = None
        ps = self.parallel_state
        shard_kind = ("tensor_and_context_parallel"
                      if config.sequence_parallel and ps.tp_size > 1 else "context_parallel")
        self.shard_group = ps.group(shard_kind)
        self.shard_size = ps.world_size_of(shard_kind)
        self.last_capacity: int | None = None
        self.last_stats: dict = {}

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def apply_input_jitter(self, hidden: torch.Tensor) -> torch.Tensor:
        """Multiply by ``U(1 - eps, 1 + eps)`` noise (default generator), in training only."""
        eps = self.config.moe_input_jitter_eps
        if not eps or not self.training:
            return hidden
        noise = torch.empty_like(hidden).uniform_(1.0 - eps, 1.0 + eps)
        return hidden * noise

    def gating(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[T, H] -> [T, E]`` logits in the router dtype.

        With ``moe_router_fusion`` on (the default on CUDA) and a bf16/fp16 model, the Triton
        gating kernels compute the same fp32 logits without fp32 copies of the activations
        (:mod:`moecore.kernels.router_gating`); otherwise ``hidden`` and the weight are upcast.
        """
        requested = fusion_request(self.config.moe_router_fusion)
        fn = gating_torch
        if requested != "torch" and not gating_fusable(hidden.dtype, self.weight.dtype,
                                                       self.router_dtype):
            fn = select_gating(hidden.device, requested).fn
        logits = fn(hidden, self.weight, self.router_dtype)
        return logits if self.bias is None else logits + self.bias.to(logits.dtype)

    def routing(self, logits: torch.Tensor):
        """Expert selection on ``[T, E]`` logits, before dropping: ``(probs, routing_map)``."""
        out = self._route(logits, need_aux_scores=False)
        return out.probs, out.routing_map

    def _fused_backend(self, logits: torch.Tensor):
        """The ``moe_router`` backend for these logits, or ``None`` for the unfused ops here
        (``moe_router_fusion=False``, or a feature the kernel does not cover: logged once)."""
        cfg = self.config
        requested = fusion_request(cfg.moe_router_fusion)
        if requested == "torch":
            return None
        why = fused_router_unsupported(
            load_balancing_type=self.routing_type, num_groups=cfg.moe_router_num_groups,
            num_experts=self.num_experts, dtype=logits.dtype)
        if why:
            log_choice("moe_router", "torch", requested, {"why": why},
                       warn=requested == "triton")
            return None
        return select_router(logits.device, requested)

    def _route(self, logits: torch.Tensor, need_aux_scores: bool) -> RouterOutput:
        """Selection, weights, this rank's counts [E] and (if asked) the balance-loss scores."""
        cfg = self.config
        backend = self._fused_backend(logits)
        if self.routing_type == "sinkhorn":
            probs, routing_map = sinkhorn_routing(logits, self.topk, self.training)
            return RouterOutput(probs, routing_map, routing_map.sum(0, dtype=torch.int32), None)
        bias = None if self.expert_bias is None else self.expert_bias.detach()
        # Megatron-Core reads moe_router_pre_softmax in its softmax branch only.
        pre_softmax = cfg.moe_router_pre_softmax and cfg.moe_router_score_function == "softmax"
        if backend is not None:
            return backend.fn(logits, self.topk, score_function=cfg.moe_router_score_function,
                              use_pre_softmax=pre_softmax,
                              scaling_factor=cfg.moe_router_topk_scaling_factor,
                              expert_bias=bias, need_aux_scores=need_aux_scores)
        probs, routing_map = topk_routing_with_score_function(
            logits, self.topk, score_function=cfg.moe_router_score_function,
            use_pre_softmax=pre_softmax, num_groups=cfg.moe_router_num_groups,
            group_topk=cfg.moe_router_group_topk,
            scaling_factor=cfg.moe_router_topk_scaling_factor, expert_bias=bias)
        aux = (scores_for_aux_loss(logits, cfg.moe_router_score_function)
               if need_aux_scores else None)
        return RouterOutput(probs, routing_map, routing_map.sum(0, dtype=torch.int32), aux)

    def _maintain_float32_buffers(self) -> None:
        # module.bfloat16() casts buffers too; the bias needs fp32 to take 1e-3 steps.
        for name in ("expert_bias", "local_tokens_per_expert"):
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32:
                buf.data = buf.data.float()

    def _flatten(self, hidden: torch.Tensor):
        if hidden.dim() == 3:
            s, b, h = hidden.shape
        elif hidden.dim() == 2:
            (s, h), b = hidden.shape, 1
        else:
            raise ValueError(f"router input must be [S, B, H] or [T, H], got "
                             f"{tuple(hidden.shape)}")
        if h != self.config.hidden_size:
            raise ValueError(f"router input hidden size {h} != config.hidden_size "
                             f"{self.config.hidden_size}")
        return hidden.reshape(s * b, h), s, b

    def forward(self, hidden: torch.Tensor):
        """``hidden [S, B, H]`` (or ``[T, H]``, read as ``B = 1``) ->
        ``(probs [T, E], routing_map [T, E] bool)``, ``T = S * B`` in ``[S, B]`` order.

        Collectives: one all-reduce of the counts over the shard group; ``global_aux_loss``
        adds one over ``tensor_and_data_parallel_with_cp`` (training only).
        """
        self._maintain_float32_buffers()
        hidden, seq_len, batch = self._flatten(hidden)
        logits = self.gating(self.apply_input_jitter(hidden))
        if self.config.moe_router_force_load_balancing:
            logits = _RandomLogits.apply(logits)
        attach = self.training and torch.is_grad_enabled()
        coeffs = self._aux_coeffs() if attach else {}
        routed = self._route(logits, need_aux_scores=bool(coeffs))
        probs, routing_map = routed.probs, routed.routing_map
        map_before_drop = routing_map
        if self.config.moe_expert_capacity_factor is not None:
            self.last_capacity = get_capacity(logits.shape[0] * self.topk, self.num_experts,
                                              self.config.moe_expert_capacity_factor)
            probs, routing_map = apply_token_drop(probs, routing_map, self.last_capacity,
                                                  self.config.moe_token_drop_policy)
        else:
            self.last_capacity = None
        aux_map = self._aux_routing_map(routed.aux_scores, map_before_drop) if coeffs else None
        stats = self._count_tokens(map_before_drop, routing_map, batch, aux_map=aux_map,
                                   per_sequence="seq_aux_loss" in coeffs,
                                   local=routed.tokens_per_expert.float())
        if attach:
            stats["aux_scores"] = routed.aux_scores
            probs = self._attach_losses(probs, logits, coeffs, stats, seq_len, batch)
            if self.local_tokens_per_expert is not None:
                # Not in eval or no-grad recompute passes: count each trained token once.
                self.local_tokens_per_expert += routing_map.sum(dim=0).float()
        self.last_stats = {"tokens_per_expert": stats["tokens_per_expert"],
                           "dropped_tokens": stats["dropped_tokens"], **stats["losses"]}
        return probs, routing_map

    def _aux_coeffs(self) -> dict[str, float]:
        """``{load-balancing type: coefficient}`` of the balance losses that are on."""
        return aux_loss_coeffs(self.routing_type, self.config.moe_aux_loss_coeff)

    def _aux_routing_map(self, aux_scores: torch.Tensor, map_before: torch.Tensor):
        """``[T, E]`` bool: the assignments the balance losses count, the plain top-k of the
        unbiased scores (Megatron-Core's ``compute_routing_scores_for_aux_loss``). Without
        expert bias or group-limited routing that is the routing itself (before dropping)."""
        if self.expert_bias is None and not self.config.moe_router_num_groups:
            return map_before
        idx = torch.topk(aux_scores.detach(), k=self.topk, dim=1)[1]
        return torch.zeros_like(map_before).scatter(1, idx, True)

    def _count_tokens(self, map_before: torch.Tensor, map_after: torch.Tensor, batch: int,
                      per_sequence: bool, local: torch.Tensor | None = None,
                      aux_map: torch.Tensor | None = None) -> dict:
        """Expert counts summed over the shard group, in one all-reduce.

        ``local``: this rank's counts [E] fp32 when the router has them (else summed here).
        ``aux_map``: the assignments the balance losses count, when not ``map_before``.
        Returns ``local`` [E] (this rank, before dropping), ``tokens_per_expert`` [E],
        ``aux_local`` / ``aux_tokens_per_expert`` [E] (the same of ``aux_map``),
        ``dropped_tokens`` (int64 scalar), ``per_sequence`` [B, E] of ``aux_map`` or None,
        ``losses`` {}.
        """
        e = self.num_experts
        if local is None:
            local = map_before.sum(dim=0).float()
        if map_after is map_before:
            dropped = local.new_zeros(1)
        else:
            dropped = (map_before.sum() - map_after.sum()).float().reshape(1)
        parts = [local, dropped]
        separate = aux_map is not None and aux_map is not map_before
        if separate:
            parts.append(aux_map.sum(dim=0).float())
        if per_sequence:
            counted = map_before if aux_map is None else aux_map
            parts.append(counted.view(-1, batch, e).sum(dim=0).float().reshape(-1))
        buf = all_reduce_inplace(torch.cat(parts), self.shard_group)
        seq_at = e + 1 + (e if separate else 0)
        return {"local": local, "tokens_per_expert": buf[:e],
                "aux_local": parts[2] if separate else local,
                "aux_tokens_per_expert": buf[e + 1:seq_at] if separate else buf[:e],
                "dropped_tokens": buf[e].round().long(),
                "per_sequence": buf[seq_at:].view(batch, e) if per_sequence else None,
                "losses": {}}

    def _record(self, stats: dict, name: str, logged: torch.Tensor, avg_group=None) -> None:
        logged = logged.detach()
        stats["losses"][name] = logged
        if self.layer_number is not None:
            MoELossTracker.save(name, self.layer_number, logged,
                                num_layers=self.config.num_layers,
                                reduce_group=self.shard_group, avg_group=avg_group)

    def _balance_loss(self, kind: str, coeff: float, logits: torch.Tensor, stats: dict,
                      seq_len: int, batch: int):
        """This rank's share of the ``kind`` load-balancing loss (times ``coeff``)."""
        k, e = self.topk, self.num_experts
        scores = stats.get("aux_scores")
        if scores is None:
            scores = scores_for_aux_loss(logits, self.config.moe_router_score_function)
            stats["aux_scores"] = scores
        t_shard = logits.shape[0] * self.shard_size
        if kind == "aux_loss":
            return switch_load_balancing_loss_func(scores, stats["aux_tokens_per_expert"],
                                                   t_shard, k, e, coeff)
        if kind == "seq_aux_loss":
            return sequence_load_balancing_loss_func(scores, stats["per_sequence"],
                                                     seq_len * self.shard_size, batch, k, e,
                                                     coeff)
        ps = self.parallel_state
        dp_kind = "tensor_and_data_parallel_with_cp"
        counts = all_reduce_inplace(stats["aux_local"].clone(), ps.group(dp_kind))
        t_global = logits.shape[0] * ps.world_size_of(dp_kind)
        # f_e over every data-parallel replica, P_e over this micro-batch: the switch loss
        # divides by t_global**2, the micro-batch share needs t_global * t_shard. Averaged over
        # data parallel (as the gradients are), the loss is the global-batch balance loss.
        loss = switch_load_balancing_loss_func(scores, counts, t_global, k, e, coeff)
        return loss * (t_global / t_shard)

    def _attach_losses(self, probs: torch.Tensor, logits: torch.Tensor, coeffs: dict,
                       stats: dict, seq_len: int, batch: int) -> torch.Tensor:
        """Attach z-loss and each balance loss of ``coeffs`` ({type: coefficient}) to
        ``probs`` (autograd, one hook each, as Megatron-Core) and record them."""
        z_coeff = self.config.moe_z_loss_coeff
        if z_coeff:
            # Each shard's mean over its tokens / shard_size: the shares sum to the full mean.
            z = z_loss_func(logits, z_coeff / self.shard_size)
            probs = MoEAuxLossAutoScaler.apply(probs, z)
            self._record(stats, "z_loss", z / z_coeff)
        for kind, coeff in coeffs.items():
            loss = self._balance_loss(kind, coeff, logits, stats, seq_len, batch)
            probs = MoEAuxLossAutoScaler.apply(probs, loss)
            avg = (self.parallel_state.group("data_parallel")
                   if kind == "global_aux_loss" else None)
            self._record(stats, LOAD_BALANCING_LOSS_NAMES[kind], loss / coeff, avg_group=avg)
        return probs


def update_expert_bias(routers, parallel_state: ParallelState | None = None) -> None:
    """Aux-loss-free balancing step (DeepSeek-V3): call after each optimizer step.

    Sums every router's ``local_tokens_per_expert`` over the ``tensor_and_data_parallel_with_cp``
    group (one all-reduce for all routers), moves ``expert_bias`` by
    ``moe_router_bias_update_rate * sign(mean - count)`` (overloaded experts get picked less)
    and zeroes the counts. ``routers``: an iterable of :class:`TopKRouter` or a module holding
    them; routers without expert bias are skipped.
    """
    if isinstance(routers, nn.Module):
        routers = [m for m in routers.modules() if isinstance(m, TopKRouter)]
    routers = [r for r in routers if r.expert_bias is not None]
    if not routers:
        return
    ps = parallel_state or routers[0].parallel_state
    with torch.no_grad():
        counts = torch.cat([r.local_tokens_per_expert.float() for r in routers])
        all_reduce_inplace(counts, ps.group("tensor_and_data_parallel_with_cp"))
        for r, c in zip(routers, counts.split([r.num_experts for r in routers])):
            offset = c.mean() - c
            r.expert_bias += r.config.moe_router_bias_update_rate * torch.sign(offset)
            r.local_tokens_per_expert.zero_()
