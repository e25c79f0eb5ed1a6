"""The config as Hydra composes it: the typed nodes registered in Hydra's
ConfigStore (the base groups from :mod:`bnexp.config`, every model family's own
schema, a ``probes.<name>`` node for every probe), the resolvers that name run
directories, :func:`compose` for tests, benchmarks and notebooks, and
:func:`validate` for what types cannot say.

Hydra merges every YAML file in ``configs/`` onto these nodes, so a wrong type,
an unknown key or a value outside an Enum fails at composition time, before
Hydra creates a run directory; :func:`validate` runs before it exists, too
(the Hydra callback in :mod:`bnexp.hydra_app`).
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import field, fields, is_dataclass, make_dataclass
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bnexp import augment, config
from bnexp.config import (
    IN_MEMORY_DATA, REGRESSION_DATA, V01_MODEL_KEYS, Amp, Config, ConfigError, DataConfig, DataName, Loss, NormConfig, OptimConfig,
    Placement, TrainOnly, config_dir, flatten, launch_world_size, plain,
)
from bnexp.models import FAMILIES, family
from bnexp.norms import NORMS, norm
from bnexp.norms.base import own_keys
from bnexp.probes import PROBES

# --------------------------------------------------------------------------- the typed nodes


# :class:`bnexp.config.Config` with ``probes`` (one node per registered probe)
# and a ``norm`` node over the registered norms: ``kind`` one of their names,
# and each norm's own keys. Made from the registries, again whenever a norm is
# registered later (a norm defined outside bnexp), and bound to module names so
# that pickles of a config (joblib and submitit carry jobs' configs between
# processes) refer to these classes by name; a class pickled by value would be
# rebuilt over these in the parent process, with foreign dataclass sentinels
# that break OmegaConf.
ProbesConfig = make_dataclass("ProbesConfig", [(name, kind.schema, field(default_factory=kind.schema))
                                               for name, kind in PROBES.items() if kind.schema])
ProbesConfig.__module__ = __name__
NormName: Any = None
NormNode: Any = None
RootConfig: Any = None
_BUILT_FOR: tuple = ()


def _default(value: Any) -> Any:
    return field(default_factory=lambda: copy.deepcopy(value)) if isinstance(value, (list, dict)) else field(default=value)


def root_schema() -> type:
    """The typed root node for the norms registered now."""
    global NormName, NormNode, RootConfig, _BUILT_FOR
    state = (tuple(NORMS), repr(own_keys()))
    if state != _BUILT_FOR:
        NormName = Enum("NormName", {name: name for name in NORMS}, type=str, module=__name__)
        own = [(key, kind, _default(default)) for key, (kind, default) in own_keys().items()]
        NormNode = make_dataclass("NormNode", [("kind", NormName, field(default=NormName.batch)), *own], bases=(NormConfig,))
        RootConfig = make_dataclass("RootConfig", [("norm", NormNode, field(default_factory=NormNode)),
                                                   ("probes", ProbesConfig, field(default_factory=ProbesConfig))], bases=(Config,))
        NormNode.__module__ = RootConfig.__module__ = __name__
        _BUILT_FOR = state
    return RootConfig


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=root_schema())
    for name, fam in FAMILIES.items():
        cs.store(group="model", name=f"base_{name}", node=fam.schema)
    cs.store(group="norm", name="base_norm", node=NormNode)
    for name in NORMS:  # a norm without configs/norm/<name>.yaml is selected by its typed node (Hydra warns of both)
        if not (config_dir() / "norm" / f"{name}.yaml").is_file():
            cs.store(group="norm", name=name, node=NormNode(kind=NormName[name]))
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="optim", name="base_optim", node=OptimConfig)


def group_options() -> dict[str, list[str]]:
    """Each config group's options: configs/'s files, and the norms registered without one."""
    options = config.group_options()
    options["norm"] = sorted(set(options.get("norm", [])) | set(NORMS))
    return options


root_schema()


def schema_keys() -> dict[str, type]:
    """Every dotted key of bnexp's own schema nodes (each family's model keys
    included) -> the dataclass it belongs to."""
    out: dict[str, type] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in fields(cls):
            key = f"{prefix}{f.name}"
            default = f.default_factory() if callable(getattr(f, "default_factory", None)) else f.default
            if is_dataclass(default):
                walk(type(default), key + ".")
            else:
                out[key] = cls

    walk(root_schema(), "")
    for fam in FAMILIES.values():
        walk(fam.schema, "model.")
    return out


def closest_key(key: str) -> str | None:
    """The schema key a mistyped ``key`` most likely meant."""
    keys = schema_keys()
    group = key.rsplit(".", 1)[0] + "." if "." in key else ""
    near = difflib.get_close_matches(key, [k for k in keys if k.startswith(group)] or list(keys), n=1, cutoff=0.6)
    return near[0] if near else None


def _check_keys(cfg: DictConfig) -> None:
    """Keys Hydra lets through but bnexp would silently ignore or miss: a key added
    with ``+`` inside one of bnexp's own nodes (a typo such as ``+norm.placment=pre``),
    and a key removed with ``~``."""
    def walk(node: DictConfig, prefix: str, cls: type) -> None:
        if not is_dataclass(cls):
            return
        known = {f.name: f for f in fields(cls)}
        for key in node.keys():
            full = f"{prefix}{key}"
            if key not in known and prefix:  # top-level extras (+my_note=...) are the user's own
                raise ConfigError(full, f"is not a key of bnexp's schema; {unknown_key_hint(full, cfg)}")
            value = node._get_node(key)
            if key in known and isinstance(value, DictConfig):
                walk(value, full + ".", OmegaConf.get_type(value))
        for key in sorted(set(known) - set(node.keys())):
            raise ConfigError(f"{prefix}{key}", "was removed (~key), but bnexp needs every key of its schema; allowed: a value (`bnexp show` prints the defaults)")

    # The root of a copy without `hydra` (as the callback makes) is untyped: its schema is RootConfig.
    walk(cfg, "", root_schema())


def unknown_key_hint(key: str, cfg: DictConfig | None = None) -> str:
    """What to say about an unknown ``key``: the model family it belongs to, or the closest key."""
    if key.startswith("model."):
        leaf = key.split(".", 1)[1]
        owners = [name for name, fam in FAMILIES.items() if leaf in {f.name for f in fields(fam.schema)}]
        if owners:
            current = OmegaConf.select(cfg, "model.kind", default=None) if cfg is not None else None
            now = f", not model={current}" if current else ""
            return f"it belongs to model={'/'.join(owners)}{now} (`bnexp show model=...` lists a family's keys)"
    near = closest_key(key)
    return (f"did you mean {near}? " if near and near != key else "") + "(`bnexp show` lists the keys; `+key=value` adds keys outside bnexp's nodes only)"


def typed(saved: DictConfig | dict) -> DictConfig:
    """A saved config (``.hydra/config.yaml``) merged onto the schema of its model family.

    Keys a run added at the top level with Hydra's ``+key=value`` are part of its
    saved config and accepted (types of known keys are still checked); the config
    is closed again, so that a mistyped change made later is rejected. A config
    saved by bnexp 0.1 holds every family's model keys in one node: those of
    other families are dropped (its config hash stays valid, see
    :func:`bnexp.config.hash_matches`)."""
    saved = OmegaConf.create(saved) if isinstance(saved, dict) else saved
    kind = str(OmegaConf.select(saved, "model.kind", default="mlp"))
    schema_cls = family(kind).schema
    if isinstance(saved.get("model"), DictConfig):
        known = {f.name for f in fields(schema_cls)}
        legacy = [k for k in V01_MODEL_KEYS if k in saved.model and k not in known]
        if legacy:
            container = OmegaConf.to_container(saved, resolve=False)
            for k in legacy:
                container["model"].pop(k)
            saved = OmegaConf.create(container)
    schema = OmegaConf.merge(OmegaConf.structured(root_schema()), {"model": OmegaConf.structured(schema_cls)})
    OmegaConf.set_struct(schema, False)
    cfg = OmegaConf.merge(schema, saved)
    OmegaConf.set_struct(cfg, True)
    return cfg


# --------------------------------------------------------------------------- run-dir names


def _first_non_empty(*values: Any) -> str:
    for v in values:
        if v not in (None, "", "None", "null"):
            return str(v)
    return ""


def _job_subdir(task: Any, seed: Any, params: Any, sweep_dir: str) -> str:
    from bnexp import sweep  # evaluated where the job runs (a joblib or SLURM worker too): all it needs is on disk

    return sweep.job_dir_name(task, seed, sweep.sweep_overrides(sweep_dir, params))


def register_resolvers() -> None:
    """The resolvers configs/config.yaml names run directories with."""
    if not OmegaConf.has_resolver("bnexp.first"):
        OmegaConf.register_new_resolver("bnexp.first", _first_non_empty)
        OmegaConf.register_new_resolver("bnexp.subdir", _job_subdir)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The composed config for ``overrides`` without running anything (tests, benchmarks, notebooks).

    Commands go through ``@hydra.main`` instead (see bnexp.hydra_app), which adds
    run directories, multirun and launchers; this uses Hydra's Compose API.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg


# --------------------------------------------------------------------------- validation


def _positive(cfg: DictConfig, key: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    ok = value is not None and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "a number >= 0" if allow_zero else "a number > 0"
        raise ConfigError(key, f"got {value!r}; allowed: {what}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def validate(cfg: DictConfig) -> None:
    """Checks the types cannot express; raises ConfigError with one clear line."""
    n, d, o, t = cfg.norm, cfg.data, cfg.optim, cfg.train
    flat = flatten(plain(cfg))
    targets = [k for k in flat if k.rsplit(".", 1)[-1] == "_target_"]
    if targets:  # bnexp never calls hydra.utils.instantiate on a user's config
        raise ConfigError(targets[0], "bnexp builds everything from its own registries and never imports a _target_; allowed: the keys `bnexp show` lists")
    _check_keys(cfg)
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"got {value}; allowed: a finite number")
    _positive(cfg, "model.init_std")
    if not 0.0 <= n.momentum <= 1.0:
        raise ConfigError("norm.momentum", f"got {n.momentum}; allowed: 0 <= momentum <= 1 (PyTorch convention; Keras momentum m is 1 - m)")
    _positive(cfg, "norm.eps")
    entry = norm(n.kind)
    if n.placement != Placement.none and entry.check is not None:
        entry.check(cfg)  # its own keys: groups, virtual batch size, clips
    _check_noise(cfg)
    family(str(cfg.model.kind)).check(cfg)  # widths, norm.layers, norm.groups dividing widths
    augment.check(cfg)  # image data for crop_flip
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
    _positive(cfg, "train.dist_timeout")
    for name, kind in PROBES.items():
        _positive(cfg, f"probes.{name}.every", allow_none=True, allow_zero=True)
        if kind.check is not None:
            kind.check(cfg)
    if t.target_acc is not None and not 0 < t.target_acc <= 1:
        raise ConfigError("train.target_acc", f"got {t.target_acc}; allowed: an accuracy in (0, 1]")
    _check_regression(cfg)
    _positive(cfg, "train.precise_bn", allow_zero=True)
    if o.train_only == TrainOnly.norm and (n.placement == Placement.none or not (n.scale or n.center)):
        raise ConfigError("optim.train_only", "norm trains only the norms' gamma and beta, but this model has none "
                          "(norm.placement=none, or norm.scale=norm.center=false); allowed: all")
    if t.threads != "auto" and not (isinstance(t.threads, int) and not isinstance(t.threads, bool) and t.threads > 0):
        raise ConfigError("train.threads", f"got {t.threads!r}; allowed: auto or a positive number of threads")
    _check_device(t)
    _check_world(cfg, launch_world_size())
    _check_instruments_world(cfg, launch_world_size())
    if DataName(cfg.data.name) not in IN_MEMORY_DATA:
        from bnexp import datasets

        try:
            datasets.check_available(DataName(cfg.data.name).value, cfg.data.root, cfg.data.download)
        except datasets.DataError as e:
            raise ConfigError("data.root", str(e)) from None


def _check_noise(cfg: DictConfig) -> None:
    """norm.noise's ranges (Santurkar et al. 2018, Algorithm 1)."""
    n = cfg.norm
    if not n.noise:
        return
    for key in ("norm.noise_mu", "norm.noise_r_mu", "norm.noise_r_sigma"):
        _positive(cfg, key, allow_zero=True)
    if not n.noise_sigma >= 1:
        raise ConfigError("norm.noise_sigma", f"got {n.noise_sigma}; allowed: >= 1 (sigma ~ U(1, noise_sigma))")


def _check_regression(cfg: DictConfig) -> None:
    """train.loss must fit the targets: mse for real-valued ones, cross_entropy for class labels."""
    regression = DataName(cfg.data.name) in REGRESSION_DATA
    loss = Loss(cfg.train.loss)
    if regression and loss != Loss.mse:
        raise ConfigError("train.loss", f"{loss.value} needs class labels, but data={cfg.data.name} has real-valued targets; allowed: mse")
    if not regression and loss == Loss.mse:
        raise ConfigError("train.loss", f"mse needs real-valued targets (data=linear_regression), but data={cfg.data.name} has class labels; allowed: cross_entropy")
    if regression and cfg.train.target_acc is not None:
        raise ConfigError("train.target_acc", f"data={cfg.data.name} is a regression: there is no accuracy to reach; allowed: null")
# The optimization-landscape instruments that need the whole step batch in one process.
ONE_PROCESS_INSTRUMENTS = ("probes.ics.every", "probes.landscape.every", "probes.hessian.every", "probes.bn_gap.every", "train.precise_bn")


def _check_instruments_world(cfg: DictConfig, world: int) -> None:
    """The landscape probes and PreciseBN are refused in a data-parallel run: they
    take trial steps and extra forwards on the model, which each rank would have
    to join in lockstep (synchronized norms all-reduce in every forward: rank 0
    alone would wait forever) on a batch that no rank holds whole. Rather than
    measure something else than one process does, they say so."""
    if world == 1:
        return
    for key in ONE_PROCESS_INSTRUMENTS:
        if OmegaConf.select(cfg, key):
            raise ConfigError(key, f"{OmegaConf.select(cfg, key)}, but this is a data-parallel run of {world} processes, and the "
                                   "optimization-landscape probes and PreciseBN run in one process only; allowed: 0 under torchrun "
                                   "(or train without torchrun)")


def _check_world(cfg: DictConfig, world: int) -> None:
    """norm.sync, and what a data-parallel run of ``world`` processes needs: a
    global batch that splits evenly (a norm's own needs, such as ghost batches
    that fit the per-device batch, are its check's)."""
    n, t = cfg.norm, cfg.train
    if n.sync and n.placement != Placement.none and not norm(n.kind).batch_stats:
        syncable = ", ".join(name for name, entry in NORMS.items() if entry.batch_stats)
        raise ConfigError("norm.sync", f"true, but norm={norm(n.kind).name} normalizes each example by itself: there are no batch "
                                       f"statistics to synchronize; allowed: false (true for {syncable})")
    if world == 1:
        return
    if t.batch_size % world:
        raise ConfigError("train.batch_size", f"{t.batch_size} does not split evenly over {world} processes; allowed: a multiple "
                                              f"of {world} (train.batch_size is the global batch, each process gets batch_size / {world})")
    if t.device.startswith("cuda:") or t.device == "mps":
        raise ConfigError("train.device", f"{t.device}, but in a data-parallel run each process uses cuda:LOCAL_RANK; allowed: auto, cuda, cpu")


def _check_device(t: DictConfig) -> None:
    import torch

    dev = t.device
    if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError("train.device", f"got {dev!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    if dev.startswith("cuda"):
        if not _cuda_available():
            raise ConfigError("train.device", f"{dev} asked for, but no CUDA device is available here; allowed: auto or cpu")
        if ":" in dev and int(dev[5:]) >= torch.cuda.device_count():
            raise ConfigError("train.device", f"{dev} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device", "mps asked for, but Apple's Metal backend is not available here; allowed: auto or cpu")
    if t.amp == Amp.fp16 and (dev == "cpu" or (dev == "auto" and not _cuda_available())):
        raise ConfigError("train.amp", "fp16 autocast needs a GPU; allowed on CPU: none, bf16")
