"""The config schema: one dataclass per config group, registered in Hydra's ConfigStore.

Hydra merges every YAML file in ``configs/`` onto these typed nodes, so a wrong
type, an unknown key or a value outside an Enum fails at composition time,
before Hydra creates a run directory. What types cannot say (ranges, widths
that a group count must divide, files that must exist) is checked by
:func:`validate`, which the Hydra callback in :mod:`bnexp.hydra_app` runs
before the run directory exists, too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf


class ConfigError(Exception):
    """An invalid config value; ``str()`` is one line naming the key and what is allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class Placement(str, Enum):
    pre = "pre"  # layer -> norm -> activation (Ioffe & Szegedy 2015, Sec. 3.2)
    post = "post"  # layer -> activation -> norm
    none = "none"  # layer -> activation, no normalization layers


class NormKind(str, Enum):
    batch = "batch"
    ghost_batch = "ghost_batch"
    batch_renorm = "batch_renorm"
    layer = "layer"
    group = "group"


class RunningVar(str, Enum):
    """What BN's running_var averages (bnexp.norms): PyTorch's rule or Keras'."""

    unbiased = "unbiased"  # torch.nn.BatchNorm: the batch variance times n / (n - 1)
    biased = "biased"  # Keras' BatchNormalization: the batch variance the batch was normalized with


class Activation(str, Enum):
    relu = "relu"
    sigmoid = "sigmoid"
    tanh = "tanh"
    gelu = "gelu"
    silu = "silu"
    elu = "elu"
    leaky_relu = "leaky_relu"
    identity = "identity"


class ModelKind(str, Enum):
    mlp = "mlp"
    cnn = "cnn"


class Init(str, Enum):
    default = "default"  # PyTorch's own (Kaiming-uniform)
    normal = "normal"  # N(0, init_std^2), the BN paper's "small random Gaussian values"
    kaiming = "kaiming"  # Kaiming-normal for ReLU-like nets
    xavier = "xavier"  # Glorot-uniform, Keras' default for Dense


class Preprocess(str, Enum):
    none = "none"
    minmax = "minmax"
    standardize = "standardize"


class DataName(str, Enum):
    mnist1d = "mnist1d"
    drug_trial = "drug_trial"
    synthetic = "synthetic"
    mnist = "mnist"
    fashion_mnist = "fashion_mnist"
    cifar10 = "cifar10"


# Made in memory by bnexp.data from the config alone: no files, no bnexp.datasets.
IN_MEMORY_DATA = (DataName.drug_trial, DataName.synthetic)


class OptimName(str, Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"
    step = "step"  # x0.1 at 50% and 75% of training


class Amp(str, Enum):
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class ModelConfig:
    kind: ModelKind = ModelKind.mlp
    hidden: list[int] = field(default_factory=lambda: [100, 100, 100])
    activation: Activation = Activation.relu
    init: Init = Init.default
    init_std: float = 0.01  # used by init=normal
    kernel_size: int = 3  # cnn
    pool: bool = True  # cnn: 2x max-pool after each conv block while the signal is long enough


@dataclass
class NormConfig:
    kind: NormKind = NormKind.batch
    placement: Placement = Placement.pre
    layers: Any = "all"  # "all" or a list of 0-based hidden-layer indices
    # PyTorch convention: running = (1 - momentum) * running + momentum * batch.
    # Keras' BatchNormalization(momentum=m) is momentum = 1 - m here.
    momentum: float = 0.1
    eps: float = 1e-5
    center: bool = True  # learn beta
    scale: bool = True  # learn gamma
    gamma_init: float = 1.0
    beta_init: float = 0.0
    track_running_stats: bool = True
    running_var: RunningVar = RunningVar.unbiased  # batch, ghost_batch (bnexp.norms)
    groups: int = 8  # group norm
    virtual_batch_size: Optional[int] = None  # ghost batch norm
    rmax: float = 3.0  # batch renorm
    dmax: float = 5.0  # batch renorm


@dataclass
class DataConfig:
    name: DataName = DataName.synthetic
    root: str = "data"
    download: bool = False
    preprocess: Preprocess = Preprocess.standardize
    val_size: float = 0.1  # < 1: fraction of the training split; >= 1: number of examples
    subset: Optional[int] = None  # keep only the first N training examples
    seed: int = 0  # generated data and the validation split; fixed across run seeds
    # synthetic: Gaussian class clusters
    num_classes: int = 10
    shape: list[int] = field(default_factory=lambda: [32])  # per example: [D], [C,L] or [C,H,W]
    n_train: int = 4000
    n_test: int = 1000
    cluster_std: float = 1.0


@dataclass
class OptimConfig:
    name: OptimName = OptimName.sgd
    lr: float = 0.1
    # Linear scaling rule (Goyal et al. 2017; Wu & He 2018 use 0.1 x B/32):
    # when set, the learning rate is lr * train.batch_size / base_batch_size.
    base_batch_size: Optional[int] = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Schedule = Schedule.constant
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    # Length: train.epochs, when set, wins over train.steps (so a preset's steps
    # need no `train.steps=null` next to `train.epochs=20`).
    steps: Optional[int] = 1000
    epochs: Optional[int] = None
    batch_size: int = 64
    # Steps between validation passes (+ activation probes); null: once per
    # epoch, as Keras and Lightning do. Per epoch, an eval costs about
    # n_val / (3 n_train) of the training compute (~3% with a 10% split) for any
    # batch size; a fixed 200 steps cost ~10% on MNIST's 5000 val examples at
    # batch 60 (docs/performance.md).
    eval_every: Optional[int] = None
    log_every: int = 50
    eval_batch_size: int = 2048
    probe_size: int = 256  # fixed batch for activation percentiles
    device: str = "auto"
    threads: Any = "auto"  # torch intra-op threads: "auto" or N (bnexp.runtime.set_threads)
    amp: Amp = Amp.none
    compile: bool = False
    deterministic: bool = False
    target_acc: Optional[float] = None
    checkpoint_every: int = 0  # steps; 0 = only at the end and on interruption
    progress: bool = True


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The run's experiment name: runs/<name>/...; presets set it.
    name: Optional[str] = None
    # Free-form notes a preset can carry into the run record.
    notes: Optional[str] = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="norm", name="base_norm", node=NormConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="optim", name="base_optim", node=OptimConfig)


def config_dir() -> Path:
    """configs/ inside an installed wheel (bnexp/configs) or at the source tree's root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"bnexp's configs/ not found next to {here}")


def group_options() -> dict[str, list[str]]:
    root = config_dir()
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_"))
    }


def plain(cfg: DictConfig) -> dict:
    """The user-facing part of a composed config as plain Python (enums as strings)."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    return json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))


# Keys that change no number a run records: config_hash ignores them, and
# reports never group runs by them. (Not train.log_every, whose window makes the
# final train/loss, nor train.eval_every, which makes best val/acc and
# steps_to_target; checkpoints are resumed bit-identically, so checkpoint_every is one.)
NON_RESULT_KEYS = ("notes", "train.progress", "train.checkpoint_every")


def config_hash(cfg: DictConfig | dict) -> str:
    """A stable hash of the composed config, ignoring NON_RESULT_KEYS."""
    d = plain(cfg) if not isinstance(cfg, dict) else dict(cfg)
    d = json.loads(json.dumps(d))
    for key in NON_RESULT_KEYS:
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- validation


def _positive(cfg: DictConfig, key: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    ok = value is not None and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "a number >= 0" if allow_zero else "a number > 0"
        raise ConfigError(key, f"got {value!r}; allowed: {what}")


def hidden_norm_indices(norm_layers: Any, n_hidden: int) -> list[int]:
    """Which hidden blocks get a norm (before placement=none is applied)."""
    if isinstance(norm_layers, str):
        if norm_layers == "all":
            return list(range(n_hidden))
        raise ConfigError("norm.layers", f"got {norm_layers!r}; allowed: 'all' or a list of hidden-layer indices 0..{n_hidden - 1}")
    if isinstance(norm_layers, int) and not isinstance(norm_layers, bool):
        norm_layers = [norm_layers]
    if isinstance(norm_layers, (list, tuple, ListConfig)):
        idx = list(norm_layers)
        if all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_hidden for i in idx):
            return sorted(set(idx))
    raise ConfigError("norm.layers", f"got {norm_layers!r}; allowed: 'all' or a list of hidden-layer indices 0..{n_hidden - 1}")


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, n_train // batch_size)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def validate(cfg: DictConfig) -> None:
    """Checks the types cannot express; raises ConfigError with one clear line."""
    m, n, d, o, t = cfg.model, cfg.norm, cfg.data, cfg.optim, cfg.train
    targets = [k for k in flatten(plain(cfg)) if k.rsplit(".", 1)[-1] == "_target_"]
    if targets:  # bnexp never calls hydra.utils.instantiate on a user's config
        raise ConfigError(targets[0], "bnexp builds everything from its own registries and never imports a _target_; allowed: the keys `bnexp show` lists")
    if len(m.hidden) == 0:
        raise ConfigError("model.hidden", "is empty; allowed: a non-empty list of positive widths, e.g. [100,100,100]")
    if any(w <= 0 for w in m.hidden):
        raise ConfigError("model.hidden", f"got {list(m.hidden)}; allowed: positive widths")
    _positive(cfg, "model.init_std")
    _positive(cfg, "model.kernel_size")
    normed = hidden_norm_indices(n.layers, len(m.hidden))
    if not 0.0 <= n.momentum <= 1.0:
        raise ConfigError("norm.momentum", f"got {n.momentum}; allowed: 0 <= momentum <= 1 (PyTorch convention; Keras momentum m is 1 - m)")
    _positive(cfg, "norm.eps")
    if n.placement != Placement.none:
        if n.kind == NormKind.group:
            _positive(cfg, "norm.groups")
            for i in normed:
                if m.hidden[i] % n.groups:
                    raise ConfigError("norm.groups", f"{n.groups} does not divide hidden layer {i}'s width {m.hidden[i]}; allowed: a divisor of every normalized width")
        if n.kind == NormKind.ghost_batch:
            if n.virtual_batch_size is None:
                raise ConfigError("norm.virtual_batch_size", "is unset; norm=ghost_batch needs a ghost batch size that divides train.batch_size")
            if n.virtual_batch_size <= 0 or n.virtual_batch_size > t.batch_size or t.batch_size % n.virtual_batch_size:
                raise ConfigError("norm.virtual_batch_size", f"got {n.virtual_batch_size}; allowed: a positive divisor of train.batch_size={t.batch_size}")
        if n.kind == NormKind.batch_renorm:
            if n.rmax < 1:
                raise ConfigError("norm.rmax", f"got {n.rmax}; allowed: rmax >= 1")
            if n.dmax < 0:
                raise ConfigError("norm.dmax", f"got {n.dmax}; allowed: dmax >= 0")
    if not (0 < d.val_size < 1 or (d.val_size >= 1 and float(d.val_size).is_integer()) or d.val_size == 0):
        raise ConfigError("data.val_size", f"got {d.val_size}; allowed: 0, a fraction in (0, 1), or a whole number of examples")
    _positive(cfg, "data.subset", allow_none=True)
    _positive(cfg, "data.num_classes")
    if d.num_classes < 2:
        raise ConfigError("data.num_classes", f"got {d.num_classes}; allowed: >= 2")
    if not d.shape or any(s <= 0 for s in d.shape) or len(d.shape) > 3:
        raise ConfigError("data.shape", f"got {list(d.shape)}; allowed: 1 to 3 positive sizes, e.g. [32] or [1,28,28]")
    for key in ("data.n_train", "data.n_test", "data.cluster_std"):
        _positive(cfg, key)
    _positive(cfg, "optim.lr")
    _positive(cfg, "optim.base_batch_size", allow_none=True)
    _positive(cfg, "optim.momentum", allow_zero=True)
    _positive(cfg, "optim.weight_decay", allow_zero=True)
    _positive(cfg, "optim.warmup_steps", allow_zero=True)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError("optim.betas", f"got {list(o.betas)}; allowed: two numbers in [0, 1)")
    if t.steps is None and t.epochs is None:
        raise ConfigError("train.steps", "both train.steps and train.epochs are null; allowed: set one (train.epochs wins when both are set)")
    _positive(cfg, "train.steps", allow_none=True)
    _positive(cfg, "train.epochs", allow_none=True)
    for key in ("train.batch_size", "train.log_every", "train.eval_batch_size", "train.probe_size"):
        _positive(cfg, key)
    _positive(cfg, "train.eval_every", allow_none=True)
    _positive(cfg, "train.checkpoint_every", allow_zero=True)
    if t.target_acc is not None and not 0 < t.target_acc <= 1:
        raise ConfigError("train.target_acc", f"got {t.target_acc}; allowed: an accuracy in (0, 1]")
    if t.threads != "auto" and not (isinstance(t.threads, int) and not isinstance(t.threads, bool) and t.threads > 0):
        raise ConfigError("train.threads", f"got {t.threads!r}; allowed: auto or a positive number of threads")
    dev = t.device
    if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError("train.device", f"got {dev!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    if dev.startswith("cuda"):
        import torch

        if not _cuda_available():
            raise ConfigError("train.device", f"{dev} asked for, but no CUDA device is available here; allowed: auto or cpu")
        if ":" in dev and int(dev[5:]) >= torch.cuda.device_count():
            raise ConfigError("train.device", f"{dev} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if t.amp == Amp.fp16 and (dev == "cpu" or (dev == "auto" and not _cuda_available())):
        raise ConfigError("train.amp", "fp16 autocast needs a GPU; allowed on CPU: none, bf16")
    if DataName(cfg.data.name) not in IN_MEMORY_DATA:
        from bnexp import datasets  # NumPy only: a missing file is said before torch loads

        try:
            datasets.check_available(DataName(cfg.data.name).value, cfg.data.root, cfg.data.download)
        except datasets.DataError as e:
            raise ConfigError("data.root", str(e)) from None


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The composed config for ``overrides`` without running anything (tests, benchmarks, notebooks).

    Commands go through ``@hydra.main`` instead (see bnexp.hydra_app), which adds
    run directories, multirun and launchers; this uses Hydra's Compose API.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bnexp.hydra_app import register_resolvers

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
