"""Integrators of dx/dt = L * (A(x; t) + M(x; t)) on t in [0, 1]: native fixed-grid loops and a
bridge to torchdiffeq for everything else (adaptive methods, the adjoint).

Native schemes run a plain Python loop over a grid known in advance: every (step, stage) has a
time and a KV-cache slot, the weights of all stage times come from one cached evaluation, and
nothing depends on tensor values (no graph breaks under torch.compile).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS

# A sane bound on a step count: the grid's N weight sets (and KV slots) are allocated up front.
MAX_STEPS = 100_000

# torchdiffeq methods that walk a fixed grid (given a step size) rather than adapting it.
_TORCHDIFFEQ_FIXED = (
    "euler",
    "midpoint",
    "heun2",
    "heun3",
    "rk4",
    "explicit_adams",
    "implicit_adams",
    "fixed_adams",
)
TORCHDIFFEQ_METHODS = tuple(m for m in _TORCHDIFFEQ_SOLVERS if m != "scipy_solver")


def _scale(update: Tensor, s: float | Tensor) -> Tensor:
    # s is a float, a tensor being calibrated, or [B, 1, 1] when every sample has its own grid.
    return update if isinstance(s, float) and s == 1.0 else update * s


def _sequential(f, x: Tensor, gains: tuple) -> Tensor:
    # Lie-Trotter splitting with the schedule's two gains (uniform: L / N each). At N = L (gains
    # 1) exactly the original block, h = x + A(x), y = h + M(h).
    x = x + _scale(f.attention(x, 0), gains[0])
    return x + _scale(f.mlp(x, 0), gains[1])


def _euler(f, x: Tensor, h: float) -> Tensor:
    return x + h * f(x, 0)


def _midpoint(f, x: Tensor, h: float) -> Tensor:
    k1 = f(x, 0)
    return x + h * f(x + 0.5 * h * k1, 1)


def _heun(f, x: Tensor, h: float) -> Tensor:
    k1 = f(x, 0)
    k2 = f(x + h * k1, 1)
    return x + 0.5 * h * (k1 + k2)


def _rk4(f, x: Tensor, h: float) -> Tensor:
    # Kutta's 3/8 rule, the variant torchdiffeq calls "rk4".
    k1 = f(x, 0)
    k2 = f(x + h * k1 / 3, 1)
    k3 = f(x + h * (k2 - k1 / 3), 2)
    k4 = f(x + h * (k1 - k2 + k3), 3)
    return x + (k1 + 3 * (k2 + k3) + k4) * (h * 0.125)


@dataclass(frozen=True)
class Scheme:
    """A native fixed-grid scheme: stage times within a step (fractions of h) and the update."""

    name: str
    offsets: tuple[float, ...]
    step: Callable[..., Tensor]
    description: str

    @property
    def stages(self) -> int:
        return len(self.offsets)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(
            "sequential",
            (0.0,),
            _sequential,
            "x += a A(x); x += m M(x), a = m = L/N (exact at N = L)",
        ),
        Scheme("euler", (0.0,), _euler, "parallel field, explicit Euler (DiffEqFormer)"),
        Scheme("midpoint", (0.0, 0.5), _midpoint, "parallel field, explicit midpoint, order 2"),
        Scheme("heun", (0.0, 1.0), _heun, "parallel field, Heun's method, order 2"),
        Scheme("rk4", (0.0, 1 / 3, 2 / 3, 1.0), _rk4, "parallel field, Kutta's 3/8 rule, order 4"),
    )
}


@dataclass(frozen=True)
class Solver:
    """A validated choice of integrator: a native scheme or a torchdiffeq method."""

    name: str
    native: Scheme | None = None
    method: str | None = None  # torchdiffeq method name

    @property
    def fixed_grid(self) -> bool:
        return self.native is not None or self.method in _TORCHDIFFEQ_FIXED


def resolve_solver(name: str) -> Solver:
    """Resolve a scheme name: native names first, then torchdiffeq's (``"torchdiffeq:rk4"`` forces it).

    Example:
        >>> resolve_solver("rk4").native.stages, resolve_solver("dopri5").method
        (4, 'dopri5')
    """
    if not isinstance(name, str):
        raise TypeError(f"scheme must be a string, got {type(name).__name__}")
    forced = name.startswith("torchdiffeq:")
    method = name.removeprefix("torchdiffeq:")
    if not forced and method in SCHEMES:
        return Solver(name, native=SCHEMES[method])
    if method in TORCHDIFFEQ_METHODS:
        return Solver(name, method=method)
    raise ValueError(
        f"unknown scheme {name!r}. Native fixed-grid schemes: {', '.join(SCHEMES)}; "
        f"torchdiffeq methods: {', '.join(TORCHDIFFEQ_METHODS)} (prefix 'torchdiffeq:' to force one)"
    )


def check_steps(steps) -> int:
    """A step count must be an integer in [1, MAX_STEPS] (bools are refused)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an integer >= 1, got {steps!r} ({type(steps).__name__})")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > MAX_STEPS:
        raise ValueError(
            f"steps must be at most {MAX_STEPS:,} (one weight set each), got {steps:,}"
        )
    return int(steps)


def check_sample_steps(steps) -> Tensor:
    """Per-sample step counts: a 1-D integer tensor (or list) with every entry >= 1.

    Example:
        >>> check_sample_steps([8, 30, 12])
        tensor([ 8, 30, 12])
    """
    counts = torch.as_tensor(steps)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"per-sample steps must be a 1-D tensor with one count per sample, got shape {tuple(counts.shape)}"
        )
    if counts.dtype.is_floating_point or counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(f"per-sample steps must be integers, got dtype {counts.dtype}")
    if (counts < 1).any():
        raise ValueError(f"every per-sample step count must be >= 1, got {counts.tolist()}")
    if (counts > MAX_STEPS).any():
        raise ValueError(
            f"per-sample step counts must be at most {MAX_STEPS:,}, got {counts.tolist()}"
        )
    return counts.long()


def spans(steps: int, num_layers: int, ends: int = 0) -> list[float]:
    """How many layers of the original each of the N steps stands for (they sum to L).

    Uniform steps span L / N layers each. With ``ends`` = d discrete layers at each end, the first
    and last d steps span one layer each (they are those layers, whatever N) and the middle
    N - 2d steps share the other L - 2d layers evenly; at N = L every step spans one layer.

    Example:
        >>> spans(4, 6, ends=1)
        [1, 2.0, 2.0, 1]
    """
    if ends == 0:
        return [num_layers / steps] * steps
    if steps <= 2 * ends:
        raise ValueError(
            f"with discrete_ends = {ends} a grid needs more than {2 * ends} steps (the {ends} "
            f"discrete layers at each end and at least one step between them), got {steps}"
        )
    middle = (num_layers - 2 * ends) / (steps - 2 * ends)
    return [1] * ends + [middle] * (steps - 2 * ends) + [1] * ends


def layer_bounds(steps: int, num_layers: int, ends: int = 0) -> list[float]:
    """Where the N steps begin and end, in layers of the original (0 to L). A boundary that
    falls on a layer is the exact integer l, so its time l / L is the very float the hat basis
    has a node at (exact integer division is exact in floating point too).

    Example:
        >>> layer_bounds(4, 6, ends=1)
        [0.0, 1.0, 3.0, 5.0, 6.0]
    """
    spans(steps, num_layers, ends)  # checks that steps > 2 ends
    middle, inner = steps - 2 * ends, num_layers - 2 * ends
    bounds = []
    for i in range(steps + 1):
        if i <= ends:
            bounds.append(float(i))
        elif i >= steps - ends:
            bounds.append(float(num_layers - (steps - i)))
        else:
            bounds.append(ends + inner * (i - ends) / middle)
    return bounds


def stage_times(
    scheme: Scheme, steps: int, num_layers: int | None = None, ends: int = 0
) -> tuple[list[float], list[int]]:
    """The distinct times of a grid and, for each (step, stage) in order, the index of its time.

    Step i of N starts at t_i = i / N, so step l of N = L is layer l. With ``ends`` > 0 the steps
    are those of :func:`spans` (the layer times at the ends), which needs ``num_layers``.

    Example:
        >>> stage_times(SCHEMES["heun"], 2)
        ([0.0, 0.5, 1.0], [0, 1, 1, 2])
        >>> stage_times(SCHEMES["sequential"], 3, num_layers=6, ends=1)[0]
        [0.0, 0.16666666666666666, 0.8333333333333334]
    """
    if ends == 0:
        flat = [(i + c) / steps for i in range(steps) for c in scheme.offsets]
    else:
        bounds = layer_bounds(steps, num_layers, ends)
        flat = [
            (bounds[i] + c * (bounds[i + 1] - bounds[i])) / num_layers
            for i in range(steps)
            for c in scheme.offsets
        ]
    times = sorted(set(flat))
    where = {t: j for j, t in enumerate(times)}
    return times, [where[t] for t in flat]
