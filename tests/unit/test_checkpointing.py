"""Checkpoints: exact resume (model, fp32 main params, optimizer, scheduler, every RNG), atomic
saves under a simulated crash, clear errors for corrupt/missing files and shape mismatches,
CRC32 checksums and the fallback to the newest intact checkpoint, prompt and abort-path
``--async-save`` publishing, and the per-shard layout on 4 ranks (DP x EP)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from moecore import checkpointing as ckpt
from moecore.checkpointing import (
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    read_tracker,
    save_checkpoint,
)
from moecore.optimizer import (
    MegatronOptimizer,
    OptimizerParamScheduler,
    finalize_model_grads,
    get_param_groups,
)
from moecore.tensor_parallel.random import get_rng_tracker, model_parallel_seed
from tests.dist_harness import run_distributed


class Toy(nn.Module):
    def __init__(self, hidden=8, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(hidden, hidden, dtype=dtype)
        self.norm = nn.LayerNorm(hidden, dtype=dtype)
        self.out = nn.Linear(hidden, 4, bias=False, dtype=dtype)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.out(self.drop(self.norm(self.lin(x))))


def make(hidden=8, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Toy(hidden, dtype)
    opt = MegatronOptimizer(get_param_groups(model), lr=1e-2, weight_decay=0.1, clip_grad=1.0)
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=1e-2, min_lr=1e-3,
                                    lr_warmup_steps=8, lr_decay_steps=80, lr_decay_style="cosine",
                                    start_wd=0.1, end_wd=0.1, wd_incr_steps=80,
                                    wd_incr_style="constant")
    return model, opt, sched


def args_for(path, **kw):
    base = dict(save=str(path), load=str(path), no_save_optim=None, no_save_rng=None,
                no_load_optim=None, no_load_rng=None, finetune=False,
                exit_on_missing_checkpoint=False)
    base.update(kw)
    return CheckpointConfig(**base)


def step(model, opt, sched, hidden=8):
    """One update whose data and dropout come from every RNG a checkpoint must restore."""
    with get_rng_tracker().fork():
        shift = torch.rand(()).item()
    x = torch.randn(4, hidden, dtype=next(model.parameters()).dtype)
    x = x * random.random() + float(np.random.rand()) + shift
    loss = model(x).float().pow(2).mean()
    opt.zero_grad()
    loss.backward()
    finalize_model_grads(model)
    opt.step()
    sched.step(4)
    return loss.item()


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_continues_bit_identically(tmp_path, dtype):
    model_parallel_seed(1234)
    model, opt, sched = make(dtype=dtype)
    for _ in range(3):
        step(model, opt, sched)
    save_checkpoint(3, model, opt, sched, args_for(tmp_path),
                    {"consumed_train_samples": 12, "consumed_valid_samples": 4})
    losses = [step(model, opt, sched) for _ in range(3)]
    expected = params(model)
    f = tmp_path / "iter_0000003" / "mp_rank_00_000" / "model_optim_rng.pt"
    assert f.is_file() and read_tracker(str(tmp_path)) == 3
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"
    model_parallel_seed(999)  # scramble every RNG and start from another init
    model2, opt2, sched2 = make(dtype=dtype, seed=7)
    loaded = load_checkpoint(model2, opt2, sched2, args_for(tmp_path))
    assert loaded == {"iteration": 3, "consumed_train_samples": 12, "consumed_valid_samples": 4}
    assert sched2.num_steps == 12
    assert [step(model2, opt2, sched2) for _ in range(3)] == losses
    for k, v in params(model2).items():
        assert torch.equal(v, expected[k]), k
    if dtype == torch.bfloat16:  # the fp32 main copies came back, not re-derived from bf16
        for m1, m2 in zip(opt.main_params, opt2.main_params):
            assert m2.dtype == torch.float32 and torch.equal(m1, m2)


def test_no_load_optim_rng_and_finetune(tmp_path):
    model_parallel_seed(1)
    model, opt, sched = make(dtype=torch.bfloat16)
    step(model, opt, sched)
    save_checkpoint(1, model, opt, sched, args_for(tmp_path), {"consumed_train_samples": 4})
    after_save = torch.rand(3)
    model2, opt2, sched2 = make(dtype=torch.bfloat16, seed=5)
    torch.manual_seed(42)
    expected_rand = torch.rand(3)
    torch.manual_seed(42)
    out = load_checkpoint(model2, opt2, sched2, args_for(tmp_path, no_load_optim=True,
                                                         no_load_rng=True))
    assert out["iteration"] == 1 and sched2.num_steps == 0 and not opt2.optimizer.state
    assert torch.equal(torch.rand(3), expected_rand)  # RNG untouched
    for p, m in zip(opt2.model_params, opt2.main_params):  # mains follow the loaded model
        assert torch.equal(m, p.float())
    model3, opt3, sched3 = make(seed=6, dtype=torch.bfloat16)
    out = load_checkpoint(model3, opt3, sched3, args_for(tmp_path, finetune=True))
    assert out == {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0}
    assert torch.equal(model3.lin.weight, model.lin.weight) and sched3.num_steps == 0
    model4, opt4, sched4 = make(seed=6)
    load_checkpoint(model4, opt4, sched4, args_for(tmp_path, no_load_optim=True))
    assert torch.equal(torch.rand(3), after_save)  # RNG restored


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model_parallel_seed(2)
    model, opt, sched = make()
    step(model, opt, sched)
    save_checkpoint(1, model, opt, sched, args_for(tmp_path))
    saved = params(model)
    step(model, opt, sched)
    real_write = ckpt._write_file

    def crash(obj, path):  # half a file on disk, then the process "dies"
        real_write(obj, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(ckpt, "_write_file", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(2, model, opt, sched, args_for(tmp_path))
    assert read_tracker(str(tmp_path)) == 1 and not (tmp_path / "iter_0000002").exists()
    monkeypatch.setattr(ckpt, "_write_file", real_write)

    def crash_tracker(root, iteration):
        raise OSError("simulated crash before the tracker update")

    monkeypatch.setattr(ckpt, "_replace_tracker", crash_tracker)
    with pytest.raises(OSError, match="before the tracker"):
        save_checkpoint(2, model, opt, sched, args_for(tmp_path))
    assert read_tracker(str(tmp_path)) == 1
    monkeypatch.undo()
    model2, opt2, sched2 = make(seed=3)
    assert load_checkpoint(model2, opt2, sched2, args_for(tmp_path))["iteration"] == 1
    assert all(torch.equal(v, saved[k]) for k, v in params(model2).items())
    save_checkpoint(2, model, opt, sched, args_for(tmp_path))  # recovers: stale dirs replaced
    assert read_tracker(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000002",
                                            "latest_checkpointed_iteration.txt"]


class _Crash(BaseException):
    """The process dying mid-call: no handler in the library may catch it."""


def _crash_at(monkeypatch, at: int) -> list[str]:
    """Make filesystem call number ``at`` (0-based; -1: none) of what follows raise ``_Crash``
    before it acts; returns the names of the calls made, in order."""
    calls: list[str] = []

    def patch(owner, name, real):
        def call(*args, **kwargs):
            calls.append(name)
            if len(calls) - 1 == at:
                raise _Crash(f"crash at call {at}: {name}{args}")
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, call, raising=False)

    for name in ("rename", "replace", "fsync", "makedirs", "open", "close"):
        patch(os, name, getattr(os, name))
    patch(ckpt.shutil, "rmtree", ckpt.shutil.rmtree)
    patch(ckpt, "open", open)  # the module's file writes (builtins.open)
    return calls


def _save_two_crash_at(root, monkeypatch, at: int, second: int = 2):
    """Save iteration 1, train, save iteration ``second`` with a crash at filesystem call
    ``at``; returns the parameters of both saves (keyed by save order, 1 and 2) and the calls
    of the second save."""
    model_parallel_seed(2)
    model, opt, sched = make()
    step(model, opt, sched)
    save_checkpoint(1, model, opt, sched, args_for(root))
    saved = {1: params(model)}
    step(model, opt, sched)
    saved[2] = params(model)
    calls = _crash_at(monkeypatch, at)
    try:
        save_checkpoint(second, model, opt, sched, args_for(root))
    except _Crash:
        assert at >= 0
    finally:
        monkeypatch.undo()
    return saved, calls


def test_a_crash_at_any_step_of_a_save_leaves_the_tracker_naming_a_loadable_checkpoint(
        tmp_path, monkeypatch):
    """Kill the save of iteration 2 at each of its filesystem calls in turn (shard file writes,
    fsyncs, the directory rename, the tracker's temp file and replace): the tracker must name
    iteration 1 or 2, and that checkpoint must load with its own parameters."""
    _, calls = _save_two_crash_at(tmp_path / "whole", monkeypatch, at=-1)
    assert {"rename", "replace", "fsync"} <= set(calls), calls
    for at in range(len(calls)):
        root = tmp_path / f"crash{at}"
        saved, _ = _save_two_crash_at(root, monkeypatch, at)
        latest = read_tracker(str(root))
        assert latest in saved, (at, calls[at], latest)
        model2, opt2, sched2 = make(seed=3)
        try:
            loaded = load_checkpoint(model2, opt2, sched2, args_for(root))
        except (CheckpointError, OSError) as e:
            raise AssertionError(f"crash at call {at} ({calls[at]}): the tracker names "
                                 f"iteration {latest}, which does not load: {e}") from e
        assert loaded["iteration"] == latest
        assert all(torch.equal(v, saved[latest][k]) for k, v in params(model2).items()), at


def test_a_crash_while_saving_an_iteration_again_keeps_it_loadable(tmp_path, monkeypatch):
    """Saving the iteration the tracker already names (a resumed run reaching it again) swaps
    the directory in two renames; a crash at any filesystem call of that save must leave the
    tracker's iteration loadable, with the first or the second save's parameters."""
    _, calls = _save_two_crash_at(tmp_path / "whole", monkeypatch, at=-1, second=1)
    assert calls.count("rename") >= 2, calls
    for at in range(len(calls)):
        root = tmp_path / f"crash{at}"
        saved, _ = _save_two_crash_at(root, monkeypatch, at, second=1)
        assert read_tracker(str(root)) == 1
        model2, opt2, sched2 = make(seed=3)
        try:
            assert load_checkpoint(model2, opt2, sched2, args_for(root))["iteration"] == 1
        except (CheckpointError, OSError) as e:
            raise AssertionError(f"crash at call {at} ({calls[at]}): iteration 1 does not "
                                 f"load: {e}") from e
        got = params(model2)
        assert any(all(torch.equal(v, ref[k]) for k, v in got.items())
                   for ref in saved.values()), at


def test_async_save_snapshots_now_publishes_at_finalize(tmp_path):
    """--async-save: the file holds the state at the save call though training goes on, and the
    checkpoint becomes the latest only at finalize_async_save (or the next save)."""
    model_parallel_seed(3)
    model, opt, sched = make(dtype=torch.bfloat16)
    step(model, opt, sched)
    save_checkpoint(1, model, opt, sched, args_for(tmp_path))
    step(model, opt, sched)
    saved = params(model)
    save_checkpoint(2, model, opt, sched, args_for(tmp_path, async_save=True),
                    {"consumed_train_samples": 8})
    losses = [step(model, opt, sched) for _ in range(2)]  # changes the live tensors
    assert read_tracker(str(tmp_path)) == 1  # not published yet
    ckpt.finalize_async_save()
    assert read_tracker(str(tmp_path)) == 2
    ckpt.finalize_async_save()  # nothing pending: a no-op
    model_parallel_seed(999)
    model2, opt2, sched2 = make(dtype=torch.bfloat16, seed=4)
    assert load_checkpoint(model2, opt2, sched2, args_for(tmp_path))["iteration"] == 2
    assert all(torch.equal(v, saved[k]) for k, v in params(model2).items())
    assert [step(model2, opt2, sched2) for _ in range(2)] == losses  # RNG and optimizer too
    save_checkpoint(3, model, opt, sched, args_for(tmp_path, async_save=True))
    save_checkpoint(4, model, opt, sched, args_for(tmp_path))  # finalizes 3 first
    assert read_tracker(str(tmp_path)) == 4 and (tmp_path / "iter_0000003").is_dir()


def test_async_save_failure_raises_at_finalize_and_keeps_the_previous(tmp_path, monkeypatch):
    model_parallel_seed(4)
    model, opt, sched = make()
    save_checkpoint(1, model, opt, sched, args_for(tmp_path))

    def broken(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_file", broken)
    save_checkpoint(2, model, opt, sched, args_for(tmp_path, async_save=True))
    with pytest.raises(CheckpointError, match="iteration 2.*disk full.*previous one"):
        ckpt.finalize_async_save()
    assert read_tracker(str(tmp_path)) == 1 and not (tmp_path / "iter_0000002").exists()


def test_corrupt_missing_and_mismatched_checkpoints_fail_clearly(tmp_path):
    model, opt, sched = make()
    save_checkpoint(4, model, opt, sched, args_for(tmp_path))
    f = tmp_path / "iter_0000004" / "mp_rank_00_000" / "model_optim_rng.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=f"checkpoint file {f} is corrupt: it has "
                                              f"{len(data) // 3} bytes but was saved with"):
        load_checkpoint(*make(), args_for(tmp_path))
    crc = f.with_name(f.name + ".crc32")
    crc.unlink()  # as saved before checksums: unpickling finds the damage
    f.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=f"checkpoint file {f} is corrupt or unreadable"):
        load_checkpoint(*make(), args_for(tmp_path))
    f.unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint file {f} is missing for rank 0"):
        load_checkpoint(*make(), args_for(tmp_path))
    f.write_bytes(data)
    with pytest.raises(CheckpointError, match=(
            rf"checkpoint file {f}: parameter 'lin.weight' has shape \(8, 8\) in the checkpoint "
            r"but \(16, 16\) in the model")):
        load_checkpoint(*make(hidden=16), args_for(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("garbage")
    with pytest.raises(CheckpointError, match="should hold an iteration number"):
        load_checkpoint(*make(), args_for(tmp_path))


def _flip_byte_of(path, name: str) -> None:
    """Flip one bit inside the bytes of parameter ``name`` as stored in ``path`` (its payload,
    not metadata)."""
    tensor = torch.load(path, weights_only=True)["model"][name]
    data = bytearray(path.read_bytes())
    at = data.find(tensor.numpy().tobytes())
    assert at >= 0
    data[at + 5] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_tensor_fail_the_checksum_naming_the_file(tmp_path, capsys):
    model_parallel_seed(5)
    model, opt, sched = make()
    save_checkpoint(2, model, opt, sched, args_for(tmp_path))
    f = tmp_path / "iter_0000002" / "mp_rank_00_000" / "model_optim_rng.pt"
    assert (tmp_path / "iter_0000002" / "mp_rank_00_000" / "model_optim_rng.pt.crc32").is_file()
    good = f.read_bytes()
    _flip_byte_of(f, "lin.weight")
    with pytest.raises(ckpt.CorruptCheckpointError,
                       match=f"^checkpoint file {f} is corrupt: its CRC32 is [0-9a-f]{{8}} but was "
                             "saved as [0-9a-f]{8}; .*--ckpt-fallback-to-previous[^\n]*$"):
        load_checkpoint(*make(seed=1), args_for(tmp_path))
    with pytest.raises(CheckpointError, match=f"checkpoint file {f} is corrupt"):
        ckpt.read_checkpoint_args(str(tmp_path))  # --use-checkpoint-args reads verified too
    f.write_bytes(good)
    f.with_name(f.name + ".crc32").unlink()  # a checkpoint saved before checksums
    model2, opt2, sched2 = make(seed=1)
    capsys.readouterr()
    assert load_checkpoint(model2, opt2, sched2, args_for(tmp_path))["iteration"] == 2
    notes = [line for line in capsys.readouterr().out.splitlines() if "checksum" in line]
    assert notes == [f"NOTE: {f} has no checksum file (saved before moecore wrote them); "
                     "loading it unverified"]
    assert torch.equal(model2.lin.weight, model.lin.weight)


def test_fallback_to_previous_loads_the_newest_intact_checkpoint(tmp_path, capsys):
    model_parallel_seed(6)
    model, opt, sched = make()
    save_checkpoint(2, model, opt, sched, args_for(tmp_path))
    at2 = params(model)
    for it in (4, 6):
        step(model, opt, sched)
        save_checkpoint(it, model, opt, sched, args_for(tmp_path))
    for it in (4, 6):
        _flip_byte_of(tmp_path / f"iter_{it:07d}" / "mp_rank_00_000" / "model_optim_rng.pt",
                      "out.weight")
    os.makedirs(tmp_path / "iter_0000005.tmp")  # an unpublished save is never a candidate
    with pytest.raises(ckpt.CorruptCheckpointError, match="iter_0000006/.* is corrupt"):
        load_checkpoint(*make(seed=1), args_for(tmp_path))
    model2, opt2, sched2 = make(seed=1)
    out = load_checkpoint(model2, opt2, sched2, args_for(tmp_path, ckpt_fallback_to_previous=True))
    assert out["iteration"] == 2 and all(torch.equal(v, at2[k]) for k, v in params(model2).items())
    log = capsys.readouterr().out
    assert "iteration 6 is corrupt" in log and "iteration 4 is corrupt" in log
    assert "loaded iteration 2 instead of the newest, 6" in log
    # The corrupt ones are kept, set aside, and the tracker names the loaded one: a run saving
    # there again is not refused for replacing them.
    assert (tmp_path / "iter_0000006.corrupt").is_dir() and (tmp_path / "iter_0000004.corrupt")\
        .is_dir() and not (tmp_path / "iter_0000006").exists() and read_tracker(str(tmp_path)) == 2
    _flip_byte_of(tmp_path / "iter_0000002" / "mp_rank_00_000" / "model_optim_rng.pt",
                  "out.weight")
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"iterations \[2\]\) is corrupt"):
        load_checkpoint(*make(seed=1), args_for(tmp_path, ckpt_fallback_to_previous=True))


def _blocked_writer(monkeypatch, release):
    """Make every shard write wait for ``release`` (a stalled disk), then write."""
    real = ckpt._write_file

    def slow(obj, path):
        assert release.wait(30), "the test never released the writer"
        real(obj, path)

    monkeypatch.setattr(ckpt, "_write_file", slow)


def test_async_save_is_published_as_soon_as_written_and_on_abort(tmp_path, monkeypatch):
    """The per-iteration check publishes a finished --async-save without waiting for one still
    being written; the abort path publishes one that completes and leaves an incomplete one."""
    import threading

    from moecore.checkpointing import async_save

    model_parallel_seed(7)
    model, opt, sched = make()
    release = threading.Event()
    _blocked_writer(monkeypatch, release)
    save_checkpoint(2, model, opt, sched, args_for(tmp_path, async_save=True))
    step(model, opt, sched)  # training goes on while the disk stalls
    assert ckpt.maybe_finalize_async_save() is None and read_tracker(str(tmp_path)) is None
    release.set()
    async_save.pending().wait()
    assert ckpt.maybe_finalize_async_save() == 2 and read_tracker(str(tmp_path)) == 2
    assert ckpt.maybe_finalize_async_save() is None  # nothing pending
    release.clear()
    save_checkpoint(3, model, opt, sched, args_for(tmp_path, async_save=True))
    assert ckpt.publish_completed_async_save(wait_s=0.2) is None  # still writing: not published
    assert read_tracker(str(tmp_path)) == 2 and not (tmp_path / "iter_0000003").exists()
    release.set()
    save_checkpoint(4, model, opt, sched, args_for(tmp_path, async_save=True))
    async_save.pending().shard_files.append(str(tmp_path / "other_rank_shard.pt"))
    assert ckpt.publish_completed_async_save(wait_s=0.2) is None  # another shard never came
    assert read_tracker(str(tmp_path)) == 2
    save_checkpoint(5, model, opt, sched, args_for(tmp_path, async_save=True))
    assert ckpt.publish_completed_async_save() == 5 and read_tracker(str(tmp_path)) == 5
    model2, opt2, sched2 = make(seed=1)
    assert load_checkpoint(model2, opt2, sched2, args_for(tmp_path))["iteration"] == 5
    assert all(torch.equal(v, params(model)[k]) for k, v in params(model2).items())


def test_missing_checkpoint_starts_fresh_or_exits(tmp_path, capsys):
    assert load_checkpoint(*make(), args_for(tmp_path / "none")) is None
    assert "training from scratch" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="--exit-on-missing-checkpoint"):
        load_checkpoint(*make(), args_for(tmp_path / "none", exit_on_missing_checkpoint=True))


# ---- 4 ranks: DP=4 dense, EP=2 x EDP=2 experts -------------------------------------------------
class ToyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.expert = nn.Parameter(torch.randn(3, 4))
        self.expert.allreduce = False
        self.expert.expert_parallel = True


def _dist_save_load(rank, world_size, path, async_save=False):
    from moecore.parallel_state import initialize_model_parallel

    ps = initialize_model_parallel(expert_model_parallel_size=2)
    model_parallel_seed(1234, ps)
    torch.manual_seed(0)
    model = ToyMoE()
    with torch.no_grad():
        model.expert.add_(ps.ep_rank)  # experts differ across EP ranks, not across their replicas
    opt = MegatronOptimizer(get_param_groups(model), lr=1e-2, weight_decay=0.0, parallel_state=ps)
    sched = OptimizerParamScheduler(opt, 0.0, 1e-2, 0.0, 0, 10, "linear", 0.0, 0.0, 10,
                                    "constant")
    torch.manual_seed(1000 + rank)  # every rank's RNG differs; each must get its own back
    args = args_for(path, async_save=async_save)
    save_checkpoint(7, model, opt, sched, args, {"consumed_train_samples": 70}, ps)
    ckpt.finalize_async_save()  # collective; a no-op after a synchronous save
    expected = (torch.rand(2), params(model))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    torch.manual_seed(5)
    out = load_checkpoint(model, opt, sched, args, ps)
    got_rand = torch.rand(2)
    same = all(torch.equal(v, expected[1][k]) for k, v in params(model).items())
    files = sorted(os.listdir(os.path.join(path, "iter_0000007")))
    shard = torch.load(ckpt.checkpoint_file(path, 7, ps), weights_only=True)
    # A newer save corrupt on one EP rank's shard only: every rank raises, or falls back to 7.
    save_checkpoint(9, model, opt, sched, args, {"consumed_train_samples": 90}, ps)
    ckpt.finalize_async_save()
    if rank == 1:
        from pathlib import Path

        _flip_byte_of(Path(ckpt.checkpoint_file(path, 9, ps)), "expert")
    torch.distributed.barrier()
    try:
        load_checkpoint(model, opt, sched, args, ps)
        error = None
    except CheckpointError as e:
        error = str(e)
    fell_back = load_checkpoint(model, opt, sched, CheckpointConfig(
        load=path, ckpt_fallback_to_previous=True), ps)["iteration"]
    return {"same_params": same, "rng_ok": torch.equal(got_rand, expected[0]), "files": files,
            "iteration": out["iteration"], "rng_ranks": shard["rng_ranks"],
            "samples": out["consumed_train_samples"], "error": error, "fell_back": fell_back}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_four_rank_shards_and_per_rank_rng(tmp_path, async_save):
    res = run_distributed(_dist_save_load, 4, str(tmp_path), async_save, timeout=120)
    for r, out in enumerate(res):
        assert out["same_params"] and out["rng_ok"], r
        assert out["files"] == ["mp_rank_00_000", "mp_rank_00_001"]
        assert out["iteration"] == 7 and out["samples"] == 70
        assert out["rng_ranks"] == ([0, 2] if r % 2 == 0 else [1, 3])
        assert "mp_rank_00_001/model_optim_rng.pt is corrupt" in out["error"], (r, out["error"])
        assert out["error"].startswith("checkpoint file" if r in (1, 3) else "rank 1: "), r
        assert out["fell_back"] == 7, r


def test_pretrain_async_saves_resume_like_sync_saves(tmp_path):
    from moecore.training import pretrain
    from tests.cli import BASE

    runs = {}
    for mode in ("sync", "async"):
        root = tmp_path / mode
        argv = BASE + ["--train-iters", "4", "--lr-decay-iters", "6", "--save", str(root),
                       "--save-interval", "2", "--eval-iters", "0"] + (
                           ["--async-save"] if mode == "async" else [])
        pretrain(argv)
        assert read_tracker(str(root)) == 4 and (root / "iter_0000002").is_dir()
        resumed = pretrain(argv + ["--train-iters", "6", "--load", str(root)])  # later wins
        runs[mode] = resumed["lm_loss"]
    assert len(runs["sync"]) == 2 and runs["async"] == runs["sync"]


def test_use_checkpoint_args_takes_the_saved_model_shape(tmp_path, capsys):
    from moecore.arguments import parse_args
    from moecore.training import pretrain
    from tests.cli import BASE, parse_error

    saved_model = ["--num-layers", "3", "--hidden-size", "48", "--num-attention-heads", "6"]
    pretrain(BASE + saved_model + ["--train-iters", "2", "--lr-decay-iters", "4", "--save",
                                   str(tmp_path), "--eval-iters", "0"])
    resume = BASE + ["--train-iters", "4", "--lr-decay-iters", "4", "--load", str(tmp_path),
                     "--eval-iters", "0"]  # BASE's own shape: 2 layers, hidden 64, 4 heads
    with pytest.raises(CheckpointError):
        pretrain(resume)
    args = parse_args(resume + ["--use-checkpoint-args"])
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (3, 48, 6)
    lines = []
    out = pretrain(resume + ["--use-checkpoint-args"], log=lines.append)
    assert out["start_iteration"] == 2 and len(out["lm_loss"]) == 2
    assert any("--use-checkpoint-args" in line and "num_layers=3" in line for line in lines)
    assert "pass --load DIR" in parse_error(BASE + ["--use-checkpoint-args"], capsys)
    assert "no checkpoint in --load" in parse_error(
        BASE + ["--use-checkpoint-args", "--load", str(tmp_path / "nothing")], capsys)


def test_saved_args_record_the_chosen_kernel_backends(tmp_path, monkeypatch):
    from moecore import backends
    from moecore.kernels.norm import RMS_NORM_BACKENDS

    monkeypatch.setattr(backends, "_LOGGED", {})
    RMS_NORM_BACKENDS.select("auto", device="cpu")  # what a CPU run's RMSNorm resolves to
    model, opt, sched = make()
    save_checkpoint(3, model, opt, sched, args_for(tmp_path, run_args={"save": str(tmp_path)}))
    saved = ckpt.read_checkpoint_args(str(tmp_path))
    assert saved["kernel_backends"]["rms_norm"] == "torch"
    assert saved["kernel_backends"] == backends.chosen()
    assert saved["save"] == str(tmp_path)  # the flags themselves are saved as before
