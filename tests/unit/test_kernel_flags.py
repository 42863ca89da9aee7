"""Kernel choices: each flag reaches its config field and registry, an unavailable explicit
request raises ``BackendUnavailableError`` naming its flag, the chosen backends are recorded once
per op, and no library module reads a ``MOECORE_*`` environment variable."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from moecore import backends
from moecore.arguments import parse_args, transformer_config_from_args
from moecore.backends import BackendUnavailableError
from moecore.kernels import cross_entropy as CE
from moecore.kernels import embedding as E
from moecore.kernels import norm as N
from moecore.kernels import rope as R
from moecore.models.gpt import GPTModel
from moecore.optimizer import OptimizerConfig, get_megatron_optimizer
from moecore.optimizer import optimizer as opt_mod
from moecore.parallel_state import ParallelState
from moecore.tensor_parallel import cross_entropy as tp_ce
from moecore.tensor_parallel.random import model_parallel_seed
from moecore.transformer import LayerNorm, RMSNorm
from moecore.transformer import rope as layer_rope
from tests.cli import BASE

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(*flags):
    return transformer_config_from_args(parse_args([*BASE, *flags]))


def _model(cfg):
    model_parallel_seed(1234)  # dropout draws from the tensor-parallel RNG stream
    return GPTModel(cfg, vocab_size=100, max_sequence_length=32,
                    parallel_state=ParallelState.single())


def _loss(model):
    ids = torch.randint(0, 100, (2, 8))
    return model(ids, labels=ids)


@pytest.fixture(autouse=True)
def _fresh_resolutions():
    for reg in (CE.CROSS_ENTROPY, E.EMBEDDING, N.RMS_NORM_BACKENDS, N.LAYER_NORM_BACKENDS,
                R.ROPE):
        reg.clear_cache()
    yield


@pytest.mark.parametrize("flags,field,value", [
    ((), "cross_entropy_loss_fusion", None),
    (("--cross-entropy-loss-fusion",), "cross_entropy_loss_fusion", True),
    (("--no-cross-entropy-loss-fusion",), "cross_entropy_loss_fusion", False),
    ((), "norm_backend", "auto"),
    (("--norm-backend", "apex"), "norm_backend", "apex"),
    (("--embedding-backend", "torch"), "embedding_backend", "torch"),
    (("--moe-peer-copy-backend", "triton"), "moe_peer_copy_backend", "triton"),
    (("--no-rope-fusion",), "apply_rope_fusion", False),
])
def test_flags_reach_their_config_fields(flags, field, value):
    assert getattr(_config(*flags), field) == value


def test_cross_entropy_flag_reaches_the_registry(monkeypatch):
    requests = []
    real = tp_ce.select_cross_entropy
    monkeypatch.setattr(tp_ce, "select_cross_entropy",
                        lambda logits, requested: requests.append(requested) or real(
                            logits, requested))
    for flag, want in (("--no-cross-entropy-loss-fusion", "torch"), (None, "auto")):
        loss = _loss(_model(_config(*([flag] if flag else []))))
        assert requests[-1] == want
        assert "Fused" not in type(loss.grad_fn).__name__  # CPU: the reference either way
    with pytest.raises(BackendUnavailableError, match=r"cross_entropy backend 'triton' \(set by "
                                                      r"--cross-entropy-loss-fusion\)"):
        _loss(_model(_config("--cross-entropy-loss-fusion")))


def test_norm_and_embedding_flags_reach_the_modules():
    model = _model(_config("--norm-backend", "torch", "--embedding-backend", "torch"))
    assert model.embedding.word_embeddings.backend == "torch"
    norms = [m for m in model.modules() if isinstance(m, (LayerNorm, RMSNorm))]
    assert norms and all(m.backend == "torch" for m in norms)
    _loss(model)
    with pytest.raises(BackendUnavailableError, match=r"\(set by --norm-backend\)"):
        _loss(_model(_config("--norm-backend", "triton", "--normalization", "RMSNorm")))
    with pytest.raises(BackendUnavailableError, match=r"\(set by --embedding-backend\)"):
        _loss(_model(_config("--embedding-backend", "triton")))


def test_rope_fusion_flag_reaches_the_registry():
    assert layer_rope.rope_request(_config("--no-rope-fusion").apply_rope_fusion) == "torch"
    assert layer_rope.rope_request(_config().apply_rope_fusion) == "auto"
    t, freqs = torch.randn(4, 2, 3, 8), torch.randn(4, 1, 1, 8)
    assert R.select_rope(t, freqs, "auto").name == "torch"  # CPU
    with pytest.raises(BackendUnavailableError, match=r"\(set by --no-rope-fusion\)"):
        R.select_rope(t, freqs, "triton")


def test_adamw_flag_reaches_the_optimizer():
    model = torch.nn.Linear(4, 4)
    for name, check in (("torch", lambda o: not opt_mod.is_fused(o)),
                        ("triton", lambda o: isinstance(o, opt_mod.TritonAdamW))):
        args = parse_args([*BASE, "--adamw-backend", name])
        opt = get_megatron_optimizer(model, OptimizerConfig.from_args(args),
                                     parallel_state=ParallelState.single())
        assert check(opt.optimizer), name
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--adamw-backend", "apex"])


def test_flag_choices_are_the_registry_backends():
    from moecore.config import GROUPED_GEMM_BACKENDS, KERNEL_BACKENDS, NORM_BACKENDS
    from moecore.kernels.grouped_gemm import GROUPED_GEMM
    from moecore.kernels.optim import ADAMW, ADAMW_BACKENDS
    from moecore.kernels.peer_copy import PEER_COPY

    for choices, registry in ((NORM_BACKENDS, N.RMS_NORM_BACKENDS),
                              (KERNEL_BACKENDS, E.EMBEDDING), (KERNEL_BACKENDS, PEER_COPY),
                              (GROUPED_GEMM_BACKENDS, GROUPED_GEMM), (ADAMW_BACKENDS, ADAMW)):
        assert set(choices) == {"auto", *registry.names()}, registry.op
        assert registry.flag.startswith("--"), registry.op


def test_chosen_records_each_op_once(monkeypatch):
    monkeypatch.setattr(backends, "_LOGGED", {})
    N.RMS_NORM_BACKENDS.select("auto", device="cpu")
    N.RMS_NORM_BACKENDS.select("torch", device="cpu")
    E.EMBEDDING.select("auto", device=torch.device("cpu"))
    backends.log_choice("toy", "a", "auto", {})
    backends.log_choice("toy", "b", "auto", {})
    assert backends.chosen() == {"rms_norm": "torch", "embedding": "torch", "toy": "a,b"}


def test_no_library_module_reads_moecore_environment_variables():
    pattern = re.compile(r"MOECORE_[A-Z_]+")
    readers = [str(p.relative_to(ROOT)) for p in (ROOT / "moecore").rglob("*.py")
               if pattern.search(p.read_text())]
    assert readers == [], f"library modules naming MOECORE_* variables: {readers}"
