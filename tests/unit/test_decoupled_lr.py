"""``--decoupled-lr`` / ``--decoupled-min-lr``: the embedding and output-layer weights follow
the same schedule between their own peak and minimum."""

from __future__ import annotations

import math

import pytest

from moecore.arguments import parse_args
from moecore.config import TransformerConfig
from moecore.models import GPTModel
from moecore.optimizer import get_param_groups
from moecore.training import loop
from tests.cli import BASE, parse_error


def _model(tied: bool):
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                            ffn_hidden_size=32, vocab_size=32)
    return GPTModel(cfg, vocab_size=32, max_sequence_length=8,
                    share_embeddings_and_output_weights=tied)


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_and_output_weights_get_their_own_groups(tied):
    model = _model(tied)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["name"] for g in get_param_groups(model)] == ["decay", "no_decay"]
    groups = get_param_groups(model, decoupled_lr=0.5, decoupled_min_lr=0.05)
    assert [g["name"] for g in groups] == ["decay", "no_decay", "decay_decoupled"]
    decoupled = groups[-1]
    want = {"embedding.word_embeddings.weight"} | (set() if tied else {"output_layer.weight"})
    assert {names[id(p)] for p in decoupled["params"]} == want
    assert (decoupled["max_lr"], decoupled["min_lr"]) == (0.5, 0.05)
    assert "max_lr" not in groups[0]
    assert "min_lr" not in get_param_groups(model, decoupled_lr=0.5)[-1]  # --min-lr then


def test_schedule_runs_each_group_between_its_own_peak_and_minimum(monkeypatch):
    built = []
    real = loop.build_scheduler
    monkeypatch.setattr(loop, "build_scheduler",
                        lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    out = loop.pretrain(BASE + ["--lr", "1e-3", "--min-lr", "1e-4", "--decoupled-lr", "5e-3",
                                "--decoupled-min-lr", "2e-4", "--lr-decay-style", "cosine",
                                "--lr-warmup-iters", "2", "--train-iters", "6",
                                "--lr-decay-iters", "20",
                                "--eval-iters", "0"])
    assert len(out["lm_loss"]) == 6
    groups = built[0].optimizer.param_groups
    main = next(g for g in groups if g["name"] == "decay")
    dec = next(g for g in groups if g["name"] == "decay_decoupled")
    coeff = (main["lr"] - 1e-4) / (1e-3 - 1e-4)  # the schedule's cosine coefficient now
    assert 0.0 < coeff < 1.0
    assert math.isclose(dec["lr"], 2e-4 + coeff * (5e-3 - 2e-4), rel_tol=1e-9)
    assert math.isclose(out["lr"][-1], main["lr"], rel_tol=1e-12)  # the log shows --lr's


def test_decoupled_lr_flags(capsys):
    assert parse_args(BASE + ["--decoupled-lr", "1e-2"]).decoupled_lr == 1e-2
    assert "--decoupled-min-lr needs --decoupled-lr" in parse_error(
        BASE + ["--decoupled-min-lr", "1e-4"], capsys)
    assert "must be >= its minimum" in parse_error(
        BASE + ["--decoupled-lr", "1e-4", "--min-lr", "1e-3"], capsys)
