"""Start-up guards (issue #24): the --save lock (busy, stale, released, flock not enforced),
refusal to overwrite checkpoints a run did not start from, the resume-args check, a read-only
--save found at start-up, a full disk at write time, the converter refusing a training
directory, and pretrain_gpt.py's one-line user errors."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import socket
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from moecore import checkpointing as ckpt
from moecore.arguments.checkpoint_args import check_checkpoint_args
from moecore.checkpointing import CheckpointError, read_tracker
from moecore.checkpointing import guards as guards_lib
from moecore.checkpointing.run_lock import (
    LOCK_FILENAME,
    RunLockError,
    _proc_start,
    acquire_run_lock,
)
from moecore.convert import convert
from moecore.training import pretrain
from tests.dist_harness import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = ("--num-layers 1 --hidden-size 16 --num-attention-heads 4 --seq-length 8 "
        "--micro-batch-size 2 --lr 1e-3 --mock-data --vocab-size 31 --device cpu "
        "--num-workers 0 --eval-iters 0 --log-interval 1 --lr-decay-style constant "
        "--lr-decay-iters 10 --train-iters 2").split()


def _load_script(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(save) -> str:
    with open(os.path.join(save, LOCK_FILENAME)) as f:
        return f.read()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- the lock ------------------------------------------------------------------------------------
def test_second_run_is_refused_naming_the_first_and_release_frees_the_lock(tmp_path):
    save = str(tmp_path / "ckpt")
    warnings: list[str] = []
    first = acquire_run_lock(save, warn=warnings.append)
    owner = json.loads(_record(save))
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(RunLockError) as e:
        acquire_run_lock(save, warn=warnings.append)
    msg = str(e.value)
    assert f"--save {save} is in use by another run" in msg and "\n" not in msg
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started {owner['started']}" in msg
    first.release()
    assert _record(save) == ""  # a clean release leaves no stale record
    with acquire_run_lock(save, warn=warnings.append):
        pass
    assert warnings == []


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    pid = _dead_pid()
    (save / LOCK_FILENAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": pid, "started": "yesterday"}))
    warnings: list[str] = []
    with acquire_run_lock(str(save), warn=warnings.append):
        assert json.loads(_record(save))["pid"] == os.getpid()
    assert len(warnings) == 1 and "taking over the lock" in warnings[0]
    assert f"pid {pid}, started yesterday; its process is gone" in warnings[0]


def test_record_of_another_host_with_a_free_flock_is_taken_over(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / LOCK_FILENAME).write_text(json.dumps({"host": "node-7", "pid": 1, "started": "t"}))
    warnings: list[str] = []
    acquire_run_lock(str(save), warn=warnings.append).release()
    assert "host node-7" in warnings[0] and "its host released the file lock" in warnings[0]


def test_live_owner_whose_flock_is_not_enforced_is_refused(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    parent = os.getppid()  # alive, on this host, not holding the flock
    (save / LOCK_FILENAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": parent, "proc_start": _proc_start(parent),
         "started": "t"}))
    with pytest.raises(RunLockError, match="does not enforce flock"):
        acquire_run_lock(str(save))


def _two_rank_guards(rank, world_size, save):
    def refuse():
        raise CheckpointError("refused on rank 0 only")

    outcomes = []
    for fn, args in ((refuse, ()), (acquire_run_lock, (save,)), (acquire_run_lock, (save,))):
        try:
            lock = guards_lib.on_rank0(fn, *args)
            outcomes.append(lock is not None)
        except CheckpointError as e:
            outcomes.append((type(e).__name__, str(e).split(" (")[0], e.agreed))
    return outcomes


def test_rank0_outcome_reaches_every_rank(tmp_path):
    """gloo, 2 ranks: rank 0 decides, both raise the same error (no rank left waiting)."""
    save = str(tmp_path / "ckpt")
    out = run_distributed(_two_rank_guards, 2, save, timeout=120)
    busy = ("RunLockError", f"--save {save} is in use by another run", True)
    assert out == [[("CheckpointError", "refused on rank 0 only", True), True, busy],
                   [("CheckpointError", "refused on rank 0 only", True), False, busy]]


# ---- resume args -----------------------------------------------------------------------------
def test_resume_check_names_each_changed_model_flag_with_both_values():
    saved = {"num_attention_heads": 4, "num_experts": 8, "moe_router_topk": 2,
             "moe_ffn_hidden_size": 64, "hidden_dropout": 0.1, "max_position_embeddings": 64,
             "padded_vocab_size": 128}
    ours = Namespace(**{**saved, "num_attention_heads": 8, "moe_router_topk": 1,
                        "hidden_dropout": 0.0, "finetune": False})
    with pytest.raises(CheckpointError) as e:
        check_checkpoint_args(ours, saved, "/ck")
    msg = str(e.value)
    assert "--num-attention-heads 8 (checkpoint: 4)" in msg
    assert "--moe-router-topk 1 (checkpoint: 2)" in msg and "--use-checkpoint-args" in msg
    assert "dropout" not in msg and "--load /ck" in msg
    check_checkpoint_args(Namespace(**saved, finetune=False), saved, "/ck")  # equal: fine
    longer = Namespace(**{**saved, "max_position_embeddings": 128, "finetune": True})
    check_checkpoint_args(longer, saved, "/ck")  # --finetune may extend the context
    longer.finetune = False
    with pytest.raises(CheckpointError, match="--max-position-embeddings 128"):
        check_checkpoint_args(longer, saved, "/ck")


# ---- write errors ----------------------------------------------------------------------------
class _FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_read_only_save_is_refused_at_start_up(tmp_path, monkeypatch):
    def read_only(**kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(guards_lib.tempfile, "mkstemp", read_only)
    save = str(tmp_path / "ro")
    with pytest.raises(CheckpointError, match=r"--save .*/ro is not writable \(Read-only"):
        pretrain(TINY + ["--save", save])
    assert not os.path.exists(os.path.join(save, "iter_0000002"))


def test_pretrain_guards_overwrites_resume_args_and_full_disk(tmp_path, monkeypatch):
    save = str(tmp_path / "run")
    pretrain(TINY + ["--save", save, "--save-interval", "1"])
    assert read_tracker(save) == 2 and _record(save) == ""  # lock released at exit
    before = sorted(os.listdir(save))
    # No checkpoint loaded (no --load, a mistyped one): refused, nothing replaced.
    for extra, why in (([], "no --load given"),
                       (["--load", save + "-typo"], f"--load {save}-typo holds no checkpoint")):
        with pytest.raises(CheckpointError) as e:
            pretrain(TINY + ["--save", save] + extra)
        assert f"--save {save} holds checkpoints of iterations 1, 2" in str(e.value)
        assert why in str(e.value) and "--overwrite-checkpoints" in str(e.value)
    assert sorted(os.listdir(save)) == before and read_tracker(save) == 2
    # A shape-preserving model change on resume.
    with pytest.raises(CheckpointError, match=r"--num-attention-heads 2 \(checkpoint: 4\)"):
        pretrain(TINY + ["--save", save, "--load", save, "--num-attention-heads", "2"])
    # A tracker moved back: the later iterations would be replaced.
    pretrain([*TINY[:-1], "3", "--save", save, "--load", save])
    ckpt._replace_tracker(save, 2)
    with pytest.raises(CheckpointError, match="iterations 3 .* after this run's start "
                                              "iteration 2"):
        pretrain([*TINY[:-1], "3", "--save", save, "--load", save])
    pretrain([*TINY[:-1], "3", "--save", save, "--load", save, "--overwrite-checkpoints"])
    assert read_tracker(save) == 3
    # A full disk at the next save: one line naming the file; the previous checkpoint stays.
    real_open = open
    monkeypatch.setattr(ckpt, "open", lambda p, m="r", *a: _FullDisk(real_open(p, m), 4096)
                        if m == "wb" else real_open(p, m, *a), raising=False)
    with pytest.raises(CheckpointError) as e:
        pretrain([*TINY[:-1], "4", "--save", save, "--load", save])
    assert "iter_0000004.tmp/mp_rank_00_000/model_optim_rng.pt failed: disk full" in str(e.value)
    assert read_tracker(save) == 3 and os.path.isdir(os.path.join(save, "iter_0000004.tmp"))
    assert "model" in torch.load(ckpt.checkpoint_file(save, 3), weights_only=True)


def test_converter_refuses_a_directory_holding_checkpoints(tmp_path, capsys):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    pretrain(TINY + ["--save", src])
    convert("moecore", "moecore", src, dst)
    ckpt._replace_tracker(dst, 7)  # as a training run's later checkpoint would
    os.rename(os.path.join(dst, "iter_0000002"), os.path.join(dst, "iter_0000007"))
    tool = _load_script("convert_tool", "tools/checkpoint/convert.py")
    args = ["--loader", "moecore", "--saver", "moecore", "--load-dir", src, "--save-dir", dst]
    assert tool.main(args) == 2
    err = capsys.readouterr().err
    assert f"--save-dir {dst} already holds moecore checkpoints (iterations [7]" in err
    assert "--overwrite" in err
    assert read_tracker(dst) == 7 and os.listdir(dst).count("iter_0000007") == 1
    assert tool.main(args + ["--overwrite"]) == 0
    assert read_tracker(dst) == 2


# ---- pretrain_gpt.py -------------------------------------------------------------------------
def test_pretrain_gpt_prints_user_errors_in_one_line_and_keeps_bug_tracebacks(tmp_path, capsys,
                                                                              monkeypatch):
    script = _load_script("pretrain_gpt_script", "pretrain_gpt.py")
    empty = tmp_path / "tok"
    empty.mkdir()
    argv = [a for a in TINY if a not in ("--mock-data",)] + [
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(empty),
        "--data-path", str(tmp_path / "none"), "--split", "1"]
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: tokenizer: --tokenizer-model {empty}")
    assert err.count("\n") == 1 and "Traceback" not in err

    def bug(args):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(script, "pretrain", bug)
    with pytest.raises(RuntimeError, match="a real bug"):
        script.main(TINY)
