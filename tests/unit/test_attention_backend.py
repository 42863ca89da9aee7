"""``--attention-backend``: flag -> config -> the ``attention`` registry -> the SDPA kernel
``core_attention`` pins."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from moecore.arguments import parse_args, transformer_config_from_args
from moecore.config import TransformerConfig
from moecore.kernels import attention as A

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--micro-batch-size 2 --lr 1e-3 --train-iters 10 --mock-data --vocab-size 100 "
        "--device cpu").split()


def test_flag_reaches_the_config_and_defaults_to_auto():
    assert transformer_config_from_args(parse_args(BASE)).attention_backend == "auto"
    args = parse_args(BASE + ["--attention-backend", "unfused"])
    assert transformer_config_from_args(args).attention_backend == "unfused"


@pytest.mark.parametrize("backend", ["flash", "fused"])
def test_gpu_only_backends_are_refused_on_cpu(backend, capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--attention-backend", backend])
    err = capsys.readouterr().err
    assert f"--attention-backend {backend} needs a CUDA GPU" in err and "auto or unfused" in err


def test_unknown_backend_is_refused():
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--attention-backend", "xformers"])
    with pytest.raises(ValueError, match="attention_backend"):
        TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                          attention_backend="sdpa")


def _qkv(seed=0, s=7, b=2, nh=4, ng=2, d=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, nh, d, generator=g)
    k, v = (torch.randn(s, b, ng, d, generator=g) for _ in range(2))
    return q, k, v


def test_unfused_pins_the_math_kernel_and_matches_auto(monkeypatch):
    q, k, v = _qkv()
    auto = A.core_attention(q, k, v)
    seen = []
    real = A.sdpa_kernel

    def spy(backends):
        seen.append(list(backends))
        return real(backends)

    monkeypatch.setattr(A, "sdpa_kernel", spy)
    for name in ("unfused", "local"):
        out = A.core_attention(q, k, v, backend=name)
        torch.testing.assert_close(out, auto, rtol=1e-5, atol=1e-5)
    assert seen == [[SDPBackend.MATH], [SDPBackend.MATH]]
    A.core_attention(q, k, v)  # auto: no pinning
    assert len(seen) == 2


def test_a_kernel_that_cannot_run_names_the_flag():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="--attention-backend fused cannot run this attention"):
        A.core_attention(q, k, v, backend="fused")  # cuDNN attention has no CPU kernel


def test_the_registry_offers_the_flag_choices_and_auto_is_pytorchs_pick():
    from moecore.config import ATTENTION_BACKENDS

    assert set(A.ATTENTION.names()) == {"sdpa", *ATTENTION_BACKENDS} - {"auto"}
    assert A.ATTENTION.select("auto", device=torch.device("cpu"), log=False).name == "sdpa"
    assert A.ATTENTION.flag == "--attention-backend"
