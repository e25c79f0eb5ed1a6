"""Normalization layers: a factory over PyTorch's own, plus ghost BN and batch renorm.

PyTorch ships batch, layer and group norm; ghost batch norm (Hoffer et al. 2017)
and batch renormalization (Ioffe 2017) are not in torch.nn, so they live here,
written so that their degenerate settings equal BatchNorm exactly (tests check).

Running variance (``norm.running_var``): torch.nn.BatchNorm moves running_var
towards the *unbiased* batch variance (times n / (n - 1), n values per
channel); Keras' BatchNormalization towards the *biased* one, the variance the
batch was normalized with. At batch 10 the two differ by 10/9. ``biased`` is
:class:`BiasedBatchNorm1d` / ``2d`` for norm=batch and a switch of
:class:`GhostBatchNorm`; :class:`BatchRenorm` keeps a running standard
deviation (Ioffe 2017, Algorithm 1), which no such rule touches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnexp.config import NormConfig, NormKind, RunningVar


class FP32Norm(nn.Module):
    """Mixed into every norm layer: under autocast it normalizes in fp32 (as
    cifar10-airbench keeps BN in fp32): batch statistics of half-precision
    activations lose too much. Without autocast it adds one flag check.

    A mixin rather than a wrapper module or a patched ``forward``: state_dict
    keys stay those of the torch layer, and a deepcopy is a self-contained copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta and torch.is_autocast_enabled(x.device.type):  # meta (bnexp.memory's estimate) has no autocast
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


def _per_channel(x: torch.Tensor) -> int:
    """How many values of ``x`` one channel's statistics are taken over."""
    return x.numel() // x.shape[1]


class _BiasedRunningVar:
    """torch.nn.BatchNorm with running_var moved towards the biased batch variance (Keras' rule).

    PyTorch's fused kernel (CPU, CUDA, cuDNN) always updates running_var with
    the unbiased variance v * n/(n-1) and offers no switch. Rather than take
    the batch statistics a second time, the kernel updates a copy of the buffer
    scaled by k = n/(n-1), and the buffer gets that divided by k:
    ((1-m)*k*rv + m*k*v) / k = (1-m)*rv + m*v. The copy, not the buffer, goes
    into the kernel because autograd keeps the kernel's running_var for the
    backward and refuses one changed in place after the forward. Two small ops
    on a C-sized vector per step; benchmarks/bench_norms.py measures the cost
    against nn.BatchNorm1d and against taking the statistics again.
    """

    # k = n/(n-1) as a 0-dim tensor on the buffer's device, made again when n, the
    # device or the dtype change: an op with a Python float converts it to a
    # tensor on every call, twice the op's cost on CPU.
    _n: int | None = None
    _k: torch.Tensor | None = None

    def _apply(self, fn, *args, **kwargs):
        self._n = None  # .to(), .cuda(), .double(): k follows the buffer
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(x)
        self._check_input_dim(x)
        # nn.BatchNorm's training path, with the buffer handling above.
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        rv, n = self.running_var, _per_channel(x)
        if n != self._n:
            self._n, self._k = n, torch.tensor(n / (n - 1) if n > 1 else 1.0, device=rv.device, dtype=rv.dtype)
        scaled = rv * self._k
        out = F.batch_norm(x, self.running_mean, scaled, self.weight, self.bias, True, momentum, self.eps)
        torch.div(scaled, self._k, out=rv)  # no autograd here: neither tensor requires grad
        return out


class BiasedBatchNorm1d(FP32Norm, _BiasedRunningVar, nn.BatchNorm1d):
    """nn.BatchNorm1d whose running_var averages the biased batch variance (norm.running_var=biased)."""


class BiasedBatchNorm2d(FP32Norm, _BiasedRunningVar, nn.BatchNorm2d):
    """nn.BatchNorm2d whose running_var averages the biased batch variance (norm.running_var=biased)."""


class _RunningStatsNorm(nn.Module):
    """What the two batch-statistics norms written here share: gamma, beta, eps, momentum."""

    # The running statistic of spread: running_var here (nn.BatchNorm's name),
    # running_std for batch renorm (Ioffe 2017 keeps sigma).
    spread = "running_var"

    def __init__(self, num_features: int, eps: float, momentum: float, track_running_stats: bool):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.track_running_stats = track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer(self.spread, torch.ones(num_features))
        else:
            self.running_mean = None
            setattr(self, self.spread, None)

    def _affine(self, x_hat: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            x_hat = x_hat * _broadcast(self.weight, x_hat)
        if self.bias is not None:
            x_hat = x_hat + _broadcast(self.bias, x_hat)
        return x_hat

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-channel mean and biased variance of the batch, and how many values each is over."""
        var, mean = torch.var_mean(x, _reduce_dims(x), unbiased=False)
        return mean, var, _per_channel(x)

    def _use_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, track_running_stats={self.track_running_stats}"


class _GhostBatchNorm(_RunningStatsNorm):
    """BatchNorm whose training statistics come from virtual sub-batches (Hoffer et al. 2017, Sec. 4).

    The batch is cut into chunks of ``virtual_batch_size``; each chunk is
    normalized with its own mean and variance, and the running statistics move
    towards the average of the chunks' statistics. With one chunk it is BatchNorm.
    Buffers as torch.nn.BatchNorm's: ``running_mean`` and ``running_var``, a
    variance (each chunk's unbiased one by default, its biased one with
    ``unbiased=False``); eval mode normalizes by sqrt(running_var + eps).
    """

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum: float = 0.1,
                 track_running_stats: bool = True, unbiased: bool = True):
        super().__init__(num_features, eps, momentum, track_running_stats)
        self.virtual_batch_size, self.unbiased = virtual_batch_size, unbiased

    def _running_var_of(self, var: torch.Tensor, count: int) -> torch.Tensor:
        """What running_var moves towards for a biased variance of ``count`` values."""
        return _unbiased(var, count) if self.unbiased else var

    def _update_running(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        # The rule of torch.nn.BatchNorm: running = (1 - m) * running + m * batch.
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach(), self.momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_batch_stats():
            rm, rv = _broadcast(self.running_mean, x), _broadcast(self.running_var, x)
            return self._affine((x - rm) / torch.sqrt(rv + self.eps))
        n, vbs = x.shape[0], self.virtual_batch_size
        if n % vbs:
            # A ragged batch (only seen outside training's fixed batch size) is split unevenly.
            outs, means, vars_ = [], [], []
            for c in torch.split(x, vbs):
                mean, var, count = self._moments(c)
                outs.append((c - _broadcast(mean, c)) / torch.sqrt(_broadcast(var, c) + self.eps))
                means.append(mean)
                vars_.append(self._running_var_of(var, count))
            x_hat = torch.cat(outs)
            mean, running_var = torch.stack(means).mean(0), torch.stack(vars_).mean(0)
        else:
            g = x.reshape(n // vbs, vbs, *x.shape[1:])
            dims = [1] + list(range(3, g.dim()))
            var, mean = torch.var_mean(g, dims, unbiased=False, keepdim=True)
            x_hat = ((g - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
            mean = mean.flatten(1).mean(0)
            running_var = self._running_var_of(var.flatten(1), g[0].numel() // g.shape[2]).mean(0)
        if self.track_running_stats:
            self._update_running(mean, running_var)
        return self._affine(x_hat)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}, unbiased={self.unbiased}"


class _BatchRenorm(_RunningStatsNorm):
    """Batch renormalization, Ioffe 2017, Algorithm 1.

    Training, per channel, with the batch's mu_B and sigma_B = sqrt(biased
    batch variance + eps) and the running mu and sigma::

        r = clip(sigma_B / sigma, 1/rmax, rmax)        (stop-gradient)
        d = clip((mu_B - mu) / sigma, -dmax, dmax)     (stop-gradient)
        y = ((x - mu_B) / sigma_B * r + d) * gamma + beta
        mu    <- mu + momentum * (mu_B - mu)
        sigma <- sigma + momentum * (sigma_B - sigma)

    and inference ``y = (x - mu) / sigma * gamma + beta``. Buffers:
    ``running_mean`` (mu, starts at 0) and ``running_std`` (sigma, a standard
    deviation with eps already inside, starts at 1; not a variance, so there is
    no ``running_var``). Momentum is PyTorch's convention (the paper's alpha).
    With rmax=1 and dmax=0 training is BatchNorm's; the running sigma still
    follows the algorithm, so inference differs from nn.BatchNorm's, which
    normalizes by sqrt(running unbiased variance + eps).
    """

    spread = "running_std"

    def __init__(self, num_features: int, rmax: float = 3.0, dmax: float = 5.0, eps: float = 1e-5, momentum: float = 0.1,
                 track_running_stats: bool = True):
        super().__init__(num_features, eps, momentum, track_running_stats)
        self.rmax, self.dmax = rmax, dmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_batch_stats():
            return self._affine((x - _broadcast(self.running_mean, x)) / _broadcast(self.running_std, x))
        mean, var, _ = self._moments(x)
        std = torch.sqrt(var + self.eps)
        x_hat = (x - _broadcast(mean, x)) / _broadcast(std, x)
        if self.track_running_stats:
            with torch.no_grad():
                r = (std / self.running_std).clamp(1.0 / self.rmax, self.rmax)
                d = ((mean - self.running_mean) / self.running_std).clamp(-self.dmax, self.dmax)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_std.lerp_(std, self.momentum)
            x_hat = x_hat * _broadcast(r, x) + _broadcast(d, x)
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
    unbiased = RunningVar(cfg.running_var) == RunningVar.unbiased
    if kind == NormKind.batch:
        one_d, two_d = (BatchNorm1d, BatchNorm2d) if unbiased else (BiasedBatchNorm1d, BiasedBatchNorm2d)
        cls = {0: one_d, 1: one_d, 2: two_d}[spatial_dims]
        norm: nn.Module = cls(num_features, eps=cfg.eps, momentum=cfg.momentum, track_running_stats=cfg.track_running_stats)
    elif kind == NormKind.ghost_batch:
        norm = GhostBatchNorm(num_features, cfg.virtual_batch_size, eps=cfg.eps, momentum=cfg.momentum,
                              track_running_stats=cfg.track_running_stats, unbiased=unbiased)
    elif kind == NormKind.batch_renorm:
        norm = BatchRenorm(num_features, rmax=cfg.rmax, dmax=cfg.dmax, eps=cfg.eps, momentum=cfg.momentum, track_running_stats=cfg.track_running_stats)
    elif kind == NormKind.layer:
        # Over an image, "layer" norm normalizes each example over (C, H, W):
        # GroupNorm with one group is exactly that, with per-channel gamma/beta
        # (C of each), where nn.LayerNorm([C, H, W]) and Keras'
        # LayerNormalization(axis=[1, 2, 3]) learn one per element (C*H*W).
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


def tracks_unbiased_var(norm: nn.Module) -> bool:
    """Whether ``norm``'s running_var averages unbiased batch variances (torch's
    rule; norm.running_var=unbiased) rather than biased ones (Keras')."""
    return not isinstance(norm, _BiasedRunningVar) and getattr(norm, "unbiased", True)


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
