"""On-device augmentation of training batches (``data.augment``).

``crop_flip`` is the standard CIFAR augmentation (He et al. 2016, Sec. 4.2:
"4 pixels are padded on each side, and a 32x32 crop is randomly sampled from
the padded image or its horizontal flip"), done per batch on the training
device as cifar10-airbench does, with no DataLoader and no host round trip:
the batch is zero-padded, and one ``gather`` picks every example's crop, mirrored
or not. Zero is the padding value in the preprocessed space (with
``data.preprocess=standardize``, the training split's mean pixel).

The random offsets and flips come from the run's own generator on the device,
seeded from the run's seed; the generator's state is a stateful part of the
run (checkpointed as ``augment``), so a resumed run draws exactly the crops an
uninterrupted one draws. torchvision's ``RandomCrop`` and ``RandomHorizontalFlip``
work on one image at a time through the global RNG; this does a whole batch in
a handful of kernels from a generator that a checkpoint can hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from bnexp.config import Augment, ConfigError, DataName, example_shape

PAD = 4  # pixels on each side (He et al. 2016, Sec. 4.2)


def check(cfg: DictConfig) -> None:
    """``data.augment`` other than none needs images."""
    if Augment(cfg.data.augment) == Augment.none:
        return
    shape = example_shape(cfg.data)
    if len(shape) != 3:
        raise ConfigError("data.augment", f"{Augment(cfg.data.augment).value} crops and flips images [C,H,W], but data={DataName(cfg.data.name).value} "
                                          f"gives examples of shape {list(shape)}; allowed: none, or image data (mnist, fashion_mnist, cifar10, "
                                          "synthetic with a 3-D data.shape)")


class NoAugment:
    """``data.augment=none``: the batch as it is; nothing to checkpoint."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def state_dict(self) -> dict[str, Any]:
        return {"kind": Augment.none.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind", Augment.none.value) != Augment.none.value:
            raise ValueError(f"the checkpoint's augmentation is {state.get('kind')}, this run's is none")


class CropFlip:
    """Random crop of a ``PAD``-pixel zero-padded image and a horizontal flip with
    probability 1/2, drawn independently for every example of every batch."""

    def __init__(self, seed: int, device: torch.device, pad: int = PAD):
        self.pad, self.device = pad, device
        # A seed of its own, derived from the run's: the sampler's CPU generator is
        # seeded with the run's seed itself, and on CPU the same seed would draw
        # the same stream for both.
        own_seed = int(np.random.SeedSequence([seed, 0x63726F70]).generate_state(1)[0])
        self.gen = torch.Generator(device=device).manual_seed(own_seed)

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets [2, n] in 0..2*pad: rows, columns; flips [n] in {0, 1}), from this run's generator."""
        offsets = torch.randint(0, 2 * self.pad + 1, (2, n), generator=self.gen, device=self.device)
        flips = torch.randint(0, 2, (n,), generator=self.gen, device=self.device)
        return offsets, flips

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        (dy, dx), flips = self.draw(n)
        padded = F.pad(x, (self.pad,) * 4)
        wp = w + 2 * self.pad
        rows = dy[:, None] + torch.arange(h, device=x.device)  # [n, h]
        cols = torch.arange(w, device=x.device).expand(n, w)
        cols = dx[:, None] + torch.where(flips[:, None].bool(), w - 1 - cols, cols)  # [n, w], mirrored for flipped examples
        # One gather over the flattened padded image does the crop and the flip together.
        index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
        return padded.reshape(n, c, -1).gather(2, index).reshape(n, c, h, w)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": Augment.crop_flip.value, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != Augment.crop_flip.value:
            raise ValueError(f"the checkpoint's augmentation is {state.get('kind')}, this run's is crop_flip")
        self.gen.set_state(state["gen"])


def make_augment(data_cfg: DictConfig, seed: int, device: torch.device) -> NoAugment | CropFlip:
    if Augment(data_cfg.augment) == Augment.crop_flip:
        return CropFlip(seed, device)
    return NoAugment()
