"""Model families by name (as timm's registry): a family is one module of
:mod:`bnexp.models` that calls :func:`register` with its schema, builder and checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig
from torch import nn

from bnexp.config import ConfigError, ModelConfig, NormConfig


def _no_checks(cfg: DictConfig) -> None:
    return None


@dataclass(frozen=True)
class Family:
    name: str
    # A dataclass subclass of ModelConfig: the typed node `model=<name>` composes onto.
    schema: type[ModelConfig]
    # (model config, norm config, natural input shape of one example, classes) -> module
    build: Callable[[ModelConfig, NormConfig, tuple[int, ...], int], nn.Module]
    # What types cannot say (ranges, widths a group count must divide); raises ConfigError.
    check: Callable[[DictConfig], None] = _no_checks


FAMILIES: dict[str, Family] = {}


def register(name: str, schema: type[ModelConfig], build: Callable, check: Callable[[DictConfig], None] = _no_checks) -> None:
    FAMILIES[name] = Family(name, schema, build, check)


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError("model.kind", f"got {name!r}; allowed: {', '.join(sorted(FAMILIES))} (the options of group 'model')")
    return FAMILIES[name]


def build_model(model_cfg: ModelConfig, norm_cfg: NormConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The network of family ``model_cfg.kind`` for examples of ``input_shape``
    (as the data gives them: [D], [C, L] or [C, H, W]) and ``num_classes`` outputs."""
    return family(str(model_cfg.kind)).build(model_cfg, norm_cfg, tuple(input_shape), num_classes)
