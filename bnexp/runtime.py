"""The process around a run: which device, how many threads, which seeds,
whether kernels must be deterministic, signals, the garbage collector, the clock."""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this to pick deterministic kernels (PyTorch "Reproducibility" notes).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        # Only switch it off when on: the call imports torch._dynamo (~1.2 s of startup).
        if torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


# The signal a cluster sends ahead of preemption or the time limit: submitit's
# (SUBMITIT_PREEMPT_SIGNAL, USR2 by default; Slurm's --signal). None on Windows.
PREEMPT_SIGNAL = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


@contextmanager
def stop_on_signal() -> Iterator[threading.Event]:
    """SIGINT, SIGTERM, SIGHUP and PREEMPT_SIGNAL ask the loop to stop after the
    current step (the event's ``signum`` says which came); a second SIGINT stops at once."""
    stop = threading.Event()
    stop.signum = None  # type: ignore[attr-defined]
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, _frame):
        stop.signum = stop.signum or signum  # type: ignore[attr-defined]
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    # SIGHUP (the terminal closed, an ssh session dropped) too, unless the process
    # was told to ignore it (nohup): it would otherwise kill the run mid-step, unsaved.
    hangup = getattr(signal, "SIGHUP", None)
    hangup = hangup if hangup is not None and signal.getsignal(hangup) is signal.SIG_DFL else None
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, PREEMPT_SIGNAL, hangup) if s is not None}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Hide everything made before the loop (imports, Hydra's config, data,
    model: ~300k objects) from the cyclic garbage collector until the block
    ends, however it ends. A full collection otherwise scans them all (~100 ms
    on this project's 2-core CPU) and lands in whichever step happens to
    trigger it: 15% of a 1000-step BN-paper MLP run on CPU, and more in a
    sweep's process, where each finished run leaves more behind. The young
    generations are collected first (a few ms), so that setup's fresh garbage
    is not kept for the whole run."""
    gc.collect(1)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()  # back to the oldest generation: collectable once the run lets go of them


def clock(device: torch.device) -> float:
    """Seconds, after the device has finished the work queued so far (CUDA runs
    asynchronously: without the wait, a window's time would miss its last steps)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --------------------------------------------------------------------------- threads
#
# PyTorch's default is one intra-op thread per core. That is a poor default for
# bnexp's small networks on a shared machine (docs/performance.md, "Threads"):
# a step split over every core waits at each op for the thread that lost its
# core to another process, so one competing busy process cut a 500-step run on
# 2 cores from 634 to 175 steps/s where 1 thread held 634; and results depend
# on the thread count (matmul and BN reductions split the work differently).
# ``train.threads=auto`` therefore gives a step below AUTO_MIN_FLOPS of
# matmul/conv work one thread, always (a second thread gains little there even
# on an idle machine, and the choice stays a function of the config), and a
# larger step the CPUs that are idle when the run starts, up to the budget.

# Threads this process was given before bnexp changed anything: OMP_NUM_THREADS
# when set (joblib's loky workers get cpu_count // n_jobs there), else one per
# core. Read once, at import, before any train() sets its own count.
_DEFAULT_THREADS = torch.get_num_threads()

# Forward + backward matmul/conv FLOPs per training step from which auto uses
# more than one thread (benchmarks/bench_threads.py; docs/performance.md).
AUTO_MIN_FLOPS = 2e8

# Set by recorded_threads() while `bnexp resume`/`reproduce` retrain a run.
_recorded_count: int | None = None

log = logging.getLogger("bnexp")


def _cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def share_cores(workers: int) -> None:
    """This process is one of ``workers`` that share the cores (the vectorized
    launcher's worker processes): its budget is its share, as joblib gives each
    worker cpu_count // n_jobs threads."""
    global _DEFAULT_THREADS
    _DEFAULT_THREADS = max(1, thread_budget() // workers)
    torch.set_num_threads(_DEFAULT_THREADS)


def machine_cpus() -> int:
    """The machine's CPUs, which an explicit train.threads is capped at."""
    return os.cpu_count() or 1


# A recorded count above this is no count a run trained with (OpenMP crashes near 100000).
MAX_RECORDED_THREADS = 1024


def thread_budget() -> int:
    """The most intra-op threads a run may use: the process's default count,
    capped by the CPUs it may run on (taskset, cgroup cpusets)."""
    return max(1, min(_DEFAULT_THREADS, len(_cpus())))


def idle_cpus(interval: float = 0.2) -> float:
    """How many of this process's CPUs were idle over the last ``interval`` seconds.

    From /proc/stat's per-CPU idle and iowait time (Linux), sampled while this
    process sleeps, so it counts other processes' load only; elsewhere the CPU
    count minus the 1-minute load average (which lags, and counts this process
    too if it has been busy).
    """
    cpus = _cpus()

    def sample() -> dict[int, tuple[int, int]]:
        times = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                    times[int(name[3:])] = (v[3] + v[4], sum(v))
        return times

    try:
        before = sample()
        time.sleep(interval)
        after = sample()
    except (OSError, ValueError, IndexError):
        return max(0.0, len(cpus) - os.getloadavg()[0])
    return sum((after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1]) for c in after if c in before)


def step_flops(model: torch.nn.Module, example: torch.Tensor, batch_size: int) -> float:
    """Matmul and conv FLOPs of one training step (forward + backward ~ 3x the forward),
    from the shapes every Linear and Conv layer sees in an eval-mode forward
    (BN statistics untouched) of ``example`` twice: a norm without running
    statistics (norm.track_running_stats=false) takes batch statistics in eval
    mode too, and refuses a batch of one.

    The count is torch.utils.flop_counter.FlopCounterMode's (2 x output elements
    x inputs per output, for addmm/mm and convolution; tested equal on every
    family), taken with forward hooks instead: FlopCounterMode's dispatch mode is
    wrapped in torch._disable_dynamo, whose first call imports torch._dynamo,
    ~1.2-1.3 s of every run's start-up (see bnexp.optim)."""
    total = [0]

    def linear(m: torch.nn.Linear, inputs: Any, out: torch.Tensor) -> None:
        total[0] += 2 * out.numel() * m.in_features

    def conv(m: torch.nn.Conv2d, inputs: Any, out: torch.Tensor) -> None:
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    hooks = [m.register_forward_hook(linear if isinstance(m, torch.nn.Linear) else conv)
             for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.cat([example[:1], example[:1]]))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return 3.0 * batch_size * total[0] / 2


def auto_threads(flops: float, budget: int, idle: float) -> int:
    """train.threads=auto's count: 1 for a small step, else the idle CPUs (rounded), 1 to ``budget``."""
    if flops < AUTO_MIN_FLOPS:
        return 1
    return max(1, min(budget, int(idle + 0.5)))


def set_threads(setting: Any, model: torch.nn.Module, example: torch.Tensor, batch_size: int, device: torch.device,
                stack: bool = False) -> int:
    """Set torch's intra-op threads for a run from ``train.threads`` and return the count.

    ``N``: N threads. ``auto``: the count a run being retrained was recorded
    with (see :func:`recorded_threads`); else on CPU one for a ``stack`` of
    replicas, :func:`auto_threads` for a run; on a GPU the budget (the CPU only
    launches kernels there).
    """
    if setting != "auto":
        n, why = int(setting), "train.threads"
        if n > machine_cpus():  # 100000 threads crash OpenMP (SIGSEGV); more than the CPUs gains nothing
            log.warning("train.threads=%d is more than this machine's %d CPUs: capped at %d", n, machine_cpus(), machine_cpus())
            n, why = machine_cpus(), f"train.threads={n}, capped at the machine's CPUs"
    elif _recorded_count is not None:
        n, why = _recorded_count, "as recorded in the run's metrics.json"
    elif device.type != "cpu":
        n, why = thread_budget(), f"auto: {device.type} device"
    elif stack:
        # One thread: no op waits at a barrier for a thread that lost its core, and a
        # replica's numbers do not depend on its stack (a batched matmul of one
        # replica splits its work over two threads otherwise than R replicas' does).
        # The vectorized launcher uses the other cores with stacks of their own.
        n, why = 1, "auto: a stack of replicas, one thread (a core per stack)"
    else:
        flops = step_flops(model, example, batch_size)
        if flops < AUTO_MIN_FLOPS:
            n, why = 1, f"auto: {flops / 1e6:.3g} MFLOP a step, under {AUTO_MIN_FLOPS / 1e6:.0f}"
        else:
            idle = idle_cpus()
            n = auto_threads(flops, thread_budget(), idle)
            why = f"auto: {flops / 1e6:.3g} MFLOP a step; {idle:.1f} of {len(_cpus())} CPUs idle, budget {thread_budget()}"
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _once_on_console()
    log.info("torch threads: %d (%s)", torch.get_num_threads(), why, extra={"console_once": True})
    return torch.get_num_threads()


class _OnceOnConsole(logging.Filter):
    """Lets a record marked ``console_once`` through to the console once per
    process: a sweep's jobs, or the replicas of a stack, each log their thread
    count into their own log file, and the console would repeat it per job."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console_once", False):
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


_CONSOLE_ONCE = _OnceOnConsole()


def _once_on_console() -> None:
    """Install :class:`_OnceOnConsole` on the root logger's console handlers
    (Hydra's, or bnexp resume's), not on its file handlers."""
    for h in logging.getLogger().handlers:
        if type(h) is logging.StreamHandler and _CONSOLE_ONCE not in h.filters:
            h.addFilter(_CONSOLE_ONCE)


@contextmanager
def recorded_threads(cfg: Any, record: dict[str, Any] | None) -> Iterator[None]:
    """While `bnexp resume` or `reproduce` retrain a run with ``train.threads=auto``,
    use the thread count its metrics.json records (env.threads), since results
    depend on it; an explicit ``train.threads=N`` in the config wins. Warns in
    one line when that count cannot be had here, or only on fewer cores.
    """
    global _recorded_count
    n = ((record or {}).get("env") or {}).get("threads")
    if cfg.train.threads != "auto" or not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_RECORDED_THREADS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    got = torch.get_num_threads()
    if got != n:
        log.warning("the run was trained with %d threads, this torch runs %d: results may differ slightly from the run's", n, got)
        n = got
    elif n > thread_budget():
        log.warning("the run was trained with %d threads: retrained with as many for the same results, above this process's "
                    "budget of %d (OMP_NUM_THREADS, CPUs), so slower", n, thread_budget())
    _recorded_count = n
    try:
        yield
    finally:
        _recorded_count = None
        torch.set_num_threads(before)
