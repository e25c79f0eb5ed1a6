"""A run's metrics.json as other processes see it: reading it, telling a live
``running`` run from a dead one, and the lock that lets only one process train
in a run dir at a time. No torch, so that ``bnexp runs`` and ``bnexp report``
never import it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bnexp.config import ConfigError
from bnexp.io import read_json

try:
    import fcntl
except ImportError:  # Windows: no flock; only the pid/heartbeat checks guard a run dir there
    fcntl = None  # type: ignore[assignment]

HEARTBEAT_SEC = 10.0
CHECKPOINT = "checkpoint.pt"  # written by bnexp.train; named here so that torch-free code can look for it
LOCK_FILE = ".bnexp.lock"  # inside the run dir; never deleted while in use (see run_lock)

log = logging.getLogger("bnexp")


def read_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / "metrics.json")


def _proc_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux /proc); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (state); starttime is field 22 of proc(5).
    return None if fields[0] == "Z" else int(fields[19])


def process_info() -> dict[str, Any]:
    """Who is training this run: recorded in metrics.json so that a rerun can
    tell a dead ``running`` run (SIGKILL, OOM killer) from a live one."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start_ticks": _proc_start_ticks(pid)}


def _process_alive(pid: int, start_ticks: int | None) -> bool:
    if pid == os.getpid():
        return False  # this process runs its jobs one at a time: the run is not being trained now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    ticks = _proc_start_ticks(pid)
    if ticks is None:
        # On Linux: a zombie (killed, not yet reaped) or gone by now. Without /proc: the pid exists.
        return not Path("/proc/self").exists()
    return start_ticks is None or ticks == start_ticks  # a different start time: the pid was reused


def run_is_alive(metrics: dict[str, Any], now: float | None = None) -> bool:
    """Whether a ``running`` run is being trained by a live process right now.

    On the host that trains it, the recorded pid decides at once (a SIGKILLed
    run is dead the moment its process is gone, whatever its heartbeat says).
    From another host only the heartbeat is visible: it is rewritten every
    HEARTBEAT_SEC seconds, so one older than six of those means the run died.
    """
    if metrics.get("status") != "running":
        return False
    proc = metrics.get("process") or {}
    if proc.get("host") == socket.gethostname() and isinstance(proc.get("pid"), int):
        return _process_alive(proc["pid"], proc.get("start_ticks"))
    beat = (metrics.get("time") or {}).get("heartbeat", 0)
    return (now or time.time()) - beat < 6 * HEARTBEAT_SEC


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after a whole step, and its checkpoint is saved.
    (Raised by bnexp.train; defined here so that the CLI can catch it without importing torch.)"""

    def __init__(self, run_dir: Path, step: int):
        super().__init__(f"{run_dir} interrupted after step {step}; checkpoint saved")
        self.run_dir, self.step = run_dir, step


# --------------------------------------------------------------------------- the run dir's lock


class RunLocked(ConfigError):
    """Another process holds the run dir's lock: it is training there right now."""

    def __init__(self, run_dir: Path, holder: dict[str, Any] | None):
        self.key, self.run_dir, self.holder = "RUN_DIR", run_dir, holder or {}
        who = (f"pid {self.holder.get('pid')} on host {self.holder.get('host')}" if self.holder.get("pid")
               else "another process")
        Exception.__init__(self, f"{run_dir} is being trained right now by {who}; wait for it or stop it first")


# Locks this process holds: lock file path -> [fd, depth]. flock conflicts
# between two open files even in one process, so a nested run_lock on the
# same run dir (the `bnexp train` callback, then execute(), then train())
# reuses the open one.
_HELD: dict[str, list[int]] = {}


def _holder(fd: int, run_dir: Path) -> dict[str, Any] | None:
    """Who holds the lock: what it wrote into the lock file; else who metrics.json
    says trains the run, if that process is alive."""
    # The holder writes its pid right after taking the lock: a refusal that
    # lands in between waits for it a moment rather than name a stale process.
    deadline = time.monotonic() + 1.0
    while True:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and info.get("pid"):
            return info
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    record = read_record(run_dir) or {}
    return record.get("process") if record.get("status") == "running" and run_is_alive(record) else None


def acquire_run_lock(run_dir: str | os.PathLike) -> None:
    """Take the exclusive lock of ``run_dir`` (created if missing), or raise
    RunLocked naming who holds it. Nothing in ``run_dir`` is changed on refusal.

    ``fcntl.flock`` on ``run_dir/.bnexp.lock``: the kernel drops it when the
    holder exits, however it exits (SIGKILL and the OOM killer included), so a
    dead run never leaves a stale lock behind.
    """
    run_dir = Path(run_dir)
    path = os.path.realpath(run_dir / LOCK_FILE)
    if path in _HELD:
        _HELD[path][1] += 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        _HELD[path] = [-1, 1]
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _holder(fd, run_dir)
                os.close(fd)
                raise RunLocked(run_dir, holder) from None
            # A file system without flock (some NFS setups, FUSE mounts): go on unguarded, and say so.
            log.warning("cannot lock %s (%s): nothing stops a second process from training into this run dir", path, e.strerror)
            break
        # Locked the file we opened; make sure the path still names it (it may
        # have been removed and made again in between), else we locked nothing.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:  # for the refusal message of whoever comes next
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(process_info()).encode(), 0)
    except OSError:
        pass
    _HELD[path] = [fd, 1]


def release_run_lock(run_dir: str | os.PathLike) -> None:
    path = os.path.realpath(Path(run_dir) / LOCK_FILE)
    held = _HELD.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[path]
        if held[0] >= 0:
            os.close(held[0])  # releases the flock; the file stays for the next holder


@contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``run_dir``'s exclusive lock for the block (see acquire_run_lock)."""
    acquire_run_lock(run_dir)
    try:
        yield
    finally:
        release_run_lock(run_dir)
