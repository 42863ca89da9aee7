"""FP8 recipes on CPU through the ``emulated`` GEMM backend, against float references that emulate
the rounding (``x.to(float8).float()``): scales, amax history, block tiling, FP8 linear and
grouped GEMM (forward, dgrad, wgrad), which layers stay bf16, flags and start-up refusal,
precision-independent checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from moecore.backends import BackendUnavailableError
from moecore.config import TransformerConfig
from moecore.fp8 import Fp8Meta, Fp8Recipe, fp8_grouped_mm, fp8_linear, layer_uses_fp8
from moecore.kernels.fp8_gemm import EMULATED, select_fp8_gemm
from moecore.kernels.fp8_quant import (
    Fp8Tensor,
    dequantize,
    group_row_map,
    padded_row_map,
    quantize_blocks,
    quantize_tensor,
    quantize_tiles,
    scale_from_amax,
    transpose,
)
from moecore.moe.experts import GroupedMLP
from moecore.parallel_state import ParallelState
from moecore.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from moecore.transformer.layer import TransformerLayer
from tests.cli import BASE, parse_error
from tests.triton_interpret import assert_checks_pass

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
SINGLE = ParallelState.single()


def _recipe(recipe="tensorwise", fmt="hybrid", **kw):
    return Fp8Recipe(fmt, recipe, gemm_backend="emulated", **kw)


def _q(x, amax, dtype, margin=0):
    """Reference cast: scale = max/amax/2^margin, clamp, round to ``dtype``, back to float."""
    top = {E4: 448.0, E5: 57344.0}[dtype]
    scale = top / amax / 2 ** margin
    return (x.double() * scale).clamp(-top, top).float().to(dtype).double() / scale


def _close(got, ref, tol=1e-5):
    err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= tol, f"relative error {err:.3e} > {tol}"


# ---- casts ------------------------------------------------------------------------------------
def test_scale_from_amax_margin_and_degenerate_amax():
    amax = torch.tensor([2.0, 0.0, float("inf")])
    assert scale_from_amax(amax, E4, margin=1).tolist() == [448.0 / 2 / 2, 1.0, 1.0]


def test_tiles_and_blocks_match_a_per_tile_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=g) * torch.logspace(-3, 3, 256)  # very different tiles
    t = quantize_tiles(x, E4)
    assert t.scale_inv.shape == (3, 2)
    ref = torch.cat([_q(x[:, i:i + 128], x[:, i:i + 128].abs().amax(1, keepdim=True), E4)
                     for i in (0, 128)], 1)
    _close(dequantize(t), ref, 1e-6)
    w = torch.randn(256, 384, generator=g)
    b = quantize_blocks(w, E5, margin=2)
    assert b.scale_inv.shape == (2, 3)
    blk = w[128:, 256:]
    _close(dequantize(b)[128:, 256:], _q(blk, blk.abs().amax(), E5, 2), 1e-6)
    bt = transpose(b)  # a block-quantised W^T is the transposed blocks
    assert torch.equal(dequantize(bt), dequantize(b).t())
    with pytest.raises(ValueError, match="multiples of 128"):
        quantize_tiles(torch.randn(2, 100), E4)


def test_cast_saturates_instead_of_overflowing():
    meta = Fp8Meta(_recipe("delayed", amax_history_len=2))
    meta.quantize("input", torch.ones(4))  # history: amax 1
    q = meta.quantize("input", torch.full((4,), 10.0))  # scale still from amax 1
    assert torch.equal(q.data.float(), torch.full((4,), 448.0))  # clamped to e4m3's max


# ---- delayed scaling ---------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_delayed_scaling_uses_the_history_before_this_call(algo):
    meta = Fp8Meta(_recipe("delayed", "e4m3", amax_history_len=2, amax_compute_algo=algo))
    used = []
    for amax in (4.0, 1.0, 2.0, 8.0):
        x = torch.tensor([amax, -amax / 3])
        q = meta.quantize("input", x)
        used.append(448.0 * q.scale_inv.item())  # the amax its scale came from
    # call 1: empty history -> its own amax; later: the previous one (most_recent) or the max
    # of the last two (max).
    expect = [4.0, 4.0, 1.0, 2.0] if algo == "most_recent" else [4.0, 4.0, 4.0, 2.0]
    assert used == pytest.approx(expect)
    assert meta.amax_history_input[:, 0].tolist() == [8.0, 2.0]


def test_expert_weights_get_one_scale_each():
    meta = Fp8Meta(_recipe("delayed"), num_weights=3, grouped=True)
    w = torch.randn(3, 32, 16) * torch.tensor([1.0, 10.0, 100.0])[:, None, None]
    q = meta.quantize("weight", w)
    ref = torch.stack([_q(w[e], w[e].abs().amax(), E4) for e in range(3)])
    _close(dequantize(q), ref, 1e-6)
    assert meta.amax_history_weight.shape == (1, 3)


# ---- FP8 linear and grouped GEMM ----------------------------------------------------------------
def _ref_tensorwise(x, w, dy):
    """out, dx, dw with every operand rounded once per tensor (hybrid: e5m2 gradients)."""
    xq, wq = _q(x, x.abs().amax(), E4), _q(w, w.abs().amax(), E4)
    dyq = _q(dy, dy.abs().amax(), E5)
    return xq @ wq.t(), dyq @ wq, dyq.t() @ xq


def _ref_blockwise(x, w, dy):
    def tiles(t, dtype):  # 1x128 tiles along the last dim
        return torch.cat([_q(c, c.abs().amax(1, keepdim=True), dtype) for c in t.split(128, 1)], 1)

    def blocks(t):
        return torch.cat([torch.cat([_q(c, c.abs().amax(), E4) for c in r.split(128, 1)], 1)
                          for r in t.split(128, 0)], 0)

    wq = blocks(w)
    out = tiles(x, E4) @ wq.t()
    dx = tiles(dy, E5) @ wq
    dw = tiles(dy.t(), E5) @ tiles(x.t(), E4).t()  # both tiled along the tokens
    return out, dx, dw


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_fp8_linear_forward_dgrad_wgrad(recipe):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 100, 256, generator=g)  # 200 tokens: padded to 256 for the wgrad
    w = torch.randn(384, 256, generator=g) * 0.1
    dy = torch.randn(2, 100, 384, generator=g)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = fp8_linear(xr, wr, None, Fp8Meta(_recipe(recipe)))
    out.backward(dy)
    ref = (_ref_tensorwise if recipe == "tensorwise" else _ref_blockwise)(
        x.reshape(-1, 256), w, dy.reshape(-1, 384))
    _close(out.reshape(-1, 384), ref[0])
    _close(xr.grad.reshape(-1, 256), ref[1])
    _close(wr.grad, ref[2])
    exact = F.linear(x, w)
    _close(out, exact, 0.08)  # and it is an FP8 approximation of the real product


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "blockwise"])
def test_fp8_grouped_mm_matches_per_expert_reference(recipe):
    g = torch.Generator().manual_seed(2)
    counts = torch.tensor([70, 0, 150, 36])
    x = torch.randn(256, 128, generator=g)
    w = torch.randn(4, 128, 256, generator=g) * 0.1  # GroupedMLP layout [E, K, M]
    dy = torch.randn(256, 256, generator=g)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    meta = Fp8Meta(_recipe(recipe), num_weights=4, grouped=True)
    out = fp8_grouped_mm(xr, wr, counts, meta)
    out.backward(dy)
    outs, dxs, dws, start = [], [], [], 0
    ref_fn = _ref_blockwise if recipe == "blockwise" else _ref_tensorwise
    for e, n in enumerate(counts.tolist()):
        rows = slice(start, start + n)
        start += n
        if recipe == "blockwise":  # tiles are per token: same as per expert
            o, dx, dw = ref_fn(x[rows], w[e].t(), dy[rows]) if n else (None, None, 0 * w[e].t())
        else:  # one scale for x and dy over all experts, one per expert for w; the grouped
            # GEMMs take E4M3 gradients under hybrid too
            wq = _q(w[e], w[e].abs().amax(), E4)
            xq, dyq = _q(x[rows], x.abs().amax(), E4), _q(dy[rows], dy.abs().amax(), E4)
            o, dx, dw = xq @ wq, dyq @ wq.t(), (dyq.t() @ xq)
        if n:
            outs.append(o), dxs.append(dx)
        dws.append(dw.t())
    _close(out, torch.cat(outs))
    _close(xr.grad, torch.cat(dxs))
    _close(wr.grad, torch.stack(dws))
    assert wr.grad[1].abs().sum() == 0  # the empty expert


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_experts_equal_the_two_grouped_gemms_bit_for_bit(recipe, dtype):
    """fc1 -> SwiGLU -> fc2 as one op (amax from the SwiGLU kernel, casts writing both layouts)
    gives the values of fp8_grouped_mm twice around swiglu, over three steps (the delayed
    recipe's histories move), with an empty expert."""
    from tests.fp8_experts import assert_same, swiglu_experts_grads

    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([40, 0, 75, 21])
    w1 = (torch.randn(4, 64, 2 * 48, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(4, 48, 64, generator=g) * 0.2).to(dtype)
    kw = dict(amax_history_len=3, amax_compute_algo="max") if recipe == "delayed" else {}
    metas = [[Fp8Meta(_recipe(recipe, **kw), num_weights=4, grouped=True) for _ in range(2)]
             for _ in range(2)]
    for step in range(3):
        x = (torch.randn(136, 64, generator=g) * (1 + step)).to(dtype)
        dy = torch.randn(136, 64, generator=g).to(dtype)
        probs = torch.rand(136, generator=g) if step else None  # the rows' routing weights
        results = [swiglu_experts_grads(fused, x, w1, w2, dy, counts, m, probs)
                   for fused, m in zip((True, False), metas)]
        assert_same(*results, f"step {step}:")
        assert results[0][2][1].abs().sum() == 0  # the empty expert
    if recipe == "delayed":
        for role in ("input", "grad"):
            assert torch.equal(getattr(metas[0][1], f"amax_history_{role}"),
                               getattr(metas[1][1], f"amax_history_{role}"))


def test_grouped_mlp_takes_the_fused_fp8_path_only_where_it_applies(monkeypatch):
    import moecore.moe.experts as experts_mod

    calls = []
    real = experts_mod.fp8_swiglu_experts
    monkeypatch.setattr(experts_mod, "fp8_swiglu_experts",
                        lambda *a: calls.append(1) or real(*a))
    x = torch.randn(40, 128)
    for kw, fused in ((dict(), True), (dict(fp8_recipe="blockwise"), False),
                      (dict(fp8_wgrad=False), False), (dict(bias_swiglu_fusion=False), False)):
        calls.clear()
        cfg = _layer_cfg(num_layers=1, moe_layer_freq=1, **kw)
        torch.manual_seed(0)
        mlp = GroupedMLP(4, cfg, parallel_state=SINGLE)
        mlp.enable_fp8(Fp8Recipe.from_config(cfg))
        out, _ = mlp(x, torch.tensor([10, 0, 30, 0]))
        assert bool(calls) == fused, kw
        assert out.shape == (40, 128)


# ---- which layers run FP8 ----------------------------------------------------------------------
def _layer_cfg(**kw):
    base = dict(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256,
                num_moe_experts=4, moe_ffn_hidden_size=128, moe_grouped_gemm=True,
                moe_layer_freq=[0, 1, 1, 1], moe_grouped_gemm_backend="loop",
                fp8="hybrid", fp8_recipe="tensorwise", fp8_gemm_backend="emulated")
    base.update(kw)
    return TransformerConfig(**base)


def test_first_last_layers_bf16_and_what_stays_high_precision():
    cfg = _layer_cfg(first_last_layers_bf16=True, num_layers_at_start_in_bf16=1,
                     num_layers_at_end_in_bf16=2)
    assert [layer_uses_fp8(cfg, n) for n in (1, 2, 3, 4)] == [False, True, False, False]
    assert [layer_uses_fp8(cfg.replace(first_last_layers_bf16=False), n)
            for n in (1, 4)] == [True, True]
    torch.manual_seed(0)
    layer = TransformerLayer(cfg, 2, parallel_state=SINGLE, moe_layer=_moe_layer())
    assert layer.fp8
    assert layer.self_attention.linear_qkv.fp8 is not None
    assert layer.self_attention.linear_proj.fp8 is not None
    experts = layer.mlp.experts
    assert experts.fp8_fc1.num_weights == 4 and experts.fp8_fc2 is not None
    assert not any(isinstance(m, Fp8Meta) for m in layer.mlp.router.modules())
    bf16_layer = TransformerLayer(cfg, 3, parallel_state=SINGLE, moe_layer=_moe_layer())
    assert not any(isinstance(m, Fp8Meta) for m in bf16_layer.modules())
    # Precision-independent checkpoints: FP8 state is not in the state dict.
    assert layer.state_dict().keys() == bf16_layer.state_dict().keys()
    bf16_layer.load_state_dict(layer.state_dict())
    layer.load_state_dict(bf16_layer.state_dict())


def _moe_layer():
    from moecore.moe import MoELayer  # noqa: PLC0415 - tests may import lazily
    return MoELayer


def test_fp8_moe_layer_runs_and_tracks_bf16():
    torch.manual_seed(0)
    cfg = _layer_cfg(num_layers=1, moe_layer_freq=1)
    ref_cfg = cfg.replace(fp8=None)
    x = torch.randn(64, 2, 128)
    outs = []
    for c in (cfg, ref_cfg):
        torch.manual_seed(1)
        layer = TransformerLayer(c, 1, parallel_state=SINGLE, moe_layer=_moe_layer())
        xr = x.clone().requires_grad_()
        out = layer(xr)[0]
        out.sum().backward()
        outs.append((out, xr.grad, layer.mlp.experts.weight1.grad))
    for got, ref in zip(outs[0], outs[1]):
        _close(got, ref, 0.1)


def test_fp8_needs_grouped_experts_and_checks_sizes():
    with pytest.raises(ValueError, match="moe_grouped_gemm"):
        _layer_cfg(moe_grouped_gemm=False)
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                            ffn_hidden_size=128, fp8="e4m3", fp8_recipe="blockwise",
                            fp8_gemm_backend="emulated")
    with pytest.raises(ValueError, match="multiples of 128"):
        ColumnParallelLinear(64, 128, config=cfg, parallel_state=SINGLE).enable_fp8(
            Fp8Recipe.from_config(cfg))
    RowParallelLinear(128, 128, config=cfg, parallel_state=SINGLE).enable_fp8(
        Fp8Recipe.from_config(cfg))


def test_grouped_mlp_fp8_with_empty_experts():
    cfg = _layer_cfg(num_layers=1, moe_layer_freq=1, fp8_recipe="blockwise")
    torch.manual_seed(0)
    mlp = GroupedMLP(4, cfg, parallel_state=SINGLE)
    mlp.enable_fp8(Fp8Recipe.from_config(cfg))
    x = torch.randn(40, 128, requires_grad=True)
    out, _ = mlp(x, torch.tensor([0, 40, 0, 0]))
    out.sum().backward()
    assert out.shape == (40, 128) and mlp.weight1.grad[0].abs().sum() == 0
    assert mlp.weight1.grad[1].abs().sum() > 0


# ---- backends, flags, start-up refusal -----------------------------------------------------------
def test_torch_backend_refused_on_cpu_with_reason():
    with pytest.raises(BackendUnavailableError, match="compute capability >= 8.9"):
        select_fp8_gemm("torch", "cpu", "blockwise", log=False)
    with pytest.raises(BackendUnavailableError):
        select_fp8_gemm("auto", "cpu", "tensorwise", log=False)  # auto never picks emulated
    assert select_fp8_gemm("emulated", "cpu", log=False).name == "emulated"


def test_fp8_flags(capsys):
    from moecore.arguments import parse_args  # noqa: PLC0415
    from moecore.arguments.config_flags import transformer_config_from_args  # noqa: PLC0415

    fp8 = ["--fp8-format", "hybrid", "--fp8-recipe", "blockwise"]
    err = parse_error(BASE + fp8, capsys)
    assert "--fp8-format hybrid --fp8-recipe blockwise cannot run on --device cpu" in err
    assert "compute capability >= 8.9" in err and len(err.strip().splitlines()[-1]) > 0
    args = parse_args(BASE + fp8 + ["--fp8-gemm-backend", "emulated", "--fp8-margin", "1",
                                    "--fp8-amax-history-len", "16", "--fp8-amax-compute-algo",
                                    "max", "--first-last-layers-bf16",
                                    "--num-layers-at-end-in-bf16", "0"])
    cfg = transformer_config_from_args(args)
    assert (cfg.fp8, cfg.fp8_recipe, cfg.fp8_margin, cfg.fp8_amax_history_len) == (
        "hybrid", "blockwise", 1, 16)
    assert cfg.first_last_layers_bf16 and cfg.num_layers_at_end_in_bf16 == 0
    assert "invalid choice" in parse_error(BASE + ["--fp8-recipe", "mxfp8"], capsys)


def test_fp8_triton_kernels_under_interpreter():
    assert_checks_pass("tests.unit.fp8_cast_checks",
                       ("self_check", "shapes_and_groups", "transposes",
                        "cast_and_transpose", "tiles_along_rows", "fused_swiglu_experts",
                        "block_gemm", "blockwise_experts_on_triton"))


def test_group_row_map_pads_each_group_to_16_rows():
    rows, ends = group_row_map(torch.tensor([3, 0, 17]), 20, "cpu")
    # each group starts at a multiple of 16 and spans >= 16 rows (the empty expert too);
    # P = 16 * (ceil(20 / 16) + 3) is known without a host sync
    assert ends.tolist() == [16, 32, 64] and rows.shape == (80,)
    assert rows[:3].tolist() == [0, 1, 2] and rows[32:49].tolist() == list(range(3, 20))
    assert (rows[3:32] == -1).all() and (rows[49:] == -1).all()


def test_transpose_with_a_row_map_regroups_and_zero_fills():
    x = (torch.randn(20, 4) * 10).to(E4)
    q = Fp8Tensor(x, torch.tensor(0.5), "tensor")
    rows, ends = group_row_map(torch.tensor([3, 0, 17]), 20, "cpu")
    t = transpose(q, rows)
    assert t.shape == (4, 80) and t.data.is_contiguous() and t.scale_inv.item() == 0.5
    cols = t.data.float().t()
    assert torch.equal(cols[:3], x[:3].float()) and torch.equal(cols[32:49], x[3:].float())
    assert cols[3:32].abs().sum() == 0 and cols[49:].abs().sum() == 0
    assert padded_row_map(20, 16, "cpu").tolist() == list(range(20)) + [-1] * 12


def test_emulated_grouped_wgrad_on_regrouped_operands():
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 0, 17])
    x, dy = torch.randn(20, 8, generator=g), torch.randn(20, 6, generator=g)
    qx, qdy = (quantize_tensor(t, torch.tensor(448.0) / t.abs().amax(), E4) for t in (x, dy))
    rows, ends = group_row_map(counts, 20, "cpu")
    got = EMULATED.grouped_wgrad(transpose(qx, rows), transpose(qdy, rows), ends, torch.float32)
    xs, dys = (torch.split(dequantize(t), counts.tolist()) for t in (qx, qdy))
    ref = torch.stack([a.t() @ b for a, b in zip(xs, dys)])
    assert got.shape == (3, 8, 6) and got[1].abs().sum() == 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_k_padding_for_block_scales_adds_nothing():
    from moecore.kernels.fp8_gemm import _pad_k  # noqa: PLC0415 - the torch path's helper

    g = torch.Generator().manual_seed(5)
    a = quantize_tiles(torch.randn(40, 384, generator=g), E4)
    b = quantize_blocks(torch.randn(256, 384, generator=g), E4)
    pa, pb = _pad_k(a, 4), _pad_k(b, 4)
    assert pa.data.shape == (40, 512) and pb.scale_inv.shape == (2, 4)
    assert torch.equal(EMULATED.mm(pa, pb, torch.float32), EMULATED.mm(a, b, torch.float32))


# ---- --no-fp8-wgrad and the per-step weight cache ---------------------------------------------
@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_no_fp8_wgrad_keeps_weight_gradients_exact(recipe):
    g = torch.Generator().manual_seed(4)
    counts = torch.tensor([70, 0, 150, 36])
    x, dy = torch.randn(256, 128, generator=g), torch.randn(256, 256, generator=g)
    w = torch.randn(4, 128, 256, generator=g) * 0.1
    wr, xr = w.clone().requires_grad_(), x.clone().requires_grad_()
    fp8_grouped_mm(xr, wr, counts, Fp8Meta(_recipe(recipe, wgrad=False), num_weights=4,
                                           grouped=True)).backward(dy)
    ref = torch.stack([a.t() @ b for a, b in zip(x.split(counts.tolist()),
                                                  dy.split(counts.tolist()))])
    torch.testing.assert_close(wr.grad, ref, rtol=1e-5, atol=1e-5)  # no FP8 rounding
    x2, w2 = torch.randn(40, 128, generator=g), torch.randn(256, 128, generator=g)
    dy2 = torch.randn(40, 256, generator=g)
    w2r, x2r = w2.clone().requires_grad_(), x2.clone().requires_grad_()
    fp8_linear(x2r, w2r, None, Fp8Meta(_recipe(recipe, wgrad=False))).backward(dy2)
    torch.testing.assert_close(w2r.grad, dy2.t() @ x2, rtol=1e-5, atol=1e-5)
    assert not torch.equal(x2r.grad, dy2 @ w2)  # dgrad still in FP8


def test_no_fp8_wgrad_flag():
    from moecore.arguments import parse_args  # noqa: PLC0415
    from moecore.arguments.config_flags import transformer_config_from_args  # noqa: PLC0415

    args = parse_args(BASE + ["--fp8-format", "hybrid", "--fp8-gemm-backend", "emulated",
                              "--no-fp8-wgrad"])
    assert transformer_config_from_args(args).fp8_wgrad is False
    assert Fp8Recipe.from_config(transformer_config_from_args(args)).wgrad is False
    assert parse_args(BASE).fp8_wgrad is True


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_weight_cache_quantises_once_per_step(recipe, monkeypatch):
    from moecore.fp8.scaling import WeightCache  # noqa: PLC0415

    meta = Fp8Meta(_recipe(recipe))
    calls = []
    real = meta.quantize
    monkeypatch.setattr(meta, "quantize", lambda role, t: calls.append(role) or real(role, t))
    w = torch.randn(256, 128)
    x = torch.randn(32, 128)
    try:
        WeightCache.enable()
        out1 = fp8_linear(x, w, None, meta)
        out2 = fp8_linear(x, w, None, meta)
        cached = 1 if recipe == "tensorwise" else 2  # delayed: the scale follows the history
        assert calls.count("weight") == cached
        with torch.no_grad():
            w.mul_(2)  # an in-place change seen by the version counter
        fp8_linear(x, w, None, meta)
        assert calls.count("weight") == cached + 1
        WeightCache.weights_changed()  # the optimizer stepped (through another view)
        fp8_linear(x, w, None, meta)
        assert calls.count("weight") == cached + 2
        if recipe == "tensorwise":
            assert torch.equal(out1, out2)
        WeightCache.enable(False)
        fp8_linear(x, w, None, meta)
        fp8_linear(x, w, None, meta)
        assert calls.count("weight") == cached + 4  # off: every call quantises
    finally:
        WeightCache.enable(False)
