"""Normalization layers: a factory over PyTorch's own, plus ghost BN and batch renorm.

PyTorch ships batch, layer and group norm; ghost batch norm (Hoffer et al. 2017)
and batch renormalization (Ioffe 2017) are not in torch.nn, so they live here,
written so that their degenerate settings equal BatchNorm exactly (tests check).
"""

from __future__ import annotations

import torch
from torch import nn

from bnexp.config import NormConfig, NormKind


class FP32Norm(nn.Module):
    """Mixed into every norm layer: under autocast it normalizes in fp32 (as
    cifar10-airbench keeps BN in fp32): batch statistics of half-precision
    activations lose too much. Without autocast it adds one flag check.

    A mixin rather than a wrapper module or a patched ``forward``: state_dict
    keys stay those of the torch layer, and a deepcopy is a self-contained copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class BatchNorm1d(FP32Norm, nn.BatchNorm1d):
    pass


class BatchNorm2d(FP32Norm, nn.BatchNorm2d):
    pass


class LayerNorm(FP32Norm, nn.LayerNorm):
    pass


class GroupNorm(FP32Norm, nn.GroupNorm):
    pass


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _broadcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class _RunningStatsNorm(nn.Module):
    """Shared parameters and buffers of the two batch-statistics norms written here."""

    def __init__(self, num_features: int, eps: float, momentum: float, track_running_stats: bool):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.track_running_stats = track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
        else:
            self.running_mean = self.running_var = None

    def _affine(self, x_hat: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            x_hat = x_hat * _broadcast(self.weight, x_hat)
        if self.bias is not None:
            x_hat = x_hat + _broadcast(self.bias, x_hat)
        return x_hat

    def _update_running(self, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
        # Same rule as torch.nn.BatchNorm: running = (1 - m) * running + m * batch (unbiased var).
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var_unbiased.detach(), self.momentum)

    def _use_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def _eval(self, x: torch.Tensor) -> torch.Tensor:
        rm, rv = _broadcast(self.running_mean, x), _broadcast(self.running_var, x)
        return self._affine((x - rm) / torch.sqrt(rv + self.eps))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, track_running_stats={self.track_running_stats}"


class _GhostBatchNorm(_RunningStatsNorm):
    """BatchNorm whose training statistics come from virtual sub-batches (Hoffer et al. 2017, Sec. 4).

    The batch is cut into chunks of ``virtual_batch_size``; each chunk is
    normalized with its own mean and variance, and the running statistics move
    towards the average of the chunks' statistics. With one chunk it is BatchNorm.
    """

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum: float = 0.1, track_running_stats: bool = True):
        super().__init__(num_features, eps, momentum, track_running_stats)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_batch_stats():
            return self._eval(x)
        n, vbs = x.shape[0], self.virtual_batch_size
        if n % vbs:
            # A ragged batch (only seen outside training's fixed batch size) is split unevenly.
            chunks = torch.split(x, vbs)
            outs, means, vars_ = [], [], []
            for c in chunks:
                dims = _reduce_dims(c)
                mean, var = c.mean(dims), c.var(dims, unbiased=False)
                outs.append((c - _broadcast(mean, c)) / torch.sqrt(_broadcast(var, c) + self.eps))
                count = c.numel() // c.shape[1]
                means.append(mean)
                vars_.append(_unbiased(var, count))
            x_hat = torch.cat(outs)
            mean, var_unbiased = torch.stack(means).mean(0), torch.stack(vars_).mean(0)
        else:
            g = x.reshape(n // vbs, vbs, *x.shape[1:])
            dims = [1] + list(range(3, g.dim()))
            mean = g.mean(dims, keepdim=True)
            var = g.var(dims, unbiased=False, keepdim=True)
            x_hat = ((g - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
            count = g[0].numel() // g.shape[2]
            mean, var = mean.flatten(1).mean(0), var.flatten(1)
            var_unbiased = _unbiased(var, count).mean(0)
        if self.track_running_stats:
            self._update_running(mean, var_unbiased)
        return self._affine(x_hat)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


class _BatchRenorm(_RunningStatsNorm):
    """Batch renormalization (Ioffe 2017, Algorithm 1).

    Training output is ``((x - mu_B) / sigma_B * r + d) * gamma + beta`` with
    ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and ``d = clip((mu_B - mu) / sigma, -dmax, dmax)``
    treated as constants in backprop, where mu, sigma are the running statistics.
    With rmax=1 and dmax=0 it is BatchNorm.
    """

    def __init__(self, num_features: int, rmax: float = 3.0, dmax: float = 5.0, eps: float = 1e-5, momentum: float = 0.1, track_running_stats: bool = True):
        super().__init__(num_features, eps, momentum, track_running_stats)
        self.rmax, self.dmax = rmax, dmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_batch_stats():
            return self._eval(x)
        dims = _reduce_dims(x)
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        std = torch.sqrt(var + self.eps)
        x_hat = (x - _broadcast(mean, x)) / _broadcast(std, x)
        if self.track_running_stats:
            with torch.no_grad():
                running_std = torch.sqrt(self.running_var + self.eps)
                r = (std / running_std).clamp(1.0 / self.rmax, self.rmax)
                d = ((mean - self.running_mean) / running_std).clamp(-self.dmax, self.dmax)
            x_hat = x_hat * _broadcast(r, x) + _broadcast(d, x)
            count = x.numel() // x.shape[1]
            self._update_running(mean, _unbiased(var, count))
        return self._affine(x_hat)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}"


class GhostBatchNorm(FP32Norm, _GhostBatchNorm):
    __doc__ = _GhostBatchNorm.__doc__


class BatchRenorm(FP32Norm, _BatchRenorm):
    __doc__ = _BatchRenorm.__doc__


def make_norm(cfg: NormConfig, num_features: int, spatial_dims: int) -> nn.Module:
    """The norm layer of kind ``cfg.kind`` for ``num_features`` channels.

    ``spatial_dims`` is 0 for an MLP's [N, C], 1 for [N, C, L], 2 for [N, C, H, W].
    """
    kind = NormKind(cfg.kind)
    if kind == NormKind.batch:
        cls = {0: BatchNorm1d, 1: BatchNorm1d, 2: BatchNorm2d}[spatial_dims]
        norm: nn.Module = cls(num_features, eps=cfg.eps, momentum=cfg.momentum, track_running_stats=cfg.track_running_stats)
    elif kind == NormKind.ghost_batch:
        norm = GhostBatchNorm(num_features, cfg.virtual_batch_size, eps=cfg.eps, momentum=cfg.momentum, track_running_stats=cfg.track_running_stats)
    elif kind == NormKind.batch_renorm:
        norm = BatchRenorm(num_features, rmax=cfg.rmax, dmax=cfg.dmax, eps=cfg.eps, momentum=cfg.momentum, track_running_stats=cfg.track_running_stats)
    elif kind == NormKind.layer:
        # Over an image, "layer" norm normalizes each example over (C, H, W):
        # GroupNorm with one group is exactly that, with per-channel gamma/beta.
        norm = LayerNorm(num_features, eps=cfg.eps) if spatial_dims == 0 else GroupNorm(1, num_features, eps=cfg.eps)
    else:
        norm = GroupNorm(cfg.groups, num_features, eps=cfg.eps)
    _set_affine(norm, cfg)
    return norm


def _set_affine(norm: nn.Module, cfg: NormConfig) -> None:
    # Keras' center=False / scale=False: no beta / no gamma at all (not a frozen
    # parameter), so optimizers and gradient-norm logging never see them.
    # torch's functional norms accept weight=None and bias=None.
    with torch.no_grad():
        if cfg.scale:
            norm.weight.fill_(cfg.gamma_init)
        else:
            norm.register_parameter("weight", None)
        if cfg.center:
            norm.bias.fill_(cfg.beta_init)
        else:
            norm.register_parameter("bias", None)


def _unbiased(var: torch.Tensor, count: int) -> torch.Tensor:
    """The biased variance of ``count`` values made unbiased, as BatchNorm's running_var is."""
    return var * count / max(count - 1, 1)


# Every kind of normalization layer make_norm builds.
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, _RunningStatsNorm)


def is_centered(norm: nn.Module | None) -> bool:
    """Whether the norm subtracts a per-feature mean, which makes a preceding bias redundant."""
    return isinstance(norm, (nn.modules.batchnorm._BatchNorm, _RunningStatsNorm))


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


def running_stat_norms(model: nn.Module) -> list[nn.Module]:
    """The norm layers that keep running statistics (BN, ghost BN, batch renorm): what PreciseBN recomputes."""
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, _RunningStatsNorm)) and m.track_running_stats]


def use_batch_statistics(model: nn.Module) -> list[nn.Module]:
    """Eval mode for everything (norm.noise off) except the norms with running
    statistics, which normalize with each batch's own statistics as in training
    (and update their running statistics: callers restore or replace them).
    Returns those norms."""
    model.eval()
    norms = running_stat_norms(model)
    for m in norms:
        m.train()
    return norms
