"""Time bases: functions c(t) in R^K such that every block parameter is p(t) = sum_k c_k(t) P_k.

A basis maps times of shape [n] to coefficients of shape [n, K] (float32), so the weights of a
whole time grid come from one matrix product per parameter. Fixed bases have no parameters and
are evaluated in float64 on the CPU (exact at the layer nodes, whatever the model's dtype);
the learned Fourier unit is evaluated in float32 on the model's device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TimeBasis(nn.Module):
    """Base class: ``forward(t[n]) -> c[n, K]`` in float32 on ``t``'s device."""

    num_basis: int
    learned: bool = False


class _FixedBasis(TimeBasis):
    """A parameter-free basis on the interval [lo, hi]; times outside are clamped to it."""

    def __init__(self, num_basis: int, lo: float, hi: float):
        super().__init__()
        self.num_basis, self.lo, self.hi = num_basis, lo, hi

    def forward(self, t: Tensor) -> Tensor:
        t64 = t.to("cpu", torch.float64).clamp(self.lo, self.hi)
        return self._evaluate(t64).to(device=t.device, dtype=torch.float32)

    def _unit(self, t: Tensor) -> Tensor:
        """Map [lo, hi] to [0, 1]."""
        return (t - self.lo) / (self.hi - self.lo) if self.hi > self.lo else torch.zeros_like(t)

    def _evaluate(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"K={self.num_basis}, t in [{self.lo:.4g}, {self.hi:.4g}]"


class HatBasis(_FixedBasis):
    """Piecewise-linear hat functions on K equispaced nodes: W(t) blends the two nearest nodes.

    With K = L nodes at the layer times l / L, W(l / L) is layer l's weight exactly.

    Example:
        >>> HatBasis(4, 0.0, 0.75)(torch.tensor([0.0, 0.125, 0.75]))
        tensor([[1.0000, 0.0000, 0.0000, 0.0000],
                [0.5000, 0.5000, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.0000, 1.0000]])
    """

    def _evaluate(self, t: Tensor) -> Tensor:
        if self.num_basis == 1:
            return torch.ones(len(t), 1, dtype=t.dtype)
        u = self._unit(t) * (self.num_basis - 1)
        # Snap float64 round-off (~1e-16) at the nodes, far below float32 resolution, so W at a
        # node is that node's tensor bit for bit rather than a blend with 1e-16 of its neighbour.
        # (The snapped value keeps u's gradient, so a time being calibrated moves off a node.)
        u = torch.where((u - u.round()).abs() < 1e-9, u.round() + (u - u.detach()), u)
        nodes = torch.arange(self.num_basis, dtype=t.dtype)
        return (1 - (u[:, None] - nodes[None, :]).abs()).clamp_min(0)


class ChebyshevBasis(_FixedBasis):
    """Chebyshev polynomials T_0..T_{K-1} of the first kind on [lo, hi] (smooth, global).

    Example:
        >>> ChebyshevBasis(3, 0.0, 1.0)(torch.tensor([0.0, 0.5, 1.0]))
        tensor([[ 1., -1.,  1.],
                [ 1.,  0., -1.],
                [ 1.,  1.,  1.]])
    """

    def _evaluate(self, t: Tensor) -> Tensor:
        x = 2 * self._unit(t) - 1
        cols = [torch.ones_like(x), x]
        for _ in range(2, self.num_basis):
            cols.append(2 * x * cols[-1] - cols[-2])
        return torch.stack(cols[: self.num_basis], dim=1)


class LegendreBasis(_FixedBasis):
    """Legendre polynomials P_0..P_{K-1} on [lo, hi] (smooth, global, orthogonal in L2).

    Example:
        >>> LegendreBasis(3, 0.0, 1.0)(torch.tensor([1.0]))
        tensor([[1., 1., 1.]])
    """

    def _evaluate(self, t: Tensor) -> Tensor:
        x = 2 * self._unit(t) - 1
        cols = [torch.ones_like(x), x]
        for k in range(1, self.num_basis - 1):
            cols.append(((2 * k + 1) * x * cols[-1] - k * cols[-2]) / (k + 1))
        return torch.stack(cols[: self.num_basis], dim=1)


def fourier_frequencies(features: int) -> Tensor:
    """The Fourier unit's w_j = exp(-ln(1e4) j / S), j < S (float32).

    Example:
        >>> fourier_frequencies(2)
        tensor([1.0000, 0.0100])
    """
    return torch.exp(-math.log(1e4) * torch.arange(features, dtype=torch.float32) / features)


class FourierUnit(TimeBasis):
    """The DiffEqFormer time-dependent unit: c(t) = [1, g(t)] with g = Lin2(SiLU(Lin1(phi(t)))).

    phi(t) = [t, sin(1000 t w_j), cos(1000 t w_j)], w_j = exp(-ln(1e4) j / S), j < S, so
    W(t) = P_0 + sum_e g_e(t) P_e: a constant matrix plus E learned time directions.

    Example:
        >>> FourierUnit(num_basis=21, features=128)(torch.linspace(0, 1, 5)).shape
        torch.Size([5, 21])
    """

    learned = True

    def __init__(self, num_basis: int, features: int = 128, hidden: int = 64):
        super().__init__()
        if num_basis < 2:
            raise ValueError(
                f"the fourier unit needs num_basis >= 2 (1 + E directions), got {num_basis}"
            )
        self.num_basis = num_basis
        self.register_buffer("freqs", fourier_frequencies(features), persistent=False)
        self.lin1 = nn.Linear(2 * features + 1, hidden)
        self.lin2 = nn.Linear(hidden, num_basis - 1)

    def features(self, t: Tensor) -> Tensor:
        t = t.float()[:, None]
        angles = 1000.0 * t * self.freqs.float()[None, :]
        return torch.cat([t, angles.sin(), angles.cos()], dim=1)

    def forward(self, t: Tensor) -> Tensor:
        with torch.autocast(t.device.type, enabled=False):
            lin1, lin2 = self.lin1, self.lin2
            h = nn.functional.silu(
                nn.functional.linear(self.features(t), lin1.weight.float(), lin1.bias.float())
            )
            g = nn.functional.linear(h, lin2.weight.float(), lin2.bias.float())
        return torch.cat([torch.ones_like(g[:, :1]), g], dim=1)


_FIXED = {"hat": HatBasis, "chebyshev": ChebyshevBasis, "legendre": LegendreBasis}
BASES = (*_FIXED, "fourier")


def make_basis(name: str, num_basis: int, num_layers: int, **kwargs) -> TimeBasis:
    """Build a time basis by name. Fixed bases span the layer times [0, (L - 1) / L].

    Example:
        >>> make_basis("hat", num_basis=12, num_layers=12).num_basis
        12
    """
    if name in _FIXED:
        if kwargs:
            raise ValueError(f"basis {name!r} takes no options, got {sorted(kwargs)}")
        return _FIXED[name](num_basis, 0.0, (num_layers - 1) / num_layers)
    if name == "fourier":
        return FourierUnit(num_basis, **kwargs)
    raise ValueError(f"unknown basis {name!r}; choose one of {', '.join(BASES)}")


def default_num_basis(name: str, num_layers: int) -> int:
    """K when the user gives none: L for fixed bases (exact fit), E + 1 = 21 for the Fourier unit."""
    return 21 if name == "fourier" else num_layers
