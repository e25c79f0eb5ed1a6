"""Whether a run fits its device's memory, said before the large allocations.

A width typed with three zeros too many (``model.hidden=[100000000]``) would
otherwise allocate gigabytes, thrash for minutes and die with a traceback (or
be killed by the kernel), leaving a run dir behind. Two checks, each a
ConfigError (one line, exit 2, the run dir taken back):

- :func:`check_params_fit`, before the model exists: the model built on
  PyTorch's ``meta`` device (shapes only, no memory; its initializers skipped,
  since meta's random kernels import torch._dynamo, seconds of start-up) gives
  the parameter count; training holds each parameter about PARAM_COPIES times.
- :func:`check_batch_fits`, once the model exists and before the first step:
  the layers' outputs for two examples (an eval-mode forward under no_grad,
  which moves no statistic and draws no random number), times the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.overrides import TorchFunctionMode

from bnexp.config import ConfigError

# Per parameter: the weights, their gradients and up to two optimizer states
# (Adam's moments); per activation: the output kept for backward and its
# gradient. Rough on purpose: it refuses what cannot fit by far.
PARAM_COPIES, ACTIVATION_COPIES = 4, 2


class _NoInit(TorchFunctionMode):
    """Skips torch.nn.init's functions and in-place tensor methods (values do not
    matter for a count of parameters): on meta tensors they import torch._dynamo."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        inplace = name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor)
        if getattr(func, "__module__", None) == "torch.nn.init" or inplace:
            return args[0] if args else next(iter((kwargs or {}).values()))
        return func(*args, **(kwargs or {}))


def param_bytes(cfg: DictConfig, input_shape: tuple[int, ...], num_classes: int) -> tuple[int, int] | None:
    """(count, bytes) of the model's parameters, counted on ``meta``; None where it does not build there."""
    from bnexp.models import build_model

    try:
        with torch.device("meta"), _NoInit():
            model = build_model(cfg.model, cfg.norm, tuple(input_shape), num_classes)
    except Exception:  # noqa: BLE001  an estimate that cannot be made must never stop a run
        return None
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def free_bytes(device: torch.device) -> int | None:
    """Memory free for this process on ``device``: CUDA's free memory; on the CPU
    the kernel's MemAvailable, less where a cgroup limits the process; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:  # cgroup v2: a container's limit, which MemAvailable does not see
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def check_params_fit(cfg: DictConfig, input_shape: tuple[int, ...], num_classes: int, device: torch.device) -> None:
    """ConfigError when the model's parameters, gradients and optimizer state
    alone need more memory than ``device`` has free (before the model exists)."""
    counted, free = param_bytes(cfg, input_shape, num_classes), free_bytes(device)
    if counted is None or free is None or PARAM_COPIES * counted[1] <= free:
        return
    count, params = counted
    key = "model.hidden" if "hidden" in cfg.model else "model.width"
    raise ConfigError(key, f"the model has {count:.3g} parameters: about {_size(PARAM_COPIES * params)} with their gradients "
                           f"and optimizer state, and {device.type} has {_size(free)} free; allowed: a smaller model")


def check_batch_fits(model: nn.Module, examples: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """ConfigError when one training batch's activations need more memory than
    ``device`` has free (the model exists; ``examples``: two of the data's)."""
    free = free_bytes(device)
    if free is None:
        return
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() * out.element_size())
                                     if isinstance(out, torch.Tensor) else None)
             for m in model.modules() if not list(m.children())]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(examples)
    except Exception:  # noqa: BLE001  an estimate that cannot be made must never stop a run
        return
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    need = ACTIVATION_COPIES * sum(sizes) * batch_size / max(1, len(examples))
    if need > free:
        raise ConfigError("train.batch_size", f"{batch_size} examples' activations need about {_size(need)}, and {device.type} "
                                              f"has {_size(free)} free; allowed: a smaller batch (or model)")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
