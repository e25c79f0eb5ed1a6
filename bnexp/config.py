"""The config's vocabulary: enums, the base schema of every config group, and
what every part of bnexp computes from a composed config (its plain form, flat
keys, hash).

Hydra is not imported here and neither is torch: ``bnexp runs``, ``bnexp report``
and the run-dir module read configs without either. Composition (Hydra's
ConfigStore, ``compose()``) and the checks over a whole config live in
:mod:`bnexp.schema`, which also knows every model family's schema.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf


class ConfigError(Exception):
    """An invalid config value; ``str()`` is one line naming the key and what is allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class Placement(str, Enum):
    pre = "pre"  # layer -> norm -> activation (Ioffe & Szegedy 2015, Sec. 3.2)
    post = "post"  # layer -> activation -> norm
    none = "none"  # layer -> activation, no normalization layers
    preact = "preact"  # norm -> activation -> layer: residual blocks only (He et al. 2016, "Identity Mappings")


class NormKind(str, Enum):
    """The built-in norms (bnexp/norms/<name>.py), in the order bnexp lists them. The
    composed ``norm.kind`` takes any registered norm's name (bnexp.schema.NormName)."""

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
    linear_regression = "linear_regression"  # real-valued targets y = A x (Santurkar et al. 2018's deep linear net)


# Made in memory by bnexp.data from the config alone: no files, no bnexp.datasets.
IN_MEMORY_DATA = (DataName.drug_trial, DataName.synthetic, DataName.linear_regression)
# Data whose targets are real vectors, not class labels: no accuracy, loss mse.
REGRESSION_DATA = (DataName.linear_regression,)

# One example's shape as bnexp.data gives it (synthetic: data.shape), known
# before any file is read, so that checks of image-only options run at validation.
EXAMPLE_SHAPES = {DataName.mnist1d: (1, 40), DataName.drug_trial: (1,), DataName.mnist: (1, 28, 28),
                  DataName.fashion_mnist: (1, 28, 28), DataName.cifar10: (3, 32, 32)}


def example_shape(data_cfg: Any) -> tuple[int, ...]:
    name = DataName(data_cfg.name)
    return tuple(data_cfg.shape) if name == DataName.synthetic else EXAMPLE_SHAPES[name]


class Augment(str, Enum):
    none = "none"
    crop_flip = "crop_flip"  # random 4-pixel-padded crop + horizontal flip per example, on the device (bnexp.augment)


class OptimName(str, Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"
    step = "step"  # x0.1 at 50% and 75% of training


class TrainOnly(str, Enum):
    all = "all"
    norm = "norm"  # only the norm layers' gamma and beta (Frankle, Schwab & Morcos 2021)


class Loss(str, Enum):
    cross_entropy = "cross_entropy"
    mse = "mse"  # torch's mse_loss: the mean over samples and output units


class Amp(str, Enum):
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class ModelConfig:
    """What every model family shares; a family's own schema subclasses it
    (bnexp/models/<family>.py) and sets ``kind`` to its registered name."""

    kind: str = "mlp"
    activation: Activation = Activation.relu
    init: Init = Init.default
    init_std: float = 0.01  # used by init=normal


@dataclass
class NormConfig:
    """The keys every norm reads, and those of the built-in norms (here, so that
    Python callers of NormConfig(...) and recorded config hashes stay as they
    were); a norm added later declares its own keys in its registry entry."""

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
    # Residual families: each residual branch starts at zero (Goyal et al. 2017, Sec. 5.1; see bnexp.models.resnet).
    zero_init_residual: bool = False
    running_var: RunningVar = RunningVar.unbiased  # batch, ghost_batch (bnexp.norms)
    groups: int = 8  # group norm
    virtual_batch_size: Optional[int] = None  # ghost batch norm
    rmax: float = 3.0  # batch renorm
    dmax: float = 5.0  # batch renorm
    # Santurkar et al. 2018, Algorithm 1 ("noisy" BN): after each norm (or where
    # it would be, with placement=none), in training only, per step and unit j
    # mu_j ~ U(-noise_mu, noise_mu), sigma_j ~ U(1, noise_sigma); per example
    # m ~ U(mu_j - noise_r_mu, mu_j + noise_r_mu), s ~ N(sigma_j, noise_r_sigma^2);
    # a <- s * a + m. The defaults are the paper's values.
    noise: bool = False
    noise_mu: float = 0.5
    noise_sigma: float = 1.25
    noise_r_mu: float = 0.1
    noise_r_sigma: float = 0.1
    # Data-parallel runs (torchrun): false, each process normalizes with its own
    # batch's statistics (per-device BN, Wu & He 2018's setting); true, with the
    # statistics of the whole global batch (synchronized BN). Batch-statistics norms only.
    sync: bool = False


@dataclass
class DataConfig:
    name: DataName = DataName.synthetic
    root: str = "data"
    download: bool = False
    preprocess: Preprocess = Preprocess.standardize
    val_size: float = 0.1  # < 1: fraction of the training split; >= 1: number of examples
    subset: Optional[int] = None  # keep only the first N training examples
    seed: int = 0  # generated data and the validation split; fixed across run seeds
    augment: Augment = Augment.none  # training batches only; images [C,H,W] only
    # synthetic: Gaussian class clusters
    num_classes: int = 10
    shape: list[int] = field(default_factory=lambda: [32])  # per example: [D], [C,L] or [C,H,W]
    n_train: int = 4000
    n_test: int = 1000
    cluster_std: float = 1.0
    # linear_regression: y = A x with x ~ N(0, I) of data.shape and a fixed A ~ N(0, 1)
    # of out_dim x D entries (null: square, out_dim = D); also n_train, n_test, seed.
    out_dim: Optional[int] = None


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
    train_only: TrainOnly = TrainOnly.all  # norm: everything else stays frozen at its initialization


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
    loss: Loss = Loss.cross_entropy  # mse for real-valued targets (data=linear_regression)
    # PreciseBN (Wu & Johnson 2021): before each evaluation and the final test,
    # the running statistics are recomputed over this many training batches as
    # pooled population statistics (fvcore's update_bn_stats); 0: off (the EMA).
    precise_bn: int = 0
    # Seconds a data-parallel rank waits in a collective for the others (gloo's and
    # NCCL's own defaults are 30 and 10 minutes): a rank that is stuck (SIGSTOP, a hung
    # device) then ends the run as failed, resumable, instead of blocking its peers.
    dist_timeout: float = 300.0


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


# Keys (and nodes: a key covers every key under it) that change no number a
# run trains: config_hash ignores them, and reports never group runs by them.
# (Not train.log_every, whose window makes the final train/loss, nor
# train.eval_every, which makes best val/acc and steps_to_target; checkpoints
# are resumed bit-identically, so checkpoint_every is one; probes only read.)
NON_RESULT_KEYS = ("notes", "train.progress", "train.checkpoint_every", "probes", "train.dist_timeout")

# Keys added after runs were first recorded, with their defaults: at its
# default a key is left out of config_hash, so that a run recorded before the
# key existed keeps its hash (and stays resumable, skippable, reproducible).
# ``world_size`` is no config key: it is the number of processes that train one
# run together (torchrun's WORLD_SIZE), hashed as if it were one.
LATER_KEYS: dict[str, Any] = {"norm.sync": False, "world_size": 1, "norm.zero_init_residual": False, "data.augment": "none",
                               "norm.running_var": "unbiased", "train.threads": "auto",
                               "norm.noise": False, "norm.noise_mu": 0.5, "norm.noise_sigma": 1.25, "norm.noise_r_mu": 0.1,
                               "norm.noise_r_sigma": 0.1, "data.out_dim": None, "optim.train_only": "all", "train.loss": "cross_entropy",
                               "train.precise_bn": 0}


class RankStopped(BaseException):
    """Rank 0 ended before training, other than by a bad config (a ConfigError,
    raised as such) or an interruption; a follower rank exits with ``code``, silently.
    (Raised by bnexp.distributed; here, so that the CLI catches it without importing torch.)"""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def launch_world_size() -> int:
    """How many processes train this process's run together: torchrun's WORLD_SIZE, else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1

# bnexp 0.1 kept every family's keys in one model node, so an MLP's recorded
# config_hash covers the CNN keys at their defaults too.
V01_MODEL_KEYS = {"kernel_size": 3, "pool": True}


def is_non_result_key(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS)


def normalized(flat: dict[str, Any]) -> dict[str, Any]:
    """A run's flattened config as this version would compose it, so that runs
    recorded by another version compare equal when their training was: bnexp 0.1's
    MLP configs lose the CNN keys they carried, and keys added since (LATER_KEYS)
    get their defaults where missing."""
    out = dict(flat)
    if out.get("model.kind") == "mlp":
        for k in V01_MODEL_KEYS:
            out.pop(f"model.{k}", None)
    for k, default in LATER_KEYS.items():
        out.setdefault(k, default)
    return out


def _pop(d: dict, key: str) -> Any:
    *parents, leaf = key.split(".")
    node = d
    for p in parents:
        node = node.get(p, {}) if isinstance(node, dict) else {}
    return node.pop(leaf, None) if isinstance(node, dict) else None


def config_hash(cfg: DictConfig | dict, world_size: int | None = None) -> str:
    """A stable hash of the composed config and the world size (default: this
    process's, :func:`launch_world_size`), ignoring NON_RESULT_KEYS (and
    LATER_KEYS at their defaults, so a single-process run hashes as before)."""
    d = plain(cfg) if not isinstance(cfg, dict) else dict(cfg)
    d = json.loads(json.dumps(d))
    d["world_size"] = launch_world_size() if world_size is None else world_size
    for key in NON_RESULT_KEYS:
        _pop(d, key)
    for key, default in LATER_KEYS.items():
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node.get(leaf, default) == default:
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def hash_matches(recorded: str | None, cfg: DictConfig | dict) -> bool:
    """Whether a metrics.json's config_hash is that of ``cfg`` (as this version or bnexp 0.1 computed it)."""
    if recorded is None:
        return False
    if recorded == config_hash(cfg):
        return True
    d = plain(cfg) if not isinstance(cfg, dict) else json.loads(json.dumps(cfg))
    model = d.get("model")
    if isinstance(model, dict) and model.get("kind") == "mlp" and not V01_MODEL_KEYS.keys() & model.keys():
        return recorded == config_hash({**d, "model": {**model, **V01_MODEL_KEYS}})
    return False


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, n_train // batch_size)
