"""One run per ``--save`` directory: an exclusive lock taken at start-up, released at exit.

Two runs saving to one directory mix their checkpoints (and race on the tracker's temp file),
so :func:`acquire_run_lock` takes ``fcntl.flock`` on ``DIR/.moecore-run.lock`` and writes a
JSON owner record into it (host, pid, start time, command). The kernel drops the flock when
the process dies, however it dies; the record stays behind and tells why:

* flock busy: another live run holds it; refused with its host, pid and start time (or, when
  that pid is gone on this host, a leftover child of it, e.g. a data-loader worker);
* flock granted, record empty: the previous run released the lock at exit;
* flock granted, record of a process that is gone (same host, pid dead or reused): the run
  crashed; the lock is taken over with a warning;
* flock granted, record of a live process on this host: the filesystem does not enforce
  flock; refused;
* flock granted, record of another host: on a shared filesystem whose locks work across hosts
  (local disks, NFSv4 and NFSv3 with NLM, where Linux maps flock to byte-range locks that the
  server drops when the client's lease ends) that run is gone; taken over with a warning.
  Filesystems that keep flock per host (NFS mounted with ``local_lock=flock``/``all``, Lustre
  with ``localflock``) cannot tell two hosts apart; this is the documented limit.
* flock not supported (ENOLCK, EOPNOTSUPP): only the record is checked, with a warning; a
  record of another host is then refused (delete the lock file once that run is gone).

The lock file is never deleted (deleting a flock'd file lets a later opener lock a new inode
while an earlier one still holds the old): release empties the record.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable

from moecore.checkpointing import CheckpointError

LOCK_FILENAME = ".moecore-run.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLockError(CheckpointError):
    """``--save`` belongs to another run (or cannot be locked)."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (``/proc/PID/stat`` field 22), to tell a reused pid
    from the original process; None where there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_record() -> dict:
    """This process as a lock owner."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(
        os.getpid()), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv)[:300]}


def describe(record: dict) -> str:
    return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, started "
            f"{record.get('started', '?')}")


def _alive_here(record: dict) -> bool:
    """Whether ``record``'s process runs on this host (same pid and kernel start time)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    start = record.get("proc_start")
    return start is None or _proc_start(record["pid"]) in (None, start)


def _read(fd: int) -> dict | None:
    raw = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"host": "?", "pid": raw[:40]}


def _write(fd: int, record: dict | None) -> None:
    os.ftruncate(fd, 0)
    if record is not None:
        os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)


class RunLock:
    """A held lock on a save directory; :meth:`release` (or leaving the ``with``) frees it."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            _write(self.fd, None)  # a clean exit: the next run takes over without a warning
        except OSError:
            pass
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _busy(save_dir: str, fd: int) -> RunLockError:
    record = _read(fd) or {}
    who = describe(record)
    if record.get("host") == socket.gethostname() and not _alive_here(record):
        who += ", which is gone: a leftover child process of it (e.g. a data-loader worker) " \
               "still holds the lock; wait until it exits"
    return RunLockError(f"--save {save_dir} is in use by another run ({who}); two runs saving "
                        "to one directory mix their checkpoints: wait for it to finish or "
                        "pick another --save")


def _check_previous(save_dir: str, path: str, previous: dict, locked: bool,
                    warn: Callable[[str], None]) -> None:
    """Refuse or warn about the owner record left by an earlier holder (see the module doc)."""
    mine = owner_record()
    if previous.get("host") == mine["host"] and previous.get("pid") == mine["pid"]:
        why = "an earlier run in this process did not release it"
    elif _alive_here(previous):
        raise RunLockError(f"--save {save_dir} is in use by another run ({describe(previous)}"
                           "), which is alive though its file lock was granted: this "
                           "filesystem does not enforce flock; stop one of the runs")
    elif previous.get("host") == mine["host"]:
        why = "its process is gone"
    elif locked:
        why = "its host released the file lock"
    else:
        raise RunLockError(f"--save {save_dir} is locked by a run on another host "
                           f"({describe(previous)}) and this filesystem has no file locks to "
                           f"check it; once that run is gone, delete {path}")
    warn(f"WARNING: --save {save_dir}: taking over the lock of a run that ended without "
         f"releasing it ({describe(previous)}; {why})")


def acquire_run_lock(save_dir: str, warn: Callable[[str], None] = print) -> RunLock:
    """Lock ``save_dir`` (created if missing) for this process; :class:`RunLockError` when
    another run holds it. Call on one rank (the one that writes the tracker)."""
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, LOCK_FILENAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(save_dir, fd) from None
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            locked = False
            warn(f"WARNING: --save {save_dir}: the filesystem refuses file locks "
                 f"({os.strerror(e.errno)}); only the lock record guards against a second run")
        previous = _read(fd)
        if previous is not None:
            _check_previous(save_dir, path, previous, locked, warn)
        _write(fd, owner_record())
    except BaseException:
        os.close(fd)
        raise
    return RunLock(path, fd)
