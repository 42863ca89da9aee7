"""MoE auxiliary losses (load balancing, z-loss), the autograd hook that applies them, and a
per-layer tracker for logging.

Sharded token sets (sequence / context parallel): a rank holding ``T_local`` of a micro-batch's
``T`` tokens passes its *local* probs and the *global* ``tokens_per_expert``/``total_num_tokens``;
the loss it returns is its share, and the shares of the ranks holding the micro-batch add up to
the loss of the whole micro-batch (so do their gradients, which the trainer sums over TP under
sequence parallel).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moecore.collectives import all_reduce_inplace, group_size

# Megatron-Core's names of the logged balance losses, in the order it applies them.
LOAD_BALANCING_LOSS_NAMES = {"aux_loss": "load_balancing_loss",
                             "seq_aux_loss": "seq_load_balancing_loss",
                             "global_aux_loss": "global_load_balancing_loss"}


def aux_loss_coeffs(load_balancing_type, aux_loss_coeff) -> dict[str, float]:
    """``{type: coefficient}`` of the balance losses that are on (coefficient > 0), in
    :data:`LOAD_BALANCING_LOSS_NAMES` order.

    ``load_balancing_type`` is one type or a list of them; ``aux_loss_coeff`` one value, or a
    list with one value per type (Megatron-Core's ``get_aux_loss_coeff``). ``sinkhorn`` and
    ``none`` have no balance loss.
    """
    types = (list(load_balancing_type) if isinstance(load_balancing_type, (list, tuple))
             else [load_balancing_type])
    coeffs = (list(aux_loss_coeff) if isinstance(aux_loss_coeff, (list, tuple))
              else [aux_loss_coeff] * len(types))
    given = {t: float(c or 0.0) for t, c in zip(types, coeffs)}
    return {t: given[t] for t in LOAD_BALANCING_LOSS_NAMES if given.get(t, 0.0) > 0}


def switch_load_balancing_loss_func(probs: torch.Tensor, tokens_per_expert: torch.Tensor,
                                    total_num_tokens: int, topk: int, num_experts: int,
                                    coeff: float) -> torch.Tensor:
    """Switch-Transformer / GShard balance loss ``coeff * E * sum_e f_e * P_e``.

    ``f_e = tokens_per_expert[e] / (T * topk)`` is the fraction of assignments routed to ``e``
    and ``P_e = sum_t probs[t, e] / T`` the mean router probability of ``e``; ``T`` is
    ``total_num_tokens``. Equals ``coeff`` for perfectly balanced, uniform routing.

    Args:
        probs: ``[T_local, E']`` probabilities of all experts for this rank's tokens (``E'`` may
            flatten extra groups, e.g. per-sequence experts; ``num_experts`` stays ``E``).
        tokens_per_expert: ``[E']`` assignment counts over all ``total_num_tokens`` (no grad).
        total_num_tokens: ``T``, tokens behind ``tokens_per_expert``.
    Returns:
        Scalar: this rank's share of the loss.
    """
    if probs.shape[-1] != tokens_per_expert.shape[-1]:
        raise ValueError(f"probs has {probs.shape[-1]} expert columns but tokens_per_expert "
                         f"has {tokens_per_expert.shape[-1]}")
    if total_num_tokens <= 0 or topk <= 0:
        raise ValueError(f"total_num_tokens={total_num_tokens} and topk={topk} must be > 0")
    aggregated = probs.sum(dim=0)
    scale = num_experts * coeff / (topk * float(total_num_tokens) * float(total_num_tokens))
    return torch.sum(aggregated * tokens_per_expert.to(aggregated.dtype)) * scale


def sequence_load_balancing_loss_func(probs: torch.Tensor, tokens_per_expert: torch.Tensor,
                                      seq_length: int, batch_size: int, topk: int,
                                      num_experts: int, coeff: float) -> torch.Tensor:
    """Per-sequence balance loss (DeepSeek-V3 "sequence-wise"), averaged over the batch.

    ``coeff * mean_b [E * sum_e f_{b,e} * P_{b,e}]`` with ``f``/``P`` of the switch loss taken
    over the ``seq_length`` tokens of sequence ``b`` alone.

    Args:
        probs: ``[S_local * B, E]`` in ``[S, B]`` token order (token ``s * B + b``), this rank's
            slice of the sequences.
        tokens_per_expert: ``[B, E]`` assignment counts of each whole sequence (no grad).
        seq_length: ``S``, the full sequence length behind ``tokens_per_expert``.
    Returns:
        Scalar: this rank's share of the loss.
    """
    if tokens_per_expert.shape != (batch_size, num_experts):
        raise ValueError(f"tokens_per_expert must be [batch_size={batch_size}, num_experts="
                         f"{num_experts}], got {tuple(tokens_per_expert.shape)}")
    if probs.dim() != 2 or probs.shape[0] % batch_size or probs.shape[1] != num_experts:
        raise ValueError(f"probs {tuple(probs.shape)} must be [S_local * {batch_size}, "
                         f"{num_experts}]")
    per_seq = probs.reshape(-1, batch_size * num_experts)  # [S_local, B*E]
    loss = switch_load_balancing_loss_func(per_seq, tokens_per_expert.reshape(-1), seq_length,
                                           topk, num_experts, coeff)
    return loss / batch_size


def z_loss_func(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE router z-loss ``coeff * mean_t logsumexp(logits[t])**2`` for ``logits [T, E]``."""
    return torch.mean(torch.square(torch.logsumexp(logits, dim=-1))) * coeff


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Identity on ``activations`` whose backward also seeds ``aux_loss`` with ``scale``.

    ``out = MoEAuxLossAutoScaler.apply(activations, aux_loss)`` lets an auxiliary loss reach the
    parameters it depends on without the caller adding it to the main loss. Set the scale with
    :meth:`set_loss_scale` to match the main loss's scaling (e.g. ``1 / num_microbatches`` or a
    mixed-precision loss scale), as Megatron-Core does. As there, the output shares the
    input's storage: clone it before modifying it in place.
    """

    main_loss_backward_scale: torch.Tensor | None = None

    @staticmethod
    def forward(ctx, activations: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return activations

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        if scale is None:
            grad_aux = torch.ones_like(aux_loss)
        else:
            grad_aux = torch.ones_like(aux_loss) * scale.to(aux_loss.device, aux_loss.dtype)
        return grad_output, grad_aux

    @staticmethod
    def set_loss_scale(scale: float | torch.Tensor) -> None:
        """Multiply the gradient every later backward gives the aux losses (default 1.0).

        A scale already on the same device is updated in place, so a captured CUDA graph that
        reads it (``moecore.training.cuda_graph``) sees the new value.
        """
        new = torch.as_tensor(scale, dtype=torch.float32).detach()
        cur = MoEAuxLossAutoScaler.main_loss_backward_scale
        if cur is not None and cur.device == new.device and cur.shape == new.shape:
            cur.copy_(new)
        else:
            MoEAuxLossAutoScaler.main_loss_backward_scale = new.clone()


class MoELossTracker:
    """Per-layer MoE loss values for logging; the class itself is the process-wide singleton.

    ``save`` *accumulates* (micro-batches add up; the trainer scales by ``1/num_microbatches``
    when logging and calls :meth:`clear` after). Values are detached: logging only.
    """

    _values: dict[str, torch.Tensor] = {}
    _reduce_groups: dict[str, object] = {}
    _avg_groups: dict[str, object] = {}

    @classmethod
    def save(cls, name: str, layer_number: int, value: torch.Tensor,
             num_layers: int | None = None, reduce_group=None, avg_group=None) -> None:
        """Add ``value`` (scalar) to ``name``'s entry for ``layer_number`` (1-based).

        ``reduce_group``: ranks whose values are shares of one loss (summed by :meth:`reduce`),
        e.g. the tensor-and-context-parallel group under sequence parallel. ``avg_group``:
        ranks whose values are averaged by :meth:`reduce` (global aux loss over data parallel).
        The entry has ``max(num_layers, layer_number)`` slots.
        """
        if layer_number is None or layer_number < 1:
            raise ValueError(f"layer_number={layer_number} must be a 1-based layer index")
        value = value.detach().float().reshape(())
        size = max(num_layers or 0, layer_number)
        cur = cls._values.get(name)
        if cur is None or cur.device != value.device:
            cur = torch.zeros(size, device=value.device)
        elif cur.numel() < size:
            cur = torch.cat([cur, cur.new_zeros(size - cur.numel())])
        cur[layer_number - 1] += value
        cls._values[name] = cur
        cls._reduce_groups[name] = reduce_group
        cls._avg_groups[name] = avg_group

    @classmethod
    def add_values(cls, name: str, values: torch.Tensor, reduce_group=None,
                   avg_group=None) -> None:
        """Add a whole ``[num_layers]`` vector to ``name`` (what :meth:`save` built for one
        micro-batch, e.g. the static output of a replayed CUDA graph); ``values`` is copied."""
        cur = cls._values.get(name)
        if cur is None or cur.device != values.device:
            cur = values.detach().float().clone()
        else:
            if cur.numel() < values.numel():
                cur = torch.cat([cur, cur.new_zeros(values.numel() - cur.numel())])
            cur[:values.numel()] += values.detach().float()
        cls._values[name] = cur
        cls._reduce_groups[name] = reduce_group
        cls._avg_groups[name] = avg_group

    @classmethod
    def groups(cls, name: str) -> tuple[object, object]:
        """``(reduce_group, avg_group)`` saved with ``name``."""
        return cls._reduce_groups.get(name), cls._avg_groups.get(name)

    @classmethod
    def state(cls) -> tuple[dict, dict, dict]:
        """Everything saved so far, for :meth:`set_state` (set aside while capturing a graph)."""
        return dict(cls._values), dict(cls._reduce_groups), dict(cls._avg_groups)

    @classmethod
    def set_state(cls, state: tuple[dict, dict, dict]) -> None:
        cls._values, cls._reduce_groups, cls._avg_groups = (dict(d) for d in state)

    @classmethod
    def values(cls) -> dict[str, torch.Tensor]:
        """``name -> [num_layers]`` local (this rank's) accumulated values."""
        return dict(cls._values)

    @classmethod
    def clear(cls) -> None:
        cls._values = {}
        cls._reduce_groups = {}
        cls._avg_groups = {}

    @classmethod
    def reduce(cls, group=None, avg_group=None) -> dict[str, torch.Tensor]:
        """Values for logging, reduced across ranks (collective; stored values are untouched).

        Per name: sum over its ``reduce_group`` (shares of one micro-batch) and average over its
        ``avg_group``; then sum over ``group`` (pipeline stages hold disjoint layers and may save
        different names: the names are unioned over ``group`` first) and average over
        ``avg_group`` (e.g. data parallel). Every rank of these groups must call this.
        """
        out = {}
        for name in sorted(cls._values):
            v = cls._values[name].clone()
            all_reduce_inplace(v, cls._reduce_groups.get(name))
            out[name] = all_reduce_inplace(v, cls._avg_groups.get(name), average=True)
        sizes = {name: v.numel() for name, v in out.items()}
        if group_size(group) > 1:
            gathered = [None] * group_size(group)
            dist.all_gather_object(gathered, sizes, group=group)
            sizes = {}
            for d in gathered:
                for name, n in d.items():
                    sizes[name] = max(n, sizes.get(name, 0))
        if out:
            device = next(iter(out.values())).device
        else:  # a stage without MoE layers still joins the collectives (NCCL needs CUDA)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for name in sorted(sizes):
            v = out.get(name, torch.zeros(0, device=device))
            if v.numel() < sizes[name]:
                v = torch.cat([v, v.new_zeros(sizes[name] - v.numel())])
            all_reduce_inplace(v, group)
            out[name] = all_reduce_inplace(v, avg_group, average=True)
        return out
