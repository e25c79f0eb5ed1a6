"""Data-parallel runs: ``torchrun --nproc_per_node=N -m bnexp train ...`` trains
one run with N processes (ranks) and DistributedDataParallel.

nanoGPT's economy: every rank runs the same code on the same config; only
rank 0 (the master) writes (lock, metrics.json, events, checkpoint); the step
trains through the DDP wrapper while everything else (evaluation, probes,
checkpoints) sees the raw model, whose parameters and buffers are the same on
every rank after every step. What that takes, all of it here:

- :func:`current`: this process's :class:`Ranks`, the process group started
  from torchrun's environment (gloo for CPU tensors, NCCL for CUDA ones).
- :func:`lead`: decisions that read the disk (skip, resume, refuse) are rank
  0's alone; the other ranks learn the outcome, and when rank 0 begins to
  train (:func:`training`, under its lock) they train too, into rank 0's run
  dir, with rank 0's config.
- :meth:`Ranks.sampler`, :meth:`Ranks.window`, :meth:`Ranks.models`,
  :meth:`Ranks.tracker`: a rank's share of each step's global batch, logging
  windows averaged over ranks, synchronized norms and the DDP wrapper, and a
  tracker that writes nothing on the followers.
- :meth:`Ranks.any`: stop and divergence decisions all-reduced, so every rank
  leaves the loop at the same step and none waits forever in a collective.

With one process (no torchrun) every part is the single-process one.
"""

from __future__ import annotations

import atexit
import inspect
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bnexp.config import ConfigError, RankStopped, TrainConfig, launch_world_size  # RankStopped: torch-free, for the CLI
from bnexp.rundir import RunRecord, run_lock
from bnexp.runtime import pick_device
from bnexp.step import LogWindow, Sampler
from bnexp.sync_norms import per_device_buffers, synchronize
from bnexp.tracking import Console_, Tracker


@dataclass
class Go:
    """Rank 0 has begun to train: a follower trains this run too."""

    run_dir: str
    config: dict  # rank 0's config, plain
    resume: bool


class Ranks:
    """This process's place in its run: rank ``rank`` of ``world_size``."""

    def __init__(self, world_size: int = 1, rank: int = 0, local_rank: int = 0):
        self.world_size, self.rank, self.local_rank = world_size, rank, local_rank
        self.is_master = rank == 0
        self._leading = self._went = False

    # ---------------------------------------------------------------- the process

    def device(self, name: str) -> torch.device:
        """train.device for this rank: on CUDA, each rank its own GPU (cuda:LOCAL_RANK)."""
        if self.world_size == 1 or name == "cpu":
            return pick_device(name)
        if name in ("auto", "cuda") and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def record(self, device: torch.device) -> dict[str, Any]:
        """metrics.json's account of the processes that train the run."""
        backend = None if self.world_size == 1 else ("nccl" if device.type == "cuda" else "gloo")
        return {"world_size": self.world_size, "backend": backend}

    def set_timeout(self, seconds: float) -> None:
        """How long this rank waits in a collective for the others (train.dist_timeout):
        then the collective raises, and the run ends as failed (resumable) instead
        of waiting on a stuck peer for the backend's default (gloo: 30 minutes).
        Through torch's ``_set_pg_timeout`` (private, there since torch 2.3): the
        public way, a timeout given to ``init_process_group``, comes before the
        config is known (a resume's followers learn it from rank 0)."""
        if self.world_size > 1 and hasattr(dist.distributed_c10d, "_set_pg_timeout"):
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=float(seconds)))

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a CPU all-reduce: through gloo, no GPU sync)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def stop_vote(self) -> "StopVote":
        """One run's per-step vote on stopping (a signal reaches the ranks at
        different steps): ``vote(asked)`` is whether any rank was asked to stop
        by the step before, the same answer on every rank. Each step starts the
        all-reduce of its own flag and reads the previous step's, so no step
        waits for a round trip (the stop comes one step after the signal).
        ``vote.settle()`` after the loop waits for the last one."""
        return StopVote(self.world_size)

    def _send(self, message: tuple) -> None:
        dist.broadcast_object_list([message], src=0, device=torch.device("cpu"))

    def _receive(self) -> tuple:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    # ---------------------------------------------------------------- one run's parts

    def sampler(self, n: int, batch_size: int, seed: int, device: torch.device) -> Sampler:
        return Sampler(n, batch_size, seed, device) if self.world_size == 1 else ShardedSampler(n, batch_size, seed, device, self)

    def window(self, log_every: int, total: int, batch_size: int, num_classes: int, device: torch.device,
               accuracy: bool = True) -> LogWindow:
        cls = LogWindow if self.world_size == 1 else RanksWindow
        return cls(log_every, total, batch_size, num_classes, device, accuracy=accuracy)

    def models(self, model: nn.Module, norm: DictConfig, batch_size: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
        """(the raw model, the model the step trains through). With several
        ranks, norm.sync=true synchronizes the batch-statistics norms, and the
        step model is the DDP wrapper, which averages gradients across ranks."""
        if self.world_size == 1:
            return model, model
        if norm.sync:
            synchronize(model, batch_size // self.world_size, self.world_size, device.type == "cuda")
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **_NO_BUFFER_SYNC)
        return model, ddp

    def share_running_stats(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Average the running statistics that each rank moves alone (per-device
        norms) across ranks after every optimizer step: then every rank holds
        the same buffers at every step, and they are those of one process's
        ghost BN over the global batch. (DDP's broadcast of rank 0's buffers
        would keep rank 0's alone. After the step, not in a forward hook:
        torch's BatchNorm keeps its running statistics for backward.) A step
        that fp16's GradScaler skips leaves its update to the next one's."""
        buffers = per_device_buffers(model, self.world_size) if self.world_size > 1 else []
        if buffers:
            optimizer.register_step_post_hook(lambda *args: _average(buffers, self.world_size))

    def tracker(self, run_dir: Path, hparams: dict[str, Any], total_steps: int, progress: bool,
                base_record: dict[str, Any], purge_step: int | None = None) -> Tracker:
        cls = Tracker if self.is_master else FollowerTracker
        return cls(run_dir, hparams, total_steps, progress, base_record, purge_step=purge_step)


class StopVote:
    """See :meth:`Ranks.stop_vote`."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.pending: list[tuple[Any, torch.Tensor]] = []  # (the all-reduce in flight, its flag)

    def __call__(self, asked: bool) -> bool:
        if self.world_size == 1:
            return asked
        flag = torch.tensor([int(asked)])
        self.pending.append((dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag))
        if len(self.pending) == 1:
            return False
        work, previous = self.pending.pop(0)
        work.wait()
        return bool(previous.item())

    def settle(self) -> None:
        """Wait for the vote still in flight (every rank leaves the loop after the
        same step, so every rank started it). Left in flight, it completes on a
        gloo worker thread, which then frees the flag tensor and needs the GIL:
        if the interpreter is finalizing by then (a follower exits before rank 0
        has voted), the thread is killed inside a C++ destructor and the rank
        dies of SIGABRT ("terminate called without an active exception")."""
        while self.pending:
            work, _ = self.pending.pop(0)
            work.wait()


# DDP need not send rank 0's buffers before each forward (they are the same
# everywhere); torch 2.13 renamed broadcast_buffers (now deprecated) to forward_sync_buffers.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})


def _average(tensors: list[torch.Tensor], world: int) -> None:
    """Average ``tensors`` across ranks in place, in one all-reduce."""
    with torch.no_grad():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


_RANKS: Ranks | None = None


def current() -> Ranks:
    """This process's Ranks; under torchrun the first call joins the process
    group (gloo, plus NCCL for CUDA tensors where there is a GPU)."""
    global _RANKS
    if _RANKS is None:
        world = launch_world_size()
        if world == 1:
            _RANKS = Ranks()
        else:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if not dist.is_initialized():
                # Until a run sets its own (train.dist_timeout), the default's.
                timeout = timedelta(seconds=TrainConfig.dist_timeout)
                if torch.cuda.is_available():
                    torch.cuda.set_device(local)
                    # One group for both: object messages and votes are CPU
                    # tensors (gloo, no GPU sync); gradients are CUDA tensors (NCCL).
                    dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
                else:
                    dist.init_process_group("gloo", timeout=timeout)
                atexit.register(dist.destroy_process_group)  # as nanoGPT does at its end; NCCL warns of a leak otherwise
            _RANKS = Ranks(dist.get_world_size(), dist.get_rank(), local)
    return _RANKS


def scratch_dir() -> str:
    """A follower rank's place for what Hydra writes of every job (.hydra/, its
    log): its own, removed when the process ends. The run dir is rank 0's."""
    path = tempfile.mkdtemp(prefix=f"bnexp-rank{current().rank}-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# --------------------------------------------------------------------------- rank 0 decides


def lead(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 alone: the checks of a run dir and then, perhaps,
    :func:`training`. A follower returns what rank 0's ``fn`` returned, raises
    what it raised (a ConfigError as itself, a Ctrl-C as KeyboardInterrupt,
    anything else as RankStopped), or, once rank 0 begins to train, gets a
    :class:`Go` (and then trains too)."""
    ranks = current()
    if ranks.world_size == 1:
        return fn()
    if not ranks.is_master:
        kind, payload = ranks._receive()
        if kind == "go":
            return Go(**payload)
        if kind == "return":
            return payload
        if kind == "config":
            error = ConfigError(payload[0], "")
            error.args = (payload[1],)
            raise error
        if kind == "interrupt":
            raise KeyboardInterrupt
        raise RankStopped(1, payload)
    ranks._leading, ranks._went = True, False
    try:
        value = fn()
    except BaseException as e:
        if not ranks._went:
            if isinstance(e, ConfigError):
                ranks._send(("config", (e.key, str(e))))
            else:
                ranks._send(("interrupt", None) if isinstance(e, KeyboardInterrupt) else ("error", f"{type(e).__name__}: {e}"))
        raise
    finally:
        ranks._leading = False
    if not ranks._went:
        ranks._send(("return", value))
    return value


@contextmanager
def training(run_dir: Path, cfg: DictConfig, resume: bool) -> Iterator[None]:
    """Around a run's training: rank 0 holds the run dir's lock (and, inside
    :func:`lead`, tells the followers to train); the followers take none."""
    ranks = current()
    if not ranks.is_master:
        yield
        return
    with run_lock(run_dir):
        if ranks._leading and not ranks._went:
            ranks._went = True
            config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            ranks._send(("go", {"run_dir": str(run_dir), "config": config, "resume": resume}))
        yield


# --------------------------------------------------------------------------- a rank's parts


class ShardedSampler(Sampler):
    """Rank r's share of each step's global batch: examples [r*b, (r+1)*b) of
    it, b = batch_size / world. Every rank draws the same permutation (same
    seed), so the shares never overlap and together are the global batch;
    the state (and so the checkpoint) is the global sampler's."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device, ranks: Ranks):
        super().__init__(n, batch_size, seed, device)
        share = batch_size // ranks.world_size
        self.lo, self.hi = ranks.rank * share, (ranks.rank + 1) * share

    def next(self) -> torch.Tensor:
        return super().next()[self.lo : self.hi]


class RanksWindow(LogWindow):
    """The logging window of the global batch: folded columns are averaged
    (losses: each rank's is the mean over its equal share) and summed (correct
    counts) across ranks, so every rank holds the global per-step values,
    checkpoints them, and sees the same first non-finite step."""

    def fold(self, step: int) -> None:
        pending = len(self.losses)  # (a regression's window keeps no logits)
        super().fold(step)
        if not pending:
            return
        last = step - self.start(step)
        cols = self.buf[:, last - pending : last]
        values = cols.contiguous()
        dist.all_reduce(values)
        values[0] /= dist.get_world_size()
        cols.copy_(values)


class _NoEvents:
    """A follower's stand-in for the SummaryWriter (and its file_writer)."""

    file_writer = property(lambda self: self)

    def add_summary(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _MemoryRecord(RunRecord):
    """metrics.json kept in memory only."""

    def write(self, **updates: Any) -> None:
        self.data.update(updates)


class FollowerTracker(Tracker):
    """A follower rank's tracker: the values rank 0's has (final, best, the
    record), nothing written and nothing shown."""

    def __init__(self, run_dir: Path, hparams: dict[str, Any], total_steps: int, progress: bool,
                 base_record: dict[str, Any], purge_step: int | None = None):
        self.writer = _NoEvents()  # type: ignore[assignment]
        self.record = _MemoryRecord(run_dir, base_record)
        self.final = dict(base_record.get("final", {}))
        self.best = dict(base_record.get("best", {}))
        self.console = Console_(total_steps, False, title=run_dir.name)
