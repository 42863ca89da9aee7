"""Single-process checks of ``moecore.tensor_parallel``: TP=1 paths equal plain torch, label
smoothing equals its direct definition, RNG tracker and recomputation, bad input."""

import pytest
import torch
import torch.nn.functional as F

from moecore.collectives import all_reduce_inplace
from moecore.config import TransformerConfig
from moecore.parallel_state import ParallelSizes, ParallelState, all_rank_groups
from moecore.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabUtility,
    all_gather_no_grad,
    all_to_all,
    checkpoint,
    copy_to_tensor_model_parallel_region,
    divide,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_rng_tracker,
    model_parallel_seed,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
    split_tensor_along_last_dim,
    vocab_parallel_cross_entropy,
)

SINGLE = ParallelState.single()


def _cfg(**kw):
    base = dict(num_layers=2, hidden_size=16, num_attention_heads=4, ffn_hidden_size=32,
                init_method_std=0.3)
    base.update(kw)
    return TransformerConfig(**base)


def _fake_state(tp: int, rank: int) -> ParallelState:
    """Layout of rank ``rank`` in a ``tp``-rank world without communicators (construction only)."""
    sizes = ParallelSizes(world_size=tp, tp=tp)
    ranks = {k: next(g for g in v if rank in g) for k, v in all_rank_groups(sizes).items()}
    return ParallelState(sizes=sizes, rank=rank, groups={}, ranks=ranks)


def _smoothed_ce(logits, target, alpha):
    """Direct definition: target mass 1 - alpha, alpha / (V - 1) on every other token."""
    V = logits.shape[-1]
    q = torch.full_like(logits, alpha / (V - 1))
    q.scatter_(-1, target.unsqueeze(-1), 1.0 - alpha)
    return -(q * torch.log_softmax(logits, dim=-1)).sum(-1)


# ---- utils ----------------------------------------------------------------------------------


def test_divide_and_split():
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match=r"size=10 is not divisible by 4.*multiple of 4"):
        divide(10, 4)
    x = torch.arange(24.0).view(2, 12)
    parts = split_tensor_along_last_dim(x, 3, contiguous_split_chunks=True)
    assert [tuple(p.shape) for p in parts] == [(2, 4)] * 3
    assert all(p.is_contiguous() for p in parts)
    torch.testing.assert_close(torch.cat(parts, -1), x, rtol=0, atol=0)
    assert VocabUtility.vocab_range_from_global_vocab_size(64, 2, 4) == (32, 48)
    assert VocabUtility.vocab_range_from_per_partition_vocab_size(16, 3, 4) == (48, 64)
    with pytest.raises(ValueError, match="vocab size=65"):
        VocabUtility.vocab_range_from_global_vocab_size(65, 0, 4)


def test_mappings_are_identity_on_one_rank():
    x = torch.randn(4, 3, 6, requires_grad=True)
    g = torch.randn(4, 3, 6)
    ops = [copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
           scatter_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
           scatter_to_sequence_parallel_region, gather_from_sequence_parallel_region,
           reduce_scatter_to_sequence_parallel_region]
    for op in ops:
        for kw in ({}, {"group": None}):  # default (single-process TP group) and explicit None
            x.grad = None
            y = op(x, **kw)
            torch.testing.assert_close(y, x, rtol=0, atol=0)
            y.backward(g)
            torch.testing.assert_close(x.grad, g, rtol=0, atol=0)
    x.grad = None
    y = all_to_all(x, [4], [4], group=None)
    y.backward(g)
    torch.testing.assert_close(x.grad, g, rtol=0, atol=0)
    with pytest.raises(ValueError, match="output splits"):
        all_to_all(x, [3], [4], group=None)
    t = torch.ones(3)
    assert all_reduce_inplace(t, None) is t
    assert all_gather_no_grad(t, None) is t


# ---- layers at TP=1 -------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_linear_layers_match_torch(bias):
    cfg = _cfg(add_bias_linear=bias)
    torch.manual_seed(3)
    col = ColumnParallelLinear(16, 32, config=cfg, bias=bias, parallel_state=SINGLE)
    row = RowParallelLinear(32, 16, config=cfg, bias=bias, parallel_state=SINGLE)
    # Init = full master weight drawn from the default generator in module order.
    torch.manual_seed(3)
    w1 = torch.empty(32, 16).normal_(0, 0.3)
    w2 = torch.empty(16, 32).normal_(0, 0.3)
    torch.testing.assert_close(col.weight.data, w1, rtol=0, atol=0)
    torch.testing.assert_close(row.weight.data, w2, rtol=0, atol=0)
    assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0
    assert row.weight.tensor_model_parallel and row.weight.partition_dim == 1
    if bias:
        assert torch.count_nonzero(col.bias) == 0 and torch.count_nonzero(row.bias) == 0
        with torch.no_grad():
            col.bias.normal_()
            row.bias.normal_()
    x = torch.randn(5, 2, 16)
    h, b = col(x)
    assert b is None
    out, b = row(F.gelu(h))
    assert b is None
    ref = F.linear(F.gelu(F.linear(x, w1, col.bias)), w2, row.bias)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_skip_bias_add_gather_output_and_dtype():
    cfg = _cfg(params_dtype=torch.float64)
    col = ColumnParallelLinear(16, 8, config=cfg, bias=True, skip_bias_add=True,
                               gather_output=True, parallel_state=SINGLE)
    row = RowParallelLinear(8, 16, config=cfg, bias=True, skip_bias_add=True,
                            input_is_parallel=False, parallel_state=SINGLE)
    assert col.weight.dtype == torch.float64 and row.bias.dtype == torch.float64
    with torch.no_grad():
        col.bias.fill_(1.5)
    x = torch.randn(3, 16, dtype=torch.float64)
    h, b = col(x)
    assert b is col.bias
    torch.testing.assert_close(h, x @ col.weight.t(), rtol=0, atol=0)  # bias left out
    out, b = row(h)
    assert b is row.bias
    torch.testing.assert_close(out, h @ row.weight.t())


def test_column_tied_weight():
    cfg = _cfg()
    col = ColumnParallelLinear(16, 8, config=cfg, skip_weight_param_allocation=True,
                               parallel_state=SINGLE)
    assert col.weight is None
    w = torch.randn(8, 16)
    x = torch.randn(2, 16)
    torch.testing.assert_close(col(x, weight=w)[0], x @ w.t(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass forward"):
        col(x)
    with pytest.raises(ValueError, match=r"expected \(8, 16\)"):
        col(x, weight=torch.randn(16, 8))


def test_embedding_matches_torch():
    cfg = _cfg()
    torch.manual_seed(5)
    emb = VocabParallelEmbedding(64, 16, config=cfg, parallel_state=SINGLE)
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight), rtol=0, atol=0)
    emb_rs = VocabParallelEmbedding(64, 16, config=cfg, reduce_scatter_embeddings=True,
                                    parallel_state=SINGLE)
    out = emb_rs(ids)
    assert out.shape == (7, 2, 16)  # [S, B, H]
    torch.testing.assert_close(out, F.embedding(ids, emb_rs.weight).transpose(0, 1))
    with pytest.raises(ValueError, match=r"needs ids \[B, S\]"):
        emb_rs(ids[0])


def test_bad_sizes_raise_with_numbers():
    cfg = _cfg()
    ps = _fake_state(4, 1)
    with pytest.raises(ValueError, match=r"output_size=10 is not divisible by the tensor parallel "
                                         r"size 4; choose a output_size that is a multiple of 4"):
        ColumnParallelLinear(16, 10, config=cfg, parallel_state=ps)
    with pytest.raises(ValueError, match=r"input_size=6 is not divisible .* size 4"):
        RowParallelLinear(6, 16, config=cfg, parallel_state=ps)
    with pytest.raises(ValueError, match=r"vocab size\)=50 is not divisible .* multiple of 4"):
        VocabParallelEmbedding(50, 16, config=cfg, parallel_state=ps)
    sp_cfg = _cfg(tensor_model_parallel_size=4, sequence_parallel=True)
    with pytest.raises(ValueError, match="gather_output=True cannot be combined"):
        ColumnParallelLinear(16, 8, config=sp_cfg, gather_output=True, parallel_state=ps)
    with pytest.raises(ValueError, match="needs input_is_parallel=True"):
        RowParallelLinear(8, 16, config=sp_cfg, input_is_parallel=False, parallel_state=ps)
    # Construction on a fake rank takes the right shard of the same master weight.
    torch.manual_seed(0)
    emb = VocabParallelEmbedding(64, 16, config=cfg, parallel_state=ps)
    torch.manual_seed(0)
    full = torch.empty(64, 16).normal_(0, 0.3)
    torch.testing.assert_close(emb.weight.data, full[16:32], rtol=0, atol=0)
    assert (emb.vocab_start_index, emb.vocab_end_index) == (16, 32)


# ---- cross entropy --------------------------------------------------------------------------


def test_cross_entropy_matches_torch():
    logits = (3 * torch.randn(5, 3, 40)).requires_grad_(True)
    target = torch.randint(0, 40, (5, 3))
    w = torch.rand(5, 3)
    loss = vocab_parallel_cross_entropy(logits, target)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.view(-1, 40), target.view(-1), reduction="none").view(5, 3)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    (loss * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_label_smoothing_matches_direct_formula(alpha):
    logits = (4 * torch.randn(6, 32, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(0, 32, (6,))
    w = torch.rand(6, dtype=torch.float64)
    loss = vocab_parallel_cross_entropy(logits, target, label_smoothing=alpha, group=None)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = _smoothed_ce(ref_logits, target, alpha)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    (loss * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-12, atol=1e-12)
    # Not torch's definition (which spreads alpha / V over every token, target included).
    torch_ls = F.cross_entropy(logits.detach(), target, label_smoothing=alpha, reduction="none")
    assert not torch.allclose(loss.detach(), torch_ls)


def test_cross_entropy_bf16_and_errors():
    logits = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 16, (4,))
    loss = vocab_parallel_cross_entropy(logits, target)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.detach().float(), target, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"label_smoothing=1.0 must be in \[0, 1\)"):
        vocab_parallel_cross_entropy(logits, target, label_smoothing=1.0)
    with pytest.raises(ValueError, match="must agree"):
        vocab_parallel_cross_entropy(logits, target[:3])
    loss = vocab_parallel_cross_entropy(logits.detach().float().requires_grad_(), target)
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.sum().backward()


# ---- RNG tracker and recomputation ----------------------------------------------------------


def test_tracker_fork_states_and_errors():
    tracker = get_rng_tracker()
    model_parallel_seed(123, parallel_state=SINGLE)
    outside_ref = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(8)
    assert torch.equal(torch.get_rng_state(), outside_ref)  # default stream untouched
    states = tracker.get_states()
    with tracker.fork():
        b = torch.rand(8)
    assert not torch.equal(a, b)  # the forked stream advanced
    tracker.set_states(states)
    with tracker.fork():
        b2 = torch.rand(8)
    torch.testing.assert_close(b2, b, rtol=0, atol=0)
    # Default seed = seed + 100 * pp_rank, tracked stream = that + 2718 + tp_rank.
    torch.manual_seed(123 + 2718)
    expected = torch.rand(8)
    model_parallel_seed(123, parallel_state=SINGLE)
    with tracker.fork():
        torch.testing.assert_close(torch.rand(8), expected, rtol=0, atol=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    assert model_parallel_seed(123, SINGLE) == 123
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="never added"):
        with tracker.fork("missing"):
            pass
    with pytest.raises(ValueError, match="already backs"):
        tracker.add("other", 123 + 2718)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("model-parallel-rng", 99)


def _dropout_block(x, w, scale):
    h = F.dropout(torch.tanh(x @ w), p=0.5, training=True)
    with get_rng_tracker().fork():
        h = F.dropout(h, p=0.3, training=True)
    return h * scale, None


def test_checkpoint_with_dropout_matches_plain():
    model_parallel_seed(7, parallel_state=SINGLE)
    x0 = torch.randn(6, 8)
    w0 = torch.randn(8, 8)
    g = torch.randn(6, 8)
    tracker = get_rng_tracker()
    cpu_state, tracker_states = torch.get_rng_state(), tracker.get_states()

    def run(use_checkpoint):
        torch.set_rng_state(cpu_state)
        tracker.set_states(tracker_states)
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        if use_checkpoint:
            out, none = checkpoint(_dropout_block, False, x, w, 2.0)
        else:
            out, none = _dropout_block(x, w, 2.0)
        assert none is None
        # Draw between forward and backward: recomputation must not see this advance.
        torch.rand(5)
        with tracker.fork():
            torch.rand(5)
        out.backward(g)
        return out.detach(), x.grad, w.grad, torch.get_rng_state()

    plain, ckpt = run(False), run(True)
    assert (plain[0] == 0).any()  # dropout really dropped something
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
