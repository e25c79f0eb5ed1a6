"""The process around a run: which device, how many threads, which seeds,
whether kernels must be deterministic, signals, the garbage collector, the clock."""

from __future__ import annotations

import gc
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

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
    """SIGINT, SIGTERM and PREEMPT_SIGNAL ask the loop to stop after the current
    step (the event's ``signum`` says which came); a second SIGINT stops at once."""
    stop = threading.Event()
    stop.signum = None  # type: ignore[attr-defined]
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, _frame):
        stop.signum = stop.signum or signum  # type: ignore[attr-defined]
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, PREEMPT_SIGNAL) if s is not None}
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
