"""A run directory's life, in one place: its metrics.json record (reading,
writing, telling a live ``running`` run from a dead one), the lock that lets
only one process train in it at a time, the guard that takes back what a
rejected run wrote, and :func:`policy`, the one decision train, sweep, resume
and reproduce all make before touching a run dir: skip, resume, train or refuse.

Neither torch nor Hydra is imported here: ``bnexp runs`` and ``bnexp report``
use this module, and a refusal is said before either loads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

from bnexp.config import ConfigError, hash_matches, launch_world_size
from bnexp.io import TEMP_SUFFIX, read_bounded, read_json, write_json

try:
    import fcntl
except ImportError:  # Windows: no flock; only the pid/heartbeat checks guard a run dir there
    fcntl = None  # type: ignore[assignment]

HEARTBEAT_SEC = 10.0
METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"  # written by bnexp.checkpoint; named here so that torch-free code can look for it
LOCK_FILE = ".bnexp.lock"  # inside the run dir; never deleted while in use (see run_lock)
WRITER = "bnexp"  # every metrics.json bnexp writes says so under "writer"
OWNER_ENTRY = "bnexp_run.json"  # the run a checkpoint belongs to: an entry of its zip archive (bnexp.checkpoint.save)

log = logging.getLogger("bnexp")


def read_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    record = read_json(Path(run_dir) / METRICS)
    return record if isinstance(record, dict) else None


# What bnexp 0.1 wrote for a sweep job refused while setting up: no hash, no env.
_V01_FAILURE_KEYS = {"status", "steps", "final", "best", "overrides", "error"}


def is_bnexp_record(record: dict[str, Any]) -> bool:
    """Whether a metrics.json was written by bnexp (this version says so; 0.1's have a
    config hash or env.bnexp, or are its failure record of a job refused while setting up)."""
    if record.get("writer") == WRITER or "config_hash" in record or "bnexp" in (record.get("env") or {}):
        return True
    return record.get("status") == "failed" and set(record) <= _V01_FAILURE_KEYS and {"status", "steps", "error"} <= set(record)


class RunRecord:
    """metrics.json: the run's status and results, rewritten atomically."""

    def __init__(self, run_dir: Path, base: dict[str, Any]):
        self.path = Path(run_dir) / METRICS
        self.data: dict[str, Any] = {"writer": WRITER, **base}
        self._last_beat = 0.0

    def write(self, **updates: Any) -> None:
        self.data.update(updates)
        self.data.setdefault("time", {})["heartbeat"] = time.time()
        self._last_beat = time.monotonic()
        write_json(self.path, self.data)

    def heartbeat(self) -> None:
        """Cheap to call every step: rewrites the file at most every HEARTBEAT_SEC seconds."""
        if time.monotonic() - self._last_beat > HEARTBEAT_SEC:
            self.write()


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
        return False  # a run this process trains holds its lock; a record naming this pid outside it is stale
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process on Windows: assume alive
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
    if proc.get("host") == socket.gethostname() and isinstance(proc.get("pid"), int) and os.name != "nt":
        return _process_alive(proc["pid"], proc.get("start_ticks"))
    beat = (metrics.get("time") or {}).get("heartbeat", 0)
    return (now or time.time()) - beat < 6 * HEARTBEAT_SEC


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run: after a whole step with its checkpoint saved
    (``step`` set), or before it could save one (``step`` None).
    (Raised by bnexp.train; defined here so that the CLI can catch it without importing torch.)"""

    def __init__(self, run_dir: Path, step: int | None, signum: int | None = None):
        super().__init__(f"{run_dir} interrupted after step {step}; checkpoint saved" if step is not None else f"{run_dir} interrupted")
        self.run_dir, self.step, self.signum = Path(run_dir), step, signum  # signum: the signal that stopped the loop

    def __reduce__(self) -> tuple:  # from a launcher's worker process to the CLI (bnexp.workers)
        return type(self), (self.run_dir, self.step, self.signum)

    @property
    def resumable(self) -> bool:
        """Whether `bnexp resume` can continue it: a bnexp record and a checkpoint are there."""
        return (self.run_dir / CHECKPOINT).is_file() and read_record(self.run_dir) is not None


class ReplicasInterrupted(RunInterrupted):
    """SIGINT/SIGTERM stopped a stack of replicas after a whole step; every replica's checkpoint is saved."""

    def __init__(self, run_dirs: list[Path], step: int):
        super().__init__(run_dirs[0], step)
        self.run_dirs = run_dirs
        self.args = (f"{len(run_dirs)} replicas ({run_dirs[0]} ...) interrupted after step {step}; checkpoints saved",)

    def __reduce__(self) -> tuple:
        return type(self), (self.run_dirs, self.step)

    @classmethod
    def joined(cls, stops: list[RunInterrupted]) -> RunInterrupted:
        """The interruptions of stacks or runs that trained side by side (the vectorized
        launcher's worker processes), as one."""
        if len(stops) == 1:
            return stops[0]
        dirs = [d for e in stops for d in (e.run_dirs if isinstance(e, ReplicasInterrupted) else [e.run_dir])]
        steps = sorted({e.step for e in stops if e.step is not None})
        out = cls(dirs, steps[0])
        out.args = (f"{len(dirs)} jobs ({dirs[0]} ...) interrupted after step{'s' if len(steps) > 1 else ''} "
                    f"{', '.join(map(str, steps))}; checkpoints saved",)
        return out

    @property
    def resumable(self) -> bool:
        return all(RunInterrupted(d, self.step).resumable for d in self.run_dirs)


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
    path = _lock_path(run_dir)
    if path in _HELD:
        _HELD[path][1] += 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        _HELD[path] = [-1, 1]
        remove_orphan_temp_files(run_dir, locked=False)
        return
    locked = True
    while True:
        try:
            # O_NOFOLLOW: a lock file replaced by a symlink would otherwise have
            # its target truncated and overwritten below.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP or os.path.islink(path):
                raise ConfigError("RUN_DIR", f"{path} is a symbolic link; bnexp never follows one there (it would overwrite its target); remove it") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _holder(fd, run_dir)
                os.close(fd)
                raise RunLocked(run_dir, holder) from None
            # A file system without flock (some NFS setups, FUSE mounts): go on unguarded, and say so.
            log.warning("cannot lock %s (%s): nothing stops a second process from training into this run dir", path, e.strerror)
            locked = False
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
    remove_orphan_temp_files(run_dir, locked)


def _lock_path(run_dir: Path) -> str:
    # The run dir resolved, the lock file itself not: a symlink there must be seen, not followed.
    return os.path.join(os.path.realpath(run_dir), LOCK_FILE)


def live_holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The live process on this host that the run dir's lock file names (the last
    to take its lock), or None: none, another host's, or gone. For a run dir
    without metrics.json yet: its holder is setting it up (a vectorized sweep
    sets up every replica of a stack before any writes)."""
    try:
        fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        info = json.loads(os.read(fd, 4096) or b"null")
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(info, dict) or info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return None
    start = info.get("start_ticks")
    return info if _process_alive(info["pid"], start if isinstance(start, int) else None) else None


def holds_lock(run_dir: str | os.PathLike) -> bool:
    return _lock_path(Path(run_dir)) in _HELD


def release_run_lock(run_dir: str | os.PathLike) -> None:
    path = _lock_path(Path(run_dir))
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


# --------------------------------------------------------------------------- orphans


# bnexp.io.atomic_write's temp files: .<target>.<pid>.<random>.tmp (earlier versions: .<target>.<random>.tmp).
_TEMP = re.compile(r"^\.(metrics\.json|checkpoint\.pt)\.(?:(\d+)\.)?[^/]*" + re.escape(TEMP_SUFFIX) + "$")


def remove_orphan_temp_files(run_dir: Path, locked: bool) -> list[str]:
    """Remove the temp files a writer killed mid-write left (a checkpoint-sized
    one each). Holding the lock, every one is an orphan (all writes into a run
    dir happen under its lock); without a working lock only those whose writer's
    pid is gone on this host."""
    removed = []
    try:
        names = os.listdir(run_dir)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.match(name)
        if not m:
            continue
        pid = m.group(2)
        if not locked and (pid is None or _process_alive(int(pid), None)):
            continue
        try:
            os.unlink(os.path.join(run_dir, name))
            removed.append(name)
        except OSError:
            pass
    if removed:
        log.info("removed %d orphaned temp file(s) of a killed writer in %s: %s", len(removed), run_dir, ", ".join(removed))
    return removed


# --------------------------------------------------------------------------- undoing a rejected run


@dataclass
class Before:
    """A run dir's surroundings before this process writes anything there: the
    paths it is about to create, and the listing and times of the directories
    whose listing that changes (to give them back)."""

    missing: list[Path]
    dir_times: dict[Path, tuple[set[str], tuple[int, int]]]
    kept: dict[Path, tuple[bytes, tuple[int, int]]] | None = None  # ``names`` that existed: bytes and times, to give back


def before_writing(run_dir: Path, names: tuple[str, ...] = ()) -> Before:
    """:class:`Before` of ``run_dir`` and of ``names`` inside it (taken before the lock, which creates them)."""
    run_dir = Path(run_dir)
    missing = [p for p in [*(run_dir / n for n in names), run_dir, *run_dir.parents] if not p.exists()]
    times = {}
    for d in [run_dir, *run_dir.parents[:1]]:
        nearest = next((q for q in [d, *d.parents] if q.exists()), None)
        if nearest is not None and nearest.is_dir() and nearest not in times:
            st = nearest.stat()
            times[nearest] = (set(os.listdir(nearest)), (st.st_atime_ns, st.st_mtime_ns))
    kept = {}
    for p in (run_dir / n for n in names):
        try:
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                kept[p] = (read_bounded(p, 1 << 16), (st.st_atime_ns, st.st_mtime_ns))
        except OSError:  # not a lock file bnexp wrote: locking it says why
            pass
    return Before(missing, times, kept)


class RunDirGuard:
    """Takes back what one process wrote into a run dir when its config is
    rejected after files were written (problems only found while setting up, e.g.
    a batch larger than the data): exactly the ``files`` it names (Hydra's
    ``.hydra/*.yaml`` and job log), which get their bytes and times back if they
    existed and are removed if not; the lock file and directories that were
    missing ``before`` (see :func:`before_writing`, taken before the lock created
    them) and the directories it created, if they are empty again; and the times
    of the directories whose listing it changed, if nobody else changed them. Nothing else, whoever wrote it: another process's run in a sibling
    dir survives. Made while holding the run dir's lock, so that no other bnexp
    process writes there between the snapshot and the undo.
    """

    def __init__(self, run_dir: Path, files: list[str], before: Before | None = None):
        self.run_dir = Path(run_dir)
        before = before or before_writing(self.run_dir)
        subdirs = {(self.run_dir / f).parent for f in files} - {self.run_dir}
        self.created_files = [p for p in before.missing if p.parent == self.run_dir and p.name == LOCK_FILE]
        dirs = {p for p in before.missing if p not in self.created_files} | {d for d in subdirs if not d.exists()}
        self.created_dirs = sorted(dirs, key=lambda p: len(p.parts), reverse=True)  # deepest first
        self.files: dict[Path, tuple[bytes, tuple[int, int]] | None] = dict(before.kept or {})  # a lock file that was there
        for name in files:
            p = self.run_dir / name
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                self.files[p] = (p.read_bytes(), (st.st_atime_ns, st.st_mtime_ns))
            elif not p.exists():
                self.files[p] = None
        # Directory times come back too, where the listing is as it was (nobody else added to it).
        self.dir_times = dict(before.dir_times)
        for d in subdirs:
            if d.is_dir() and d not in self.created_dirs:
                st = d.stat()
                self.dir_times[d] = (set(os.listdir(d)), (st.st_atime_ns, st.st_mtime_ns))

    def undo(self) -> None:
        root_logger = logging.getLogger()  # close Hydra's log file before removing or restoring it
        for h in list(root_logger.handlers):
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == self.run_dir.resolve():
                h.close()
                root_logger.removeHandler(h)
        for p, before in self.files.items():
            if before is None:
                if p.is_file() or p.is_symlink():
                    p.unlink(missing_ok=True)
            elif p.is_file():
                p.write_bytes(before[0])
                os.utime(p, ns=before[1])
        for p in self.created_files:  # removed while still locked, so nobody else holds it
            p.unlink(missing_ok=True)
        for d in self.created_dirs:  # a directory someone else put files into stays
            try:
                d.rmdir()
            except OSError:
                pass
        for d, (names, ns) in self.dir_times.items():
            try:
                if set(os.listdir(d)) == names:
                    os.utime(d, ns=ns)
            except OSError:
                pass


# --------------------------------------------------------------------------- the one decision


class Action(str, Enum):
    skip = "skip"  # finished earlier with this config: leave it
    resume = "resume"  # unfinished run of this config with a checkpoint: continue it
    train = "train"  # nothing of this config's yet (or nothing to continue from): train from scratch
    refuse = "refuse"  # someone else's: another config, a live process, or not a bnexp run


@dataclass
class Decision:
    action: Action
    reason: str = ""  # one line: why (shown for skip and refuse)
    record: dict[str, Any] | None = None  # the metrics.json there, if any
    live: bool = False  # refused because a live process is training this very run (a sweep skips it)


def world_mismatch(record: dict[str, Any], run_dir: Path) -> str | None:
    """Why ``record``'s run does not fit this process, when it was trained by
    another number of processes (world size is part of config_hash); None if it fits."""
    recorded, here = record.get("world_size") or 1, launch_world_size()
    if recorded == here:
        return None
    again = "bnexp resume" if recorded == 1 else f"torchrun --nproc_per_node={recorded} -m bnexp resume"
    return (f"{run_dir} was trained by {recorded} process(es) and this is a run of {here}; "
            f"continue it as it began (`{again} {run_dir}`) or choose another directory")


def checkpoint_owner(path: Path) -> dict[str, Any] | None:
    """The run a checkpoint names (bnexp.checkpoint.owner), read from its zip
    archive's directory and one small entry, without torch; None where it names
    none (written before checkpoints did, or not a zip: loading it says why)."""
    try:
        with zipfile.ZipFile(path) as z:
            entry = next((i for i in z.infolist() if i.filename.rsplit("/", 1)[-1] == OWNER_ENTRY), None)
            if entry is None or entry.file_size > 4096:
                return None
            owner = json.loads(z.read(entry))
    except (OSError, ValueError, zipfile.BadZipFile, RuntimeError):
        return None
    return owner if isinstance(owner, dict) else None


def foreign_checkpoint(run_dir: Path, record: dict[str, Any], cfg: Any) -> str | None:
    """Why ``run_dir``'s checkpoint belongs to another run than its record and
    config (another config hash or seed: copied from another run dir); None if
    it is this run's, or names no run. The replica index is named, not compared:
    a rerun may stack the same run at another index."""
    ckpt = checkpoint_owner(run_dir / CHECKPOINT)
    if ckpt is None:
        return None
    seed = cfg.get("seed") if hasattr(cfg, "get") else None
    mine = {"config_hash": record.get("config_hash"), "seed": seed}
    if all(ckpt.get(k) == v for k, v in mine.items() if v is not None):
        return None
    name = lambda o: f"seed {o.get('seed')}, config hash {o.get('config_hash')}" + (  # noqa: E731
        f", replica {o['replica']}" if o.get("replica") is not None else "")
    return (f"{run_dir / CHECKPOINT} belongs to another run ({name(ckpt)}; this run: {name(mine)}); resuming from it would "
            f"continue that run here. Put this run's checkpoint back, or delete it to train from scratch")


def is_finished(record: dict[str, Any] | None, cfg: Any) -> bool:
    """Whether ``record`` (a metrics.json) is a finished run of ``cfg``: a rerun skips it."""
    if record is None or record.get("status") not in ("completed", "diverged"):
        return False
    try:
        return hash_matches(record.get("config_hash"), cfg)
    except Exception:  # noqa: BLE001  a config that does not resolve is not that run's; validation says why
        return False


def policy(cfg: Any, run_dir: str | os.PathLike) -> Decision:
    """What to do with ``cfg`` and ``run_dir`` as things stand on disk.

    train, sweep, resume and reproduce all ask this, before they write anything
    and again once they hold the lock (another process may have acted since).
    """
    run_dir = Path(run_dir)
    metrics, ckpt = run_dir / METRICS, run_dir / CHECKPOINT
    record = read_record(run_dir)
    if record is None or not is_bnexp_record(record):
        if metrics.exists():
            return Decision(Action.refuse, f"{run_dir} holds a {METRICS} that bnexp did not write; choose another directory")
        if ckpt.exists():
            return Decision(Action.refuse, f"{run_dir} holds a {CHECKPOINT} but no bnexp {METRICS}; choose another directory")
        return Decision(Action.train)
    if run_is_alive(record):
        return Decision(Action.refuse, str(RunLocked(run_dir, record.get("process"))), record, live=True)
    same = record.get("config_hash") is None or hash_matches(record["config_hash"], cfg)
    world = None if same else world_mismatch(record, run_dir)
    if world:
        return Decision(Action.refuse, world, record)
    if not same:
        return Decision(Action.refuse, f"{run_dir} holds a run of a different config (status {record.get('status')}); "
                                       "choose another directory, or delete that run to reuse its name", record)
    if is_finished(record, cfg):
        return Decision(Action.skip, f"{run_dir}: {record['status']} earlier with the same config", record)
    if record.get("config_hash") is not None and ckpt.is_file() and record.get("status") in ("running", "interrupted", "failed"):
        foreign = foreign_checkpoint(run_dir, record, cfg)
        if foreign:
            return Decision(Action.refuse, foreign, record)
        return Decision(Action.resume, f"{run_dir}: {record.get('status')} at step {record.get('steps')}; resuming from its checkpoint", record)
    return Decision(Action.train, "", record)
