"""Embedding kernel module: the ``embedding`` registry and its selection (the config's
``embedding_backend``, ``--embedding-backend``, errors) on CPU, the torch path against
hand-written loops and bit for bit ``F.embedding`` (also through ``VocabParallelEmbedding``),
and the Triton backward under the interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecore.backends import BackendUnavailableError
from moecore.config import TransformerConfig
from moecore.kernels import embedding as E
from moecore.parallel_state import ParallelState
from moecore.tensor_parallel import VocabParallelEmbedding
from tests.triton_interpret import assert_checks_pass


@pytest.fixture(autouse=True)
def _fresh_choice():
    """Each test resolves its requests afresh."""
    E.EMBEDDING.clear_cache()
    yield
    E.EMBEDDING.clear_cache()


def _config(**kw):
    return TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1,
                             ffn_hidden_size=8, init_method_std=0.3, **kw)


def _vocab_embedding(**kw):
    return VocabParallelEmbedding(3, 4, config=_config(**kw), parallel_state=ParallelState.single())


def _lookup_and_grad(fn, ids, weight, probe):
    w = weight.clone().requires_grad_()
    out = fn(ids, w)
    out.backward(probe)
    return out, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(4, 9), (9, 4), (13,), (0, 3), ()])
def test_torch_path_is_f_embedding_bitwise(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 24, generator=gen).to(dtype)
    ids = torch.randint(0, 20, shape, generator=gen)
    probe = torch.randn(*shape, 24, generator=gen).to(dtype)
    assert E.select_embedding(weight.device, dtype).name == "torch"  # auto on CPU
    want = _lookup_and_grad(F.embedding, ids, weight, probe)
    _check_against_loops(ids, weight, probe, *want)
    for fn in (E.embedding, E.embedding_torch,
               lambda i, w: E.embedding(i, w, backend="torch")):
        for a, b in zip(_lookup_and_grad(fn, ids, weight, probe), want):
            assert torch.equal(a, b)


def _check_against_loops(ids, weight, probe, out, grad):
    """``out`` and ``grad`` of a lookup against hand-written loops: each output row is its
    table row bit for bit; each table row's gradient is the float64 sum of the probe rows of
    its ids, to the error bound of summing ``c`` terms in the table's dtype
    (``(c + 1) * eps * sum |terms|``, c the id's count)."""
    flat_ids, flat_probe = ids.reshape(-1).tolist(), probe.reshape(-1, weight.shape[1])
    for i, v in enumerate(flat_ids):
        assert torch.equal(out.reshape(-1, weight.shape[1])[i], weight[v])
    want = torch.zeros(weight.shape, dtype=torch.float64)
    mass = torch.zeros(weight.shape, dtype=torch.float64)
    count = [0] * weight.shape[0]
    for i, v in enumerate(flat_ids):
        want[v] += flat_probe[i].double()
        mass[v] += flat_probe[i].double().abs()
        count[v] += 1
    eps = torch.finfo(weight.dtype).eps
    for v in range(weight.shape[0]):
        err = (grad[v].double() - want[v]).abs()
        assert (err <= (count[v] + 1) * eps * mass[v]).all(), (v, count[v], err.max())
        if count[v] == 0:
            assert not grad[v].any()


def test_vocab_parallel_embedding_cpu_is_f_embedding_bitwise():
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=4,
                            ffn_hidden_size=32, init_method_std=0.3, params_dtype=torch.bfloat16)
    emb = VocabParallelEmbedding(64, 16, config=cfg, parallel_state=ParallelState.single())
    ids = torch.randint(0, 64, (3, 11))
    probe = torch.randn(3, 11, 16).bfloat16()
    emb(ids).backward(probe)
    got = emb.weight.grad
    want = _lookup_and_grad(F.embedding, ids, emb.weight.detach(), probe)
    _check_against_loops(ids, emb.weight.detach(), probe, emb(ids).detach(), got)
    assert torch.equal(emb(ids), want[0]) and torch.equal(got, want[1])


def test_registry_and_selection_on_cpu():
    assert E.EMBEDDING.names() == ["triton", "torch"]
    assert E.EMBEDDING.op == "embedding"
    cpu = torch.device("cpu")
    assert E.select_embedding(cpu, torch.float32).name == "torch"
    assert E.select_embedding(cpu, torch.float32) is E.select_embedding(cpu, torch.float32)
    ok, why = E.triton_available(cpu, torch.float32)
    assert not ok and "CUDA tensors only" in why and "--embedding-backend torch" in why
    ok, why = E.triton_available(torch.device("cuda"), torch.float64)
    assert not ok and ("float64" in why or "not installed" in why)
    with pytest.raises(ValueError, match="unknown embedding backend 'fast'"):
        E.embedding(torch.zeros(2, dtype=torch.long), torch.ones(3, 4), backend="fast")


def test_requested_triton_on_cpu_raises_naming_the_fix():
    ids, weight = torch.zeros(2, dtype=torch.long), torch.ones(3, 4)
    with pytest.raises(BackendUnavailableError, match=r"embedding backend 'triton' \(set by "
                                                      r"--embedding-backend\) is not "
                                                      r"available: .*CUDA tensors only.*"
                                                      r"--embedding-backend torch or auto"):
        E.embedding(ids, weight, backend="triton")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors only"):
        _vocab_embedding(embedding_backend="triton")(ids)
    emb = _vocab_embedding(embedding_backend="torch")
    assert torch.equal(emb(ids), F.embedding(ids, emb.weight))


@pytest.mark.parametrize("value,expect", [("torch", "torch"), ("auto", "torch"),
                                          ("triton", BackendUnavailableError)])
def test_config_field_chooses_the_backend(value, expect):
    ids = torch.zeros(2, dtype=torch.long)
    emb = _vocab_embedding(embedding_backend=value)
    assert emb.backend == value
    if isinstance(expect, str):
        assert E.select_embedding(emb.weight.device, emb.weight.dtype, emb.backend).name == expect
        assert torch.equal(emb(ids), F.embedding(ids, emb.weight))
        return
    with pytest.raises(expect, match="CUDA tensors only"):
        emb(ids)


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"embedding_backend='apex' is not supported; "
                                         r"choose one of \['auto', 'triton', 'torch'\]"):
        _config(embedding_backend="apex")


def test_backward_argument_errors():
    grad = torch.zeros(3, 4, 8)
    with pytest.raises(ValueError, match=r"grad \[\.\.\., H\] over ids"):
        E.embedding_backward_triton(grad, torch.zeros(4, 3, dtype=torch.long), 5)
    # empty ids need no kernel: zeros of the table's shape
    out = E.embedding_backward_triton(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), 5)
    assert out.shape == (5, 8) and not out.any()


CHECKS = ("kernels", "determinism", "autograd", "vocab_parallel")


def test_triton_kernels_under_interpreter():
    assert_checks_pass("tests.unit.embedding_checks", CHECKS)
