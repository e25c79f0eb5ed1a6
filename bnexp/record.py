"""A run's metrics.json as other processes see it: reading it, and telling a
live ``running`` run from a dead one. Standard library only, so that
``bnexp runs`` and ``bnexp report`` never import torch.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from bnexp.io import read_json

HEARTBEAT_SEC = 10.0


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
