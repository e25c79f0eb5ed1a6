"""Datasets as tensors on the training device: generation, splits, preprocessing.

Small datasets fit in device memory many times over, so there is no DataLoader:
the training loop indexes these tensors with a seeded permutation
(see :class:`bnexp.step.Sampler`). Examples keep their natural shape ([D]
features, [C, L] signals, [C, H, W] images): adapting it is the model's job.
File formats and downloads of the real datasets live in :mod:`bnexp.datasets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from bnexp import data_cache
from bnexp.config import IN_MEMORY_DATA, ConfigError, DataName, Preprocess


@dataclass
class Splits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def regression(self) -> bool:
        """Real-valued targets (no classes, no accuracy); ``num_classes`` is then the output size."""
        return self.y_train.is_floating_point()


def synthetic(cfg: DictConfig) -> dict:
    """Gaussian class clusters: class k ~ N(mu_k, cluster_std^2 I), mu_k ~ N(0, I)."""
    rng = np.random.default_rng(cfg.seed)
    shape = tuple(cfg.shape)
    centers = rng.standard_normal((cfg.num_classes, *shape)).astype(np.float32)

    def draw(n: int):
        y = rng.integers(0, cfg.num_classes, n)
        x = centers[y] + cfg.cluster_std * rng.standard_normal((n, *shape)).astype(np.float32)
        return x.astype(np.float32), y.astype(np.int64)

    x_train, y_train = draw(cfg.n_train)
    x_test, y_test = draw(cfg.n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "num_classes": cfg.num_classes}


def drug_trial(cfg: DictConfig) -> dict:
    """The Keras BN tutorial's made-up trial: age (13-100) -> had side effects.

    2100 training people, half under 65; 95% of those 65 or older had side
    effects and 95% of the younger did not (50 + 50 exceptions, 1000 + 1000
    typical cases); 420 test people drawn the same way (10 + 10, 200 + 200).
    """
    rng = np.random.default_rng(cfg.seed)

    def draw(n_exception: int, n_typical: int):
        young = lambda n: rng.integers(13, 65, n)  # noqa: E731  13..64
        old = lambda n: rng.integers(65, 101, n)  # noqa: E731  65..100
        ages = np.concatenate([young(n_exception), old(n_exception), young(n_typical), old(n_typical)])
        labels = np.concatenate([np.ones(n_exception), np.zeros(n_exception), np.zeros(n_typical), np.ones(n_typical)])
        order = rng.permutation(len(ages))
        return ages[order, None].astype(np.float32), labels[order].astype(np.int64)

    x_train, y_train = draw(50, 1000)
    x_test, y_test = draw(10, 200)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "num_classes": 2}


def linear_regression(cfg: DictConfig) -> dict:
    """Santurkar et al. 2018's deep-linear-net task: x ~ N(0, I) of ``data.shape``
    (flattened to D features), y = A x for one fixed A ~ N(0, 1) of out_dim x D
    (square when ``data.out_dim`` is null). Train and test come from one draw of A."""
    rng = np.random.default_rng(cfg.seed)
    d = int(np.prod(cfg.shape))
    out = d if cfg.out_dim is None else int(cfg.out_dim)
    a = rng.standard_normal((out, d))

    def draw(n: int):
        x = rng.standard_normal((n, *cfg.shape))
        return x.astype(np.float32), (x.reshape(n, d) @ a.T).astype(np.float32)

    x_train, y_train = draw(cfg.n_train)
    x_test, y_test = draw(cfg.n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "num_classes": out}


def load_arrays(cfg: DictConfig) -> dict:
    name = DataName(cfg.name)
    if name == DataName.synthetic:
        return synthetic(cfg)
    if name == DataName.linear_regression:
        return linear_regression(cfg)
    if name == DataName.drug_trial:
        return drug_trial(cfg)
    from bnexp import datasets

    return datasets.load_arrays(name.value, cfg.root, cfg.download)


def split_train_val(n: int, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation parts, the same for the same seed."""
    n_val = int(round(val_size * n)) if val_size < 1 else int(val_size)
    if n_val >= n:
        raise ConfigError("data.val_size", f"asks for {n_val} validation examples out of {n}; allowed: fewer than {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _stat_dims(x: np.ndarray) -> tuple[int, ...]:
    # Flat features: one statistic per feature (like scikit-learn's scalers).
    # Signals and images [N, C, ...]: one per channel (like torchvision's Normalize).
    return (0,) if x.ndim == 2 else (0,) + tuple(range(2, x.ndim))


def fit_preprocess(x_train: np.ndarray, how: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) from the training split only; apply as (x - shift) / scale."""
    dims, x = _stat_dims(x_train), x_train
    if how == Preprocess.minmax:
        lo, hi = x.min(axis=dims, keepdims=True), x.max(axis=dims, keepdims=True)
        shift, scale = lo.astype(np.float64), hi.astype(np.float64) - lo
    elif how == Preprocess.standardize:
        shift = x.mean(axis=dims, keepdims=True, dtype=np.float64)
        scale = x.std(axis=dims, keepdims=True, dtype=np.float64)
    else:
        return np.zeros((1,) * x.ndim), np.ones((1,) * x.ndim)
    scale = np.where(scale > 0, scale, 1.0)  # constant features (blank border pixels) stay put
    return shift[0:1], scale[0:1]


# The last load's key and result; see load().
_last: tuple[tuple, Splits] | None = None


def _cache_key(cfg: DictConfig, device: torch.device) -> tuple:
    """Everything load() depends on: the data config, the device, and each
    dataset file's path, size and mtime (a file replaced on disk is read again)."""
    from omegaconf import OmegaConf

    files: list[tuple] = []
    name = DataName(cfg.name)
    if name not in IN_MEMORY_DATA:
        from bnexp import datasets

        folder = Path(cfg.root).expanduser().resolve()
        for f in datasets.required_files(name.value):
            st = (folder / f).stat() if (folder / f).is_file() else None
            files.append((str(folder / f), st and st.st_size, st and st.st_mtime_ns))
    return OmegaConf.to_yaml(cfg, resolve=True), str(device), tuple(files)


def load(cfg: DictConfig, device: torch.device) -> Splits:
    """Load the data config ``cfg``, split, preprocess with training statistics, move to ``device``.

    The last result is kept and returned again for the same key
    (:func:`_cache_key`): the jobs of a sweep that share a process (Hydra's
    basic launcher, a joblib worker) then read, split and preprocess their
    data once, not once per job (~0.4 s a job for MNIST on the 2-core CPU,
    against ~1.3 s for the 2000 training steps of a placement-ablation job).
    Between processes, :mod:`bnexp.data_cache` keeps the prepared arrays of
    file-backed datasets (and MNIST-1D) on disk. Nothing writes to these
    tensors: the loop only indexes them.
    """
    global _last
    key = _cache_key(cfg, device)
    if _last is not None and _last[0] == key:
        return _last[1]
    _last = None  # let the previous job's tensors go before loading the next
    try:
        splits = _load(cfg, device)
    except MemoryError as e:  # numpy refuses an array larger than the machine before touching it
        raise ConfigError("data", f"the data does not fit in memory ({e}); allowed: fewer or smaller examples") from None
    except Exception as e:  # a failed download, a file replaced since the check: bad input, not a failed run
        from bnexp.datasets import DataError

        if isinstance(e, DataError):
            raise ConfigError("data.root", str(e)) from None
        raise
    _last = (key, splits)
    return splits


def _load(cfg: DictConfig, device: torch.device) -> Splits:
    key = _disk_key(cfg)
    cached = data_cache.read(key) if key is not None else None
    if cached is not None:  # written after the check below passed: the same bits again
        return _on_device(cached, device)
    arrays = _prepare(cfg)
    splits = _on_device(arrays, device)
    for part in ("x_train", "x_val", "x_test"):
        # A NaN or inf input would only show up later as a "diverged" run.
        if not torch.isfinite(getattr(splits, part)).all():
            raise ConfigError("data", f"the {part[2:]} inputs hold non-finite values after data.preprocess={Preprocess(cfg.preprocess).value}; "
                                      "allowed: finite data")
    if key is not None:
        data_cache.write(key, arrays)
    return splits


def _disk_key(cfg: DictConfig) -> dict | None:
    """bnexp.data_cache's key for this data config; None for data made in memory (or files still to download)."""
    name = DataName(cfg.name)
    if name in IN_MEMORY_DATA:
        return None
    from bnexp import datasets

    source = datasets.source_key(name.value, cfg.root, cfg.download)
    if source is None:
        return None
    split = {k: cfg[k] for k in ("val_size", "subset", "seed")}
    return {**source, **split, "preprocess": Preprocess(cfg.preprocess).value, "numpy": np.__version__}


def _prepare(cfg: DictConfig) -> dict[str, np.ndarray]:
    """Each split's inputs as (x - shift) / scale in float32, (shift, scale) from the
    training split, and its targets (class labels int64, real-valued ones float32)."""
    arrays = load_arrays(cfg)
    x_all, y_all = arrays["x_train"], arrays["y_train"]
    train_idx, val_idx = split_train_val(len(x_all), cfg.val_size, cfg.seed)
    if cfg.subset is not None:
        train_idx = train_idx[: cfg.subset]
    x_train = x_all[train_idx]
    shift, scale = (a.astype(np.float32) for a in fit_preprocess(x_train, Preprocess(cfg.preprocess)))

    def prep(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)  # a new array: the two steps below work in place (one pass each, no temporaries)
        np.subtract(x, shift, out=x)
        np.divide(x, scale, out=x)
        return x

    def targets(y: np.ndarray) -> np.ndarray:
        return y.astype(np.float32 if y.dtype.kind == "f" else np.int64)

    return {"x_train": prep(x_train), "y_train": targets(y_all[train_idx]), "x_val": prep(x_all[val_idx]), "y_val": targets(y_all[val_idx]),
            "x_test": prep(arrays["x_test"]), "y_test": targets(arrays["y_test"]), "num_classes": np.asarray(int(arrays["num_classes"]))}


def _on_device(arrays: dict[str, np.ndarray], device: torch.device) -> Splits:
    parts = {k: torch.from_numpy(arrays[k]).to(device) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
    return Splits(**parts, num_classes=int(arrays["num_classes"]))
