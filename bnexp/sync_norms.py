"""Synchronized batch-statistics norms for data-parallel runs (``norm.sync=true``).

In a run of W processes each normalizes only its own share of the global
batch unless its norms are synchronized. :func:`synchronize` replaces every
norm whose registry entry has a ``sync`` trait (BN, ghost BN, batch renorm)
by the twin that trait makes: it shares the norm's parameters and buffers but
takes its training statistics from the whole global batch (a ghost BN whose
virtual batch spans several devices: from those devices), as if one process
had normalized the concatenated batch. Each twin lives with its norm
(``bnexp/norms/<name>.py``), built from :mod:`bnexp.norms.sync`, which also
says why bnexp has synchronized norms of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from bnexp.norms import entry_of, running_stats
from bnexp.norms.batch import CudaSyncBatchNorm, SyncBatchNorm
from bnexp.norms.batch_renorm import SyncBatchRenorm
from bnexp.norms.ghost_batch import SyncGhostBatchNorm
from bnexp.norms.sync import AllGather, group_moments

__all__ = ["AllGather", "CudaSyncBatchNorm", "SyncBatchNorm", "SyncBatchRenorm", "SyncGhostBatchNorm", "group_moments",
           "per_device_buffers", "synchronize"]


def _twin(norm: nn.Module, per_device_batch: int, world: int, cuda: bool) -> nn.Module | None:
    """The synchronized twin of ``norm`` (None: it needs none, or is one)."""
    entry = entry_of(norm)
    if entry is None or entry.sync is None or type(norm) in entry.twins:
        return None
    return entry.sync(norm, per_device_batch, world, cuda)


def synchronize(model: nn.Module, per_device_batch: int, world: int, cuda: bool) -> nn.Module:
    """Replace, in place, every batch-statistics norm of ``model`` by its
    synchronized twin, which takes over the norm's own parameters and buffers
    (so optimizer, checkpoint keys and TensorBoard names stay what they were).

    Written here rather than through torch.nn.SyncBatchNorm.convert_sync_batchnorm,
    which makes plain torch SyncBatchNorms only: it would drop bnexp's fp32 mixin
    and skip ghost BN and batch renorm."""
    for name, child in list(model.named_children()):
        twin = _twin(child, per_device_batch, world, cuda)
        if twin is None:
            synchronize(child, per_device_batch, world, cuda)
            continue
        for key, value in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
            setattr(twin, key, value)
        for key in ("weight", "bias"):  # center=false / scale=false: no parameter at all
            if getattr(child, key, None) is None:
                twin.register_parameter(key, None)
        twin.train(child.training)
        setattr(model, name, twin)
    return model


def per_device_buffers(model: nn.Module, world: int) -> list[torch.Tensor]:
    """The running statistics that each rank moves on its own: those of every
    norm not synchronized over all ranks. Averaged across ranks after every
    step, they are what one process's ghost BN over the global batch keeps
    (the mean of its virtual batches' statistics: the update is linear)."""
    out = []
    for m in model.modules():
        entry = entry_of(m)
        full = getattr(m, "ranks_per_group", 0) == world  # a twin over every rank
        if entry is not None and entry.batch_stats and not full and m.track_running_stats:
            out += list(running_stats(m))
    return out
