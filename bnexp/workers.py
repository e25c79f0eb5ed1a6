"""Units of work on forked single-purpose worker processes, for the vectorized
launcher (``hydra/launcher=vectorized``): each worker takes the next unit (a
stack of replicas, or a job alone) until none is left, and sends back what it
returned or raised.

Why processes and not threads: torch's default RNG, its thread count, the
frozen garbage collector and signal handlers belong to a process, and a stack
swaps RNG states and freezes the collector around its loop; and the GIL would
serialize the Python half of a small network's step. Why not two OpenMP
threads per op: every op then ends at a barrier that waits for the thread
whose core another process took (a 6-27x collapse measured on a shared
2-core machine); two workers with one thread each never wait for each other.

Why fork: a worker starts in milliseconds with the parent's imports, composed
configs and loaded data (copy-on-write), where a spawned one would import
torch, Hydra and bnexp again (~2-4 s each on a 2-core machine). A worker sets
its thread count before any op (torch's OpenMP pool is not fork-safe for
parallel regions; one thread runs none) and CUDA is never touched in one (the
launcher uses workers only when every job trains on the CPU).

Signals: a worker shares its parent's process group, so a Ctrl-C at the
terminal reaches it directly; the parent also hands each SIGINT/SIGTERM it
gets on as SIGTERM (for a ``kill`` of the parent alone), which a training loop
takes like its first Ctrl-C. No new unit starts after a signal; the parent
waits for every worker to wind down (checkpoints saved) before it returns.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass
class Raised:
    """A unit raised ``error`` (``text``: its traceback, for an error that does not pickle)."""

    error: BaseException | None
    text: str


@dataclass
class Lost:
    """The worker running the unit died (killed, out of memory) before it answered."""

    exitcode: int | None


def can_fork() -> bool:
    """Workers are forked on Linux only: macOS's system libraries are not fork-safe
    (Python defaults to spawn there), and Windows has no fork."""
    return sys.platform.startswith("linux")


def run(units: Sequence[Callable[[], Any]], workers: int, init: Callable[[int], None]) -> list[Any]:
    """``units[i]()`` for every i, on ``workers`` forked processes, in the order
    given (put the longest first); ``init(w)`` runs first in worker w. Returns,
    per unit, what it returned, a :class:`Raised`, a :class:`Lost`, or None if it
    never started (a signal came first). A signal is re-raised here as
    KeyboardInterrupt once every worker has ended, unless a unit raised one (then
    the caller finds it among the results)."""
    ctx = multiprocessing.get_context("fork")
    tasks, stop = ctx.SimpleQueue(), ctx.Event()
    for i in range(len(units)):
        tasks.put(i)
    for _ in range(workers):
        tasks.put(None)
    pipes = [ctx.Pipe(duplex=False) for _ in range(workers)]
    sys.stdout.flush()
    sys.stderr.flush()
    procs = [ctx.Process(target=_worker, args=(w, units, init, tasks, stop, pipes[w][1]), daemon=False) for w in range(workers)]
    signals: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        signals.append(signum)
        stop.set()
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signal.SIGTERM)

    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        for p in procs:
            p.start()
        for _, send in pipes:
            send.close()  # the parent's copy: a worker's end of file then means it is gone
        results = _collect(len(units), procs, [recv for recv, _ in pipes])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if signals and not any(isinstance(r, Raised) and isinstance(r.error, KeyboardInterrupt) for r in results):
        raise KeyboardInterrupt
    return results


def _collect(n: int, procs: list, conns: list) -> list[Any]:
    """Every worker's answers until all have ended; a unit whose worker died unanswered is Lost."""
    results: list[Any] = [None] * n
    running: dict[int, int] = {}  # worker -> the unit it started
    live = dict(enumerate(conns))
    while live:
        for conn in multiprocessing.connection.wait(list(live.values())):
            w = next(k for k, c in live.items() if c is conn)
            try:
                kind, i, value = conn.recv()
            except (EOFError, OSError):  # the worker is gone
                del live[w]
                procs[w].join()
                if w in running:
                    results[running.pop(w)] = Lost(procs[w].exitcode)
                continue
            if kind == "start":
                running[w] = i
            else:
                running.pop(w, None)
                results[i] = value
    return results


def _worker(w: int, units: Sequence[Callable[[], Any]], init: Callable[[int], None], tasks: Any, stop: Any, conn: Any) -> None:
    # The parent's handlers and its wakeup fd (the CLI counts signals through it) are not this process's.
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    code = 0
    try:
        init(w)
        while not stop.is_set():
            i = tasks.get()
            if i is None:
                break
            conn.send(("start", i, None))
            try:
                value = units[i]()
            except BaseException as e:  # noqa: BLE001  sent to the parent, which decides
                value = Raised(e, traceback.format_exc())
            _send(conn, i, value)
            if isinstance(value, Raised) and isinstance(value.error, KeyboardInterrupt):
                break
    except BaseException:  # noqa: BLE001  (a signal between units)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Not sys.exit: the parent's atexit handlers and threads are not this process's to run or join.
        os._exit(code)


def _send(conn: Any, i: int, value: Any) -> None:
    try:
        data = pickle.dumps(("done", i, value))
        pickle.loads(data)  # an exception whose __init__ takes other arguments than its args pickles, then fails to load
    except Exception:  # noqa: BLE001  an answer that does not travel: its words
        data = pickle.dumps(("done", i, Raised(None, value.text if isinstance(value, Raised) else repr(value))))
    conn.send_bytes(data)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
