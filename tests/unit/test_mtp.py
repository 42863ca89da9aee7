"""Multi-token prediction: the loss and gradients against a reference written from the formula,
the layer kind, flags and errors, the training loop's separate log, and a checkpoint round trip.

The reference recomputes every MTP step by hand from the model's parameters: shift the tokens,
labels and loss mask by slicing, RMSNorm by its formula, concatenate, project with ``eh_proj``'s
weight, run the depth's transformer layer, final RMSNorm, the output head as a matmul with the
head weight, cross entropy, mask and average; ``lm + factor / D * sum_k mtp_k``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moecore.config import TransformerConfig
from moecore.models import GPTModel
from moecore.models.mtp import MTP_LOSS_NAME
from moecore.moe.losses import MoEAuxLossAutoScaler, MoELossTracker
from moecore.parallel_state import ParallelState
from tests.cli import BASE, parse_error

V, S, B = 48, 12, 3


def _model(tied: bool, moe: bool, depths: int = 2, **kw) -> GPTModel:
    torch.manual_seed(7)
    extra = dict(num_moe_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2,
                 moe_layer_freq=[0, 1]) if moe else {}
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            ffn_hidden_size=48, mtp_num_layers=depths,
                            mtp_loss_scaling_factor=0.3, init_method_std=0.1, **extra, **kw)
    return GPTModel(cfg, vocab_size=V, max_sequence_length=S,
                    share_embeddings_and_output_weights=tied,
                    parallel_state=ParallelState.single())


def _data():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.25).float()
    return tokens, labels, mask


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _shift(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t [B, S]`` moved ``k`` places left, zeros after the end."""
    out = torch.zeros_like(t)
    out[:, :S - k] = t[:, k:]
    return out


def _masked_ce(hidden, head_w, labels, mask):
    logits = hidden.transpose(0, 1) @ head_w.t()  # [B, S, V]
    ce = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none")
    return (ce.view(B, S) * mask).sum() / mask.sum().clamp(min=1.0)


def _reference(model: GPTModel, tokens, labels, mask):
    """``(lm loss, [mtp loss per depth], total objective)`` from the formula."""
    cfg = model.config
    eps = cfg.layernorm_epsilon
    rotary = model.rotary_pos_emb(S, None)
    word = model.embedding.word_embeddings.weight
    head_w = word if model.share_embeddings_and_output_weights else model.output_layer.weight
    h = model.decoder(model.embedding(tokens), None, rotary)  # [S, B, H], after the final norm
    lm = _masked_ce(h, head_w, labels, mask)
    mtp = []
    for k, layer in enumerate(model.mtp.layers, start=1):
        emb = F.embedding(_shift(tokens, k), word).transpose(0, 1)  # [S, B, H]
        x = torch.cat([_rms(emb, layer.enorm.weight, eps), _rms(h, layer.hnorm.weight, eps)], -1)
        x = x @ layer.eh_proj.weight.t()
        x = layer.transformer_layer(x, None, rotary)
        h = _rms(x, layer.final_layernorm.weight, eps)
        mtp.append(_masked_ce(h, head_w, _shift(labels, k), _shift(mask, k)))
    total = lm + cfg.mtp_loss_scaling_factor / len(mtp) * sum(mtp)
    return lm, mtp, total


@pytest.mark.parametrize("tied,moe", [(True, False), (False, True)], ids=["tied_dense",
                                                                         "untied_moe"])
def test_mtp_loss_and_grads_match_hand_written_reference(tied, moe):
    model = _model(tied, moe)
    ref = copy.deepcopy(model)
    tokens, labels, mask = _data()
    MoEAuxLossAutoScaler.set_loss_scale(1.0)
    MoELossTracker.clear()
    model.train()
    out = model(tokens, labels=labels, loss_mask=mask)
    lm = (out * mask).sum() / mask.sum()
    lm.backward()
    mtp_logged = MoELossTracker.values()[MTP_LOSS_NAME]
    MoELossTracker.clear()

    ref_lm, ref_mtp, total = _reference(ref, tokens, labels, mask)
    total.backward()
    MoELossTracker.clear()
    torch.testing.assert_close(lm, ref_lm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mtp_logged, torch.stack(ref_mtp).detach(), rtol=1e-5, atol=1e-6)
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("mtp.layers.1.eh_proj") for n in names)
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        assert p.grad is not None and want is not None, name
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=name)
    # The MTP loss moves the gradients: without it they differ (the test can fail).
    assert not torch.allclose(model.mtp.layers[0].eh_proj.weight.grad, torch.zeros(1))
    ref.zero_grad()
    _reference(ref, tokens, labels, mask)[0].backward()
    word = "embedding.word_embeddings.weight"
    assert not torch.allclose(ref_params[word].grad, dict(model.named_parameters())[word].grad)


def test_mtp_mask_ends_each_depth_and_eval_logs_nothing():
    model = _model(tied=True, moe=False, depths=3)
    tokens, labels, _ = _data()
    mask = torch.zeros(B, S)
    mask[:, :S - 2] = 1.0  # depth 3 sees labels only where the shifted mask is 1
    MoELossTracker.clear()
    model.eval()
    with torch.no_grad():
        model(tokens, labels=labels, loss_mask=mask)
    assert MTP_LOSS_NAME not in MoELossTracker.values()
    model.train()
    with torch.no_grad():
        model(tokens, labels=labels, loss_mask=mask)
    logged = MoELossTracker.values()[MTP_LOSS_NAME]
    MoELossTracker.clear()
    _, ref_mtp, _ = _reference(model, tokens, labels, mask)
    torch.testing.assert_close(logged, torch.stack(ref_mtp), rtol=1e-5, atol=1e-6)
    # Logits (no labels) are the plain model's: MTP only adds losses.
    plain = copy.deepcopy(model)
    plain.mtp = None
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain(tokens))


def test_mtp_layer_kind_follows_the_last_layer_and_logs_own_router_slot():
    model = _model(tied=False, moe=True)
    layers = [m.transformer_layer for m in model.mtp.layers]
    assert all(layer.is_moe for layer in layers)
    assert [layer.mlp.router.layer_number for layer in layers] == [3, 4]
    dense_last = _model(tied=False, moe=True, depths=1).config.replace(moe_layer_freq=[1, 0])
    m = GPTModel(dense_last, vocab_size=V, max_sequence_length=S,
                 parallel_state=ParallelState.single())
    assert not m.mtp.layers[0].transformer_layer.is_moe


def test_per_token_mode_scales_mtp_by_lm_tokens():
    model = _model(tied=True, moe=False, calculate_per_token_loss=True)
    ref = copy.deepcopy(model)
    tokens, labels, mask = _data()
    MoEAuxLossAutoScaler.set_loss_scale(1.0)
    out = model(tokens, labels=labels, loss_mask=mask)
    (out * mask).sum().backward()
    MoELossTracker.clear()
    ref_lm, ref_mtp, _ = _reference(ref, tokens, labels, mask)
    n = mask.sum()
    (n * (ref_lm + 0.3 / 2 * sum(ref_mtp))).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_mtp_flags_name_the_flag(capsys):
    from moecore.arguments import parse_args
    from moecore.training import builders
    from moecore.training.builders import build_model

    for bad in ("0", "-1"):
        err = parse_error(BASE + ["--mtp-num-layers", bad], capsys).strip().splitlines()[-1]
        assert err.endswith(f"error: --mtp-num-layers {bad} must be >= 1; omit the flag for no "
                            "multi-token prediction"), err
    err = parse_error(BASE + ["--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "-0.5"],
                      capsys)
    assert "error: --mtp-loss-scaling-factor -0.5 must be >= 0" in err
    with pytest.raises(ValueError, match="mtp_num_layers=0 must be >= 1"):
        TransformerConfig(mtp_num_layers=0)
    args = parse_args(BASE + ["--mtp-num-layers", "1"])
    builders.build_tokenizer_from_args(args)

    def provider(config, args, ps):
        return torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"^--mtp-num-layers 1: the model \(Linear\) has no "):
        build_model(args, ParallelState.single(), provider)


def test_training_logs_mtp_loss_apart_and_checkpoint_keeps_mtp(tmp_path):
    from moecore.arguments import parse_args
    from moecore.checkpointing import CheckpointConfig, load_checkpoint
    from moecore.training import pretrain
    from moecore.training.loop import _build

    plain = BASE + ["--train-iters", "2", "--lr-decay-iters", "4", "--eval-iters", "0",
                    "--log-interval", "1", "--num-experts", "4", "--disable-bias-linear",
                    "--moe-aux-loss-coeff", "1e-2", "--save", str(tmp_path), "--save-interval",
                    "2", "--num-workers", "0"]
    argv = plain + ["--mtp-num-layers", "2"]
    lines = []
    out = pretrain(argv, log=lines.append)
    train_lines = [line for line in lines if "iteration" in line and "lm loss" in line]
    assert len(train_lines) == 2
    for line, moe in zip(train_lines, out["moe_losses"]):
        assert "| mtp_1 loss: " in line and "| mtp_2 loss: " in line, line
        assert {"mtp_1 loss", "mtp_2 loss", "load_balancing_loss"} <= set(moe)
        # Losses two and three tokens ahead of a random model: near log(V), not the LM loss.
        assert 3.0 < moe["mtp_1 loss"] < 6.0 and 3.0 < moe["mtp_2 loss"] < 6.0
    assert all(a != b["mtp_1 loss"] for a, b in zip(out["lm_loss"], out["moe_losses"]))

    saved = torch.load(next(tmp_path.glob("iter_0000002/*/model_optim_rng.pt")),
                       weights_only=False)["model"]
    assert "mtp.layers.1.eh_proj.weight" in saved
    assert sum(k.startswith("mtp.layers.1.transformer_layer.") for k in saved) > 5
    args = parse_args(argv + ["--load", str(tmp_path)])
    _, model, optimizer, scheduler = _build(args, ParallelState.single(), None)
    fresh = {k: v.clone() for k, v in model[0].state_dict().items()}
    load_checkpoint(model, optimizer, scheduler, CheckpointConfig.from_args(args),
                    ParallelState.single())
    for k, v in model[0].state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert not torch.equal(fresh["mtp.layers.0.eh_proj.weight"],
                           saved["mtp.layers.0.eh_proj.weight"])  # the load did something
    resumed = pretrain(argv + ["--train-iters", "3", "--load", str(tmp_path), "--save", ""],
                       log=lambda s: None)
    assert resumed["start_iteration"] == 2 and len(resumed["lm_loss"]) == 1
    # A model without MTP cannot take the checkpoint: it holds parameters that model lacks.
    with pytest.raises(Exception, match="mtp"):
        pretrain(plain + ["--train-iters", "3", "--load", str(tmp_path), "--save", ""],
                 log=lambda s: None)
