"""Group and layer norm against torch's functional references, in cases where
the wrong grouping gives another output: norm.groups really sets the groups,
and an image's layer norm normalizes over (C, H, W), not per channel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnexp.config import NormConfig, NormKind
from bnexp.models import build_model
from bnexp.models.cnn import CNNConfig
from bnexp.models.mlp import MLPConfig
from bnexp.norms import make_norm


def affine_at_random(norm: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def images(c: int = 8) -> torch.Tensor:
    """Channels with their own scales and offsets, so that every grouping normalizes differently."""
    g = torch.Generator().manual_seed(0)
    scale = torch.arange(1, c + 1, dtype=torch.float64).view(1, c, 1, 1)
    return (torch.randn(4, c, 5, 5, generator=g, dtype=torch.float64) * scale + scale).float()


@pytest.mark.parametrize("groups", [2, 4])
def test_group_norm_normalizes_over_norm_groups_groups_as_f_group_norm_does(groups):
    x = images()
    norm = affine_at_random(make_norm(NormConfig(kind=NormKind.group, groups=groups), 8, 2))
    want = F.group_norm(x, groups, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(norm(x), want)
    for other in {1, 2, 4, 8} - {groups}:  # the group count changes the output here
        assert not torch.allclose(F.group_norm(x, other, norm.weight, norm.bias, norm.eps), want, atol=1e-3)


def test_a_cnns_group_norms_use_the_configured_groups():
    cfg = CNNConfig(hidden=[8, 8])
    model = build_model(cfg, NormConfig(kind=NormKind.group, groups=4, placement="pre"), (3, 10, 10), 10)
    norms = [m for name, m in model.named_modules() if name.endswith(".norm")]
    assert len(norms) == 2
    for norm in norms:
        affine_at_random(norm)
        x = images()
        torch.testing.assert_close(norm(x), F.group_norm(x, 4, norm.weight, norm.bias, norm.eps))


def test_layer_norm_of_an_image_normalizes_each_example_over_c_h_w_not_each_channel():
    x = images()
    norm = affine_at_random(make_norm(NormConfig(kind=NormKind.layer), 8, 2))
    per_example = F.layer_norm(x, x.shape[1:], eps=norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), per_example)
    per_channel = F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps)  # what it must not be
    assert not torch.allclose(norm(x), per_channel, atol=1e-3)


def test_layer_norm_of_features_is_f_layer_norm_and_an_mlps_layer_norms_are_that():
    x = images()[:, :, 0, 0] * torch.arange(1, 9)
    norm = affine_at_random(make_norm(NormConfig(kind=NormKind.layer), 8, 0))
    torch.testing.assert_close(norm(x), F.layer_norm(x, (8,), norm.weight, norm.bias, norm.eps))
    model = build_model(MLPConfig(hidden=[8, 8]), NormConfig(kind=NormKind.layer), (8,), 3)
    for name, m in model.named_modules():
        if name.endswith(".norm"):
            affine_at_random(m)
            torch.testing.assert_close(m(x), F.layer_norm(x, (8,), m.weight, m.bias, m.eps))
