"""Model families: :mod:`~bnexp.models.registry` (by name), :mod:`~bnexp.models.schemas`
(each family's config schema and checks, torch-free, registered there) and one
module per family with its network's ``build`` (``mlp``, ``cnn``, ``resnet``,
``vgg``), imported at the first build; ``blocks`` holds what they share and
``stacked`` folds R replicas of a network into one. Adding a family means a
schema and a check in ``schemas.py``, its module, and ``configs/model/<name>.yaml``.

Importing this package loads no torch: composing and validating a config needs
the schemas and checks alone."""

from __future__ import annotations

from bnexp.models import schemas  # noqa: F401  registers every family
from bnexp.models.registry import FAMILIES, Family, build_model, family, register

__all__ = ["FAMILIES", "Family", "build_model", "family", "register"]
