"""Finite-time Lyapunov exponents of any discrete flow, by the QR (Benettin) recursion.

A flow is a sequence of step maps x_{i+1} = S_i(x_i), i = 0..N-1, covering a time ``duration``.
Its finite-time Lyapunov exponents (FTLEs) are lambda_j = log(sigma_j(D)) / duration, where
sigma_j are the singular values of the flow's Jacobian D = J_{N-1} ... J_0 (J_i = dS_i / dx at
x_i). Nothing here builds a Jacobian: a *tangent map* pushes p tangent columns Q through one step
(J_i Q, e.g. by a Jacobian-vector product) and an *adjoint map* pulls p columns back
(J_i^T U, a vector-Jacobian product).

Benettin's recursion re-orthonormalises after every step, J_i Q_i = Q_{i+1} R_{i+1}, so
D Q_0 = Q_N R_N ... R_1 and the exponents sum(log |diag R|) / duration are those of D restricted
to span(Q_0) in Gram-Schmidt form. They equal the FTLEs when Q_0 spans the top-p right singular
vectors of D; for a random Q_0 they do only as the duration grows (the classical asymptotic
Lyapunov exponents: ``refine=0``). For finite time, ``refine`` runs that many subspace
iterations on D^T D (a forward tangent pass, then a backward adjoint pass, both
re-orthonormalised every step) and reports the Rayleigh-Ritz values of the last pass: the log
singular values of D Q_0 = Q_N (R_N ... R_1), read off the accumulated p x p triangular factors.
The Ritz value for sigma_j converges like (sigma_{p+1} / sigma_j)^(2 * refine), far faster than
the Gram-Schmidt diagonal when the top singular values are close.

Batch dimensions are independent systems: a state is [..., n], tangent columns are [..., n, p].
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

# (i, x_i, Q [..., n, p]) -> (x_{i+1}, J_i Q)
TangentMap = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]
# (i, x_i, U [..., n, p]) -> J_i^T U
AdjointMap = Callable[[int, Tensor, Tensor], Tensor]


@dataclass
class FlowExponents:
    """The top-p finite-time exponents of each system, descending, float64 [..., p].

    ``residual`` [..., p]: how much each exponent changed in the last refinement; NaN when
    ``refine=0``. Convergence is geometric, so the remaining error is of the order of the
    residual, larger when consecutive singular values are close. ``q0``: the initial subspace of
    the final pass.
    """

    exponents: Tensor
    residual: Tensor
    q0: Tensor


def random_subspace(
    batch: tuple[int, ...], n: int, p: int, seed: int = 0, dtype=torch.float32, device=None
) -> Tensor:
    """Orthonormal columns [*batch, n, p] drawn from a seeded Gaussian (reproducible).

    Example:
        >>> q = random_subspace((2,), 5, 3)
        >>> torch.allclose(q[0].T @ q[0], torch.eye(3), atol=1e-6)
        True
    """
    if not 1 <= p <= n:
        raise ValueError(
            f"the number of exponents must be between 1 and the dimension {n}, got {p}"
        )
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(*batch, n, p, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(gaussian).Q.to(device=device, dtype=dtype)


@dataclass
class BenettinPass:
    """One forward QR pass over a flow.

    ``exponents`` [..., p]: sum(log |diag R|) / duration per column (Gram-Schmidt order);
    ``ritz`` [..., p]: log singular values of D Q_0 / duration, descending; ``q``: Q_N;
    ``states``: x_0..x_{N-1} (the inputs of the steps) when kept, else empty.
    """

    exponents: Tensor
    ritz: Tensor
    q: Tensor
    states: list[Tensor]


def benettin(
    tangent: TangentMap,
    x0: Tensor,
    q0: Tensor,
    num_steps: int,
    duration: float = 1.0,
    *,
    keep_states: bool = False,
    bar: tqdm | None = None,
) -> BenettinPass:
    """One forward QR pass from the orthonormal columns ``q0``.

    Example:
        >>> step = lambda i, x, q: (x, 2.0 * q)            # the linear map x -> 2 x
        >>> benettin(step, torch.zeros(3), torch.eye(3)[:, :1], 4).exponents
        tensor([2.7726], dtype=torch.float64)
    """
    x, q = x0, q0
    p = q.shape[-1]
    logs = torch.zeros(q.shape[:-2] + (p,), dtype=torch.float64, device=q.device)
    # R_N ... R_1, rescaled every step so that long flows neither overflow nor underflow.
    product = torch.eye(p, dtype=torch.float64, device=q.device).expand(q.shape[:-2] + (p, p))
    log_scale = torch.zeros(q.shape[:-2], dtype=torch.float64, device=q.device)
    states = []
    for i in range(num_steps):
        if keep_states:
            states.append(x)
        x, w = tangent(i, x, q)
        q, r = torch.linalg.qr(w)
        r = r.double()
        logs += r.diagonal(dim1=-2, dim2=-1).abs().log()
        product = r @ product
        scale = product.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(torch.float64).tiny)
        product = product / scale[..., None, None]
        log_scale += scale.log()
        if bar is not None:
            bar.update()
    ritz = torch.linalg.svdvals(product).log() + log_scale[..., None]
    return BenettinPass(logs / duration, ritz / duration, q, states)


def pullback(
    adjoint: AdjointMap, states: list[Tensor], u: Tensor, *, bar: tqdm | None = None
) -> Tensor:
    """An orthonormal basis of D^T U (D the flow's Jacobian), one adjoint step at a time."""
    for i in reversed(range(len(states))):
        u = torch.linalg.qr(adjoint(i, states[i], u)).Q
        if bar is not None:
            bar.update()
    return u


def finite_time_lyapunov(
    tangent: TangentMap,
    x0: Tensor,
    q0: Tensor,
    num_steps: int,
    duration: float = 1.0,
    *,
    adjoint: AdjointMap | None = None,
    refine: int = 0,
    progress: bool = False,
    desc: str = "lyapunov",
) -> FlowExponents:
    """The top-p finite-time Lyapunov exponents of a flow of ``num_steps`` steps over ``duration``.

    Args:
        tangent: pushes tangent columns through step i (see :func:`jvp_tangent`).
        x0: the initial state [..., n]; q0: initial orthonormal columns [..., n, p].
        adjoint: pulls columns back through step i (see :func:`vjp_adjoint`); needed if refine > 0.
        refine: subspace iterations aligning q0 with the top right singular vectors of the flow;
            0 gives the classical Benettin exponents (Gram-Schmidt diagonal, asymptotic), > 0
            the Rayleigh-Ritz estimates of the finite-time exponents.

    Example (dx/dt = A x with A = diag(1, -2), integrated exactly over t in [0, 1]):
        >>> step = torch.linalg.matrix_exp(torch.diag(torch.tensor([1.0, -2.0])) / 10)
        >>> tangent = lambda i, x, q: (x, step @ q)
        >>> adjoint = lambda i, x, u: step.T @ u
        >>> q0 = random_subspace((), 2, 2)
        >>> r = finite_time_lyapunov(tangent, torch.zeros(2), q0, 10, adjoint=adjoint, refine=5)
        >>> [round(v, 4) for v in r.exponents.tolist()]
        [1.0, -2.0]
    """
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an integer >= 0, got {refine!r}")
    if refine and adjoint is None:
        raise ValueError("refine > 0 needs an adjoint map (J^T U) for the backward passes")
    if not math.isfinite(duration) or duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    total = num_steps * (2 * refine + 1)
    previous = None
    q = q0
    with tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for iteration in range(refine + 1):
            last = iteration == refine
            run = benettin(tangent, x0, q, num_steps, duration, keep_states=not last, bar=bar)
            if last:
                break
            previous = run.ritz
            q = pullback(adjoint, run.states, run.q, bar=bar)
    if previous is None:
        exponents = run.exponents.sort(dim=-1, descending=True).values
        residual = torch.full_like(exponents, math.nan)
    else:
        exponents = run.ritz
        residual = (exponents - previous).abs()
    return FlowExponents(exponents=exponents, residual=residual, q0=q)


def jvp_tangent(step: Callable[[int, Tensor], Tensor]) -> TangentMap:
    """A tangent map from a state map ``step(i, x) -> x'`` by forward-mode AD (torch.func.jvp),
    the p tangent columns batched with vmap so the primal runs once.

    Example:
        >>> tangent = jvp_tangent(lambda i, x: x + 0.1 * torch.sin(x))
        >>> tangent(0, torch.zeros(2), torch.eye(2))[1]
        tensor([[1.1000, 0.0000],
                [0.0000, 1.1000]])
    """

    def tangent(i: int, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        f = functools.partial(step, i)
        push = torch.func.vmap(lambda v: torch.func.jvp(f, (x,), (v,)), out_dims=(None, 0))
        x_next, w = push(q.movedim(-1, 0).to(x.dtype))
        return x_next, w.movedim(0, -1).to(q.dtype)

    return tangent


def vjp_adjoint(step: Callable[[int, Tensor], Tensor]) -> AdjointMap:
    """An adjoint map from a state map ``step(i, x) -> x'`` by reverse-mode AD (torch.func.vjp),
    the p cotangent columns batched with vmap over one recorded step.

    Example:
        >>> adjoint = vjp_adjoint(lambda i, x: 3.0 * x)
        >>> adjoint(0, torch.zeros(2), torch.eye(2))
        tensor([[3., 0.],
                [0., 3.]])
    """

    def adjoint(i: int, x: Tensor, u: Tensor) -> Tensor:
        _, pull = torch.func.vjp(functools.partial(step, i), x)
        (g,) = torch.func.vmap(pull)(u.movedim(-1, 0).to(x.dtype))
        return g.movedim(0, -1).to(u.dtype)

    return adjoint
