"""Model families by name (as timm's registry): a family is a schema, its checks
and a builder, registered with :func:`register`.

Torch-free on purpose: composing and validating a config needs a family's schema
and checks, never its network, so a config error is answered without importing
torch. A family's schema and checks live in :mod:`bnexp.models.schemas`; its
builder in the family's own module (``bnexp/models/<name>.py``), named by an
import path (``"bnexp.models.mlp:build"``) and imported at the first build, the
way Hydra's ``_target_`` or transformers' lazy auto-classes name what they
import late. A callable works as well (a user's own family)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

from omegaconf import DictConfig

from bnexp.config import ConfigError, ModelConfig, NormConfig

if TYPE_CHECKING:
    from torch import nn


def _no_checks(cfg: DictConfig) -> None:
    return None


def resolve(target: Union[Callable, str]) -> Callable:
    """A callable, or the one an import path ``"package.module:name"`` names (imported now)."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    name: str
    # A dataclass subclass of ModelConfig: the typed node `model=<name>` composes onto.
    schema: type[ModelConfig]
    # (model config, norm config, natural input shape of one example, classes) -> module,
    # or the import path of that function.
    builder: Union[Callable[[ModelConfig, NormConfig, tuple[int, ...], int], "nn.Module"], str]
    # What types cannot say (ranges, widths a group count must divide); raises ConfigError.
    check: Callable[[DictConfig], None] = _no_checks

    def build(self, model_cfg: ModelConfig, norm_cfg: NormConfig, input_shape: tuple[int, ...], num_classes: int) -> "nn.Module":
        return resolve(self.builder)(model_cfg, norm_cfg, input_shape, num_classes)


FAMILIES: dict[str, Family] = {}


def register(name: str, schema: type[ModelConfig], build: Union[Callable, str], check: Callable[[DictConfig], None] = _no_checks) -> None:
    FAMILIES[name] = Family(name, schema, build, check)


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError("model.kind", f"got {name!r}; allowed: {', '.join(sorted(FAMILIES))} (the options of group 'model')")
    return FAMILIES[name]


def build_model(model_cfg: ModelConfig, norm_cfg: NormConfig, input_shape: tuple[int, ...], num_classes: int) -> "nn.Module":
    """The network of family ``model_cfg.kind`` for examples of ``input_shape``
    (as the data gives them: [D], [C, L] or [C, H, W]) and ``num_classes`` outputs."""
    return family(str(model_cfg.kind)).build(model_cfg, norm_cfg, tuple(input_shape), num_classes)
