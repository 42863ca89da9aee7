"""Chaos: a flipped bit inside a weight of the newest checkpoint. Resuming stops with a one-line
error naming the file; with ``--ckpt-fallback-to-previous`` it resumes from the previous
checkpoint and retraces the original curve bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

from moecore.checkpointing import CorruptCheckpointError
from moecore.training import pretrain
from tests.chaos.harness import TINY

pytestmark = pytest.mark.chaos


def _flip_a_weight_bit(path: str) -> None:
    weight = torch.load(path, weights_only=True)["model"]["embedding.word_embeddings.weight"]
    with open(path, "rb") as f:
        data = bytearray(f.read())
    at = data.find(weight.numpy().tobytes())
    assert at >= 0
    data[at + 7] ^= 0x40  # the top exponent bit of a float32: a wild value, not a NaN
    with open(path, "wb") as f:
        f.write(data)


def test_corrupt_newest_checkpoint_errors_or_falls_back_when_asked(tmp_path):
    root = str(tmp_path)
    argv = TINY + ["--train-iters", "4", "--lr-decay-iters", "4", "--save", root,
                   "--save-interval", "2"]
    first = pretrain(argv, log=lambda line: None)
    shard = os.path.join(root, "iter_0000004", "mp_rank_00_000", "model_optim_rng.pt")
    _flip_a_weight_bit(shard)
    resume = argv + ["--load", root, "--train-iters", "5"]
    with pytest.raises(CorruptCheckpointError) as e:
        pretrain(resume, log=lambda line: None)
    assert str(e.value).startswith(f"checkpoint file {shard} is corrupt: its CRC32 is ")
    assert "\n" not in str(e.value) and "--ckpt-fallback-to-previous" in str(e.value)
    again = pretrain(resume + ["--ckpt-fallback-to-previous"], log=lambda line: None)
    assert again["start_iteration"] == 2 and again["iterations"] == [3, 4, 5]
    assert again["lm_loss"][:2] == first["lm_loss"][2:]  # the same curve from iteration 2
    assert again["consumed_train_samples"] == 5 * 8  # one global batch per step
