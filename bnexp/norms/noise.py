"""``norm.noise``: Santurkar et al. 2018's noisy BatchNorm, a module after a norm (not a norm kind)."""

from __future__ import annotations

import torch
from torch import nn

from bnexp.config import NormConfig


class BatchNoise(nn.Module):
    """Santurkar et al. 2018, Algorithm 1 ("noisy" BatchNorm): time-varying,
    non-zero-mean, non-unit-variance noise after a norm, to add internal
    covariate shift on purpose. In training, at every forward (one per step):
    per unit j, mu_j ~ U(-n_mu, n_mu) and sigma_j ~ U(1, n_sigma); per example
    (and, in conv layers, per position: H and W count as batch)
    m ~ U(mu_j - r_mu, mu_j + r_mu), s ~ N(sigma_j, r_sigma^2); a <- s * a + m.
    In eval mode it is the identity: the noise stands for a shifting input
    distribution during training, not for part of the deployed network.

    Draws come from torch's global generator (seeded by the run, checkpointed),
    so a resumed run draws the same noise."""

    def __init__(self, mu: float, sigma: float, r_mu: float, r_sigma: float):
        super().__init__()
        self.mu, self.sigma, self.r_mu, self.r_sigma = mu, sigma, r_mu, r_sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        units = (1, x.shape[1], *([1] * (x.dim() - 2)))  # one draw per unit (channel), shared by the batch
        mu = torch.empty(units, device=x.device, dtype=x.dtype).uniform_(-self.mu, self.mu)
        sigma = torch.empty(units, device=x.device, dtype=x.dtype).uniform_(1.0, self.sigma)
        m = mu + torch.empty_like(x).uniform_(-self.r_mu, self.r_mu)
        s = sigma + self.r_sigma * torch.randn_like(x)
        return s * x + m

    def extra_repr(self) -> str:
        return f"mu={self.mu}, sigma={self.sigma}, r_mu={self.r_mu}, r_sigma={self.r_sigma}"


def make_noise(cfg: NormConfig) -> BatchNoise | None:
    """The noise module of ``norm.noise`` (None when off)."""
    if not getattr(cfg, "noise", False):
        return None
    return BatchNoise(cfg.noise_mu, cfg.noise_sigma, cfg.noise_r_mu, cfg.noise_r_sigma)

