"""Where every family gets its weight layers (as timm injects ``conv_layer``):
the hidden blocks' linear and conv layers, the stems and the projection
shortcuts come from :func:`linear` and :func:`conv`, and their norms from
:func:`bnexp.norms.make_norm`. A reparametrized layer is one change here, and
reaches every family: ``norm.weight_std`` makes every one of them a
weight-standardized layer. The classifier (``output``) is a plain
``nn.Linear``: it is no layer a norm follows, and neither WS paper
standardizes it.

``cfg`` is the run's norm config (None: plain layers, as for a block built by
hand); ``activation``, the model's nonlinearity, gives scaled WS its gain.

Weight standardization (Qiao et al. 2019, Eq. 5): each output unit's weights
(a row of a Linear's, an output channel's C_in x k x k of a conv's) have their
mean subtracted and are divided by their standard deviation, in every forward
pass: W_hat = (W - mean) / sqrt(var + 1e-6) (biased variance; the 1e-6 is
timm's ``StdConv2d``'s). ``scaled`` is the NF-ResNets' scaled WS (Brock et al.
2021a, Sec. 5.2): W_hat = gamma * g * (W - mean) / (sqrt(var + 1e-6) * sqrt(N)),
N the fan-in, g a learned gain per output unit (1 at init), gamma the
activation's gain 1 / std(act(z)) for z ~ N(0, 1), which keeps the variance of
a unit-variance signal through the layer and the activation (:data:`GAINS`).
The parameters stay the raw W (and ``gain``), so weight decay, gradient
clipping and ``weight_norm/*`` see the weights the optimizer moves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bnexp.config import Activation, NormConfig

WS_EPS = 1e-6

# gamma = 1 / std(act(z)), z ~ N(0, 1) (Brock et al. 2021a, Sec. 4: ReLU's is sqrt(2 / (1 - 1/pi))),
# by numerical integration (scipy.integrate.quad, 1e-13); leaky_relu with torch's slope 0.01.
# timm's _nonlin_gamma table, estimated by sampling, differs from these by up to 0.1%.
GAINS = {
    Activation.relu: 1.712858550, Activation.sigmoid: 4.801313372, Activation.tanh: 1.592537420, Activation.gelu: 1.700926243,
    Activation.silu: 1.787187222, Activation.elu: 1.270843418, Activation.leaky_relu: 1.704831627, Activation.identity: 1.0,
}


WEIGHT_STD = (False, True, "scaled")  # norm.weight_std's values (bnexp.schema.validate refuses others)


def ws_mode(cfg: NormConfig | None) -> str | None:
    """None (off), "plain" or "scaled", from norm.weight_std."""
    value = getattr(cfg, "weight_std", False) if cfg is not None else False
    return {True: "plain", "scaled": "scaled"}.get(value) if value is not False else None


def standardized(w: torch.Tensor, unit_dims: int, gain: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """``w`` with each unit's weights standardized; a unit is an index into the first ``unit_dims``
    dims (1 for one layer; 2 for a stack's [R, out, in] Linear weights), its weights all the rest.
    With ``gain`` (scaled WS, shaped as those first dims) times gamma * gain / sqrt(fan-in)."""
    dims = list(range(unit_dims, w.dim()))
    var, mean = torch.var_mean(w, dims, unbiased=False, keepdim=True)
    w_hat = (w - mean) * torch.rsqrt(var + WS_EPS)
    if gain is None:
        return w_hat
    fan_in = math.prod(w.shape[unit_dims:])
    return w_hat * (gain.view(*gain.shape, *[1] * len(dims)) * (gamma / math.sqrt(fan_in)))


class _Standardized:
    """What a weight-standardized layer adds to torch's: the mode, the gain, the standardized weight."""

    def _init_ws(self, scaled: bool, gamma: float) -> None:
        self.scaled, self.gamma = scaled, gamma
        out = self.weight.shape[0]
        self.gain = nn.Parameter(torch.ones(out, device=self.weight.device)) if scaled else None

    def std_weight(self) -> torch.Tensor:
        return standardized(self.weight, 1, self.gain, self.gamma)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", scaled_ws(gamma={self.gamma:.4g})" if self.scaled else ", ws")


class WSLinear(_Standardized, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, scaled: bool, gamma: float):
        super().__init__(in_features, out_features, bias=bias)
        self._init_ws(scaled, gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.std_weight(), self.bias)


class _StandardizedConv(_Standardized):
    def __init__(self, *args, scaled: bool, gamma: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_ws(scaled, gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.std_weight(), self.bias)


class WSConv1d(_StandardizedConv, nn.Conv1d):
    pass


class WSConv2d(_StandardizedConv, nn.Conv2d):
    pass


STANDARDIZED = (WSLinear, WSConv1d, WSConv2d)


def linear(in_features: int, out_features: int, bias: bool = True, *, cfg: NormConfig | None = None,
           activation: Activation | str = Activation.relu) -> nn.Module:
    mode = ws_mode(cfg)
    if mode is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return WSLinear(in_features, out_features, bias, scaled=mode == "scaled", gamma=GAINS[Activation(activation)])


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True, *,
         dims: int = 2, cfg: NormConfig | None = None, activation: Activation | str = Activation.relu) -> nn.Module:
    """A ``dims``-D convolution (1: [N, C, L], 2: [N, C, H, W])."""
    mode = ws_mode(cfg)
    if mode is None:
        return {1: nn.Conv1d, 2: nn.Conv2d}[dims](in_channels, out_channels, kernel_size, stride, padding, bias=bias)
    cls = {1: WSConv1d, 2: WSConv2d}[dims]
    return cls(in_channels, out_channels, kernel_size, stride, padding, bias=bias, scaled=mode == "scaled",
               gamma=GAINS[Activation(activation)])
