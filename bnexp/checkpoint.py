"""What a checkpoint holds and how a run comes back from it: the loop's own
state, the RNG states, and the state_dict of every stateful part of a run
(model, optimizer, schedule, grad scaler, sampler, logging window,
augmentation).

Saved atomically (temp file + rename); loaded with ``weights_only=True``, so a
checkpoint holds tensors and plain containers, never code.
"""

from __future__ import annotations

import copy
import json
import random
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from bnexp.config import ConfigError
from bnexp.io import atomic_write
from bnexp.rundir import OWNER_ENTRY

FORMAT = 1
# The stateful parts a run checkpoints, by key (format 1's keys; see Run.parts in bnexp.train).
PARTS = ("model", "optimizer", "scheduler", "scaler", "sampler", "window")
KEYS = (*PARTS, "rng", "state", "final", "best")
# Parts added after format 1 was first written, with the state a checkpoint
# written before them implies (there was no augmentation then): saved always,
# and a checkpoint without one restores that state (a run with augmentation
# refuses it as not fitting its config).
LATER_PARTS: dict[str, Any] = {"augment": {"kind": "none"}}


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> Any: ...


@dataclass
class LoopState:
    """What the loop carries between steps besides its stateful parts."""

    step: int = 0
    steps_to_target: int | None = None
    diverged: dict[str, Any] | None = None
    train_time: float = 0.0  # seconds spent in this run's loop, over all resumes
    done: bool = False  # the final eval and test are logged; only the status is left to write

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopState":
        # Checkpoints written before the window's start was derived also hold window_start_step.
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    name, key, *rest = s["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _compact(obj: Any) -> Any:
    """``obj`` with every tensor that views part of a larger storage copied out:
    torch.save writes a view's whole storage, so a replica's slice of a stacked
    model (bnexp.replicas) would otherwise carry every replica into its checkpoint."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size() else obj
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type and attributes (a module state_dict's _metadata)
        out.update((k, _compact(v)) for k, v in obj.items())
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_compact(v) for v in obj)
    return obj


def owner(record: dict[str, Any], seed: int) -> dict[str, Any]:
    """The run a checkpoint belongs to, from its metrics.json record: config hash,
    seed, and replica index in a stack (None alone). See bnexp.rundir.foreign_checkpoint."""
    replica = record.get("replica")
    return {"config_hash": record.get("config_hash"), "seed": int(seed),
            "replica": replica.get("index") if isinstance(replica, dict) else None}


def save(path: Path, parts: dict[str, Stateful], state: LoopState, final: dict[str, float], best: dict[str, float],
         run: dict[str, Any] | None = None) -> None:
    """``run``: :func:`owner`, written beside the pickle as a small JSON entry of
    the checkpoint's zip archive, so that deciding whether to resume reads it
    without loading the checkpoint (or torch)."""
    ckpt = {"format": FORMAT, **{k: _compact(parts[k].state_dict()) for k in (*PARTS, *LATER_PARTS)}, "rng": rng_state(),
            "state": asdict(state), "final": dict(final), "best": dict(best)}

    def write(f: Any) -> None:
        torch.save(ckpt, f)
        if run is not None:
            with zipfile.ZipFile(f, "a") as z:  # torch.load reads records by name and ignores this one
                z.writestr(f"{z.namelist()[0].split('/')[0]}/{OWNER_ENTRY}", json.dumps(run))

    atomic_write(path, write, mode="w+b")


def _check_archive(path: Path) -> None:
    """What the checkpoint's zip archive claims to hold, from its directory, before
    torch inflates anything: torch.save stores its entries uncompressed, so a
    checkpoint holds no more than its size on disk. An archive that claims more
    is compressed (a zip bomb inflates kilobytes to gigabytes): refused unread."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            claimed = sum(i.file_size for i in z.infolist())
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise ConfigError("checkpoint", f"{path} is not a readable bnexp checkpoint ({type(e).__name__}); delete it to start over") from None
    if claimed > size + _ARCHIVE_SLACK:
        raise ConfigError("checkpoint", f"{path} claims {claimed / 2**20:.1f} MiB in a file of {size / 2**20:.2f} MiB (compressed: "
                                        "bnexp writes checkpoints uncompressed), refused before loading; delete it to start over")


_ARCHIVE_SLACK = 1 << 20  # bytes: more than the zip directory's own size, far less than any bomb


def load(path: Path) -> dict[str, Any]:
    """weights_only=True: a pickle that would import or call anything is refused, not run."""
    _check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  torch raises many types for a bad file
        raise ConfigError("checkpoint", f"{path} is not a readable bnexp checkpoint ({type(e).__name__}); delete it to start over") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or not all(k in ckpt for k in KEYS):
        raise ConfigError("checkpoint", f"{path} is not a bnexp checkpoint (format {FORMAT} with {', '.join(KEYS)})")
    return ckpt


def restore(ckpt: dict[str, Any], parts: dict[str, Stateful], path: Path) -> LoopState:
    """Load every part's state and the RNG states; returns the loop state. A
    checkpoint of another config (other shapes, another optimizer) is a ConfigError."""
    try:
        for k in PARTS:
            parts[k].load_state_dict(ckpt[k])
        for k, implied in LATER_PARTS.items():
            parts[k].load_state_dict(ckpt.get(k, implied))
        set_rng_state(ckpt["rng"])
        return LoopState.from_dict(ckpt["state"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError("checkpoint", f"{path} does not fit this run's config ({type(e).__name__}: {str(e).splitlines()[0]})") from None
