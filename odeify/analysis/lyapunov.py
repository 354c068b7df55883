"""Per-token finite-time Lyapunov exponents of an odeified transformer's flow from t = 0 to 1.

What "per token" means here. The state is X = (x_1, ..., x_T), one d-vector per position; the
flow map Phi: X(0) -> X(1) is the composition of the model's N true step maps (identity plus the
step's update, at the chosen scheme and step count). Attention is causal, so every step's
Jacobian is block lower-triangular over positions (position j reads positions <= j only) and so
is the flow's Jacobian DPhi. Its diagonal blocks

    D_k = d x_k(1) / d x_k(0)   (d x d)

are therefore *exactly* the products of the steps' diagonal blocks: a path from x_k through
another position m would need m > k to read x_k and k to read m later, which causality forbids.
The exponents of token k are the finite-time Lyapunov exponents of D_k,
lambda_j(k) = log sigma_j(D_k) (per unit t, the whole depth being t in [0, 1]): how much a
perturbation of token k's own state grows, in its own state, through the full nonlinear flow,
attention over every earlier token included. Being block triangular, DPhi has exactly the
eigenvalues of the D_k together, so the per-token blocks carry the whole spectrum of the
linearised flow, one token at a time.

This differs from the variant of the Neural ODE Transformers paper (ICLR 2025), which
multiplies the blocks J_k = d f_j / d x_k of the last position j for each source token k. For
k = j that is D_j here; for k < j the product of single-step off-diagonal blocks is not the chain
rule of the flow (the flow's (j, k) block is a sum over paths through intermediate positions), so
we do not compute it.

How. A single Jacobian-vector product of the step map over the whole sequence mixes positions
((J V)_j = sum_k J_jk v_k). During the analysis the attention of the model is swapped for a
numerically identical one in which the tangents of keys and values reach only their own query
(the primal is unchanged; the routing uses ``detach`` on the off-diagonal paths), so one JVP
gives J_kk v_k at every position k at once: all tokens and the k tangent columns (vmap) in one
pass. The QR (Benettin) recursion then runs per token (odeify.analysis.benettin), with
``refine`` forward/backward subspace iterations so that the exponents are the logs of the top
singular values of D_k (Rayleigh-Ritz values of the refined subspace), not the growth of a random
subspace. No Jacobian is ever materialised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..api import get_block
from ..block import Call, ODEBlock
from .benettin import FlowExponents, finite_time_lyapunov, jvp_tangent, random_subspace, vjp_adjoint

DIAGONAL_ATTENTION = "odeify_diagonal_tangent"


def _diagonal_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Eager causal attention whose primal is the usual one but whose key/value tangents (and
    gradients) reach only the query at their own position."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    key_fixed, value_fixed = key.detach(), value.detach()
    length, keys = query.shape[-2], key.shape[-2]
    if length != keys:
        raise ValueError("diagonal tangent routing needs the whole sequence at once (no KV cache)")
    own = (query * (key - key_fixed)).sum(-1)  # zero, but carries q_k . dk_k
    scores = (query @ key_fixed.transpose(-1, -2) + torch.diag_embed(own)) * scaling
    scores = scores.float()
    if attention_mask is None:
        rows = torch.arange(length, device=query.device)
        allowed = rows[:, None] >= rows[None, :]
        if sliding_window is not None:
            allowed &= rows[:, None] - rows[None, :] < sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :keys], float("-inf"))
    else:
        scores = scores + attention_mask[..., :keys]
    probs = scores.softmax(dim=-1).to(query.dtype)
    self_weight = probs.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    out = probs @ value_fixed + self_weight * (value - value_fixed)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def diagonal_routing(config) -> Iterator[None]:
    """Inside the block, attention routes key/value tangents to their own query only.

    Example:
        >>> block = get_block(model)
        >>> args, kwargs = capture_call(model, ids)
        >>> x0, run = block.bind(*args, **kwargs)
        >>> with torch.no_grad(), diagonal_routing(model.config):
        ...     x1 = block.step(x0, run, 0)          # same values; JVPs give J_kk v_k
        >>> with torch.no_grad():
        ...     torch.allclose(x1, block.step(x0, run, 0), atol=1e-6)
        True
    """
    if DIAGONAL_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(DIAGONAL_ATTENTION, _diagonal_attention)
    before = config._attn_implementation
    config._attn_implementation = DIAGONAL_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def _first_call(model: nn.Module, ids: Tensor, **kwargs) -> Call:
    """The ODE block's first call in ``model(ids, use_cache=False, **kwargs)``, run in the
    block's capture mode (bound, not integrated: the parent forward finishes cheaply)."""
    block = get_block(model)
    with torch.no_grad(), block.capture() as calls:
        model(ids, use_cache=False, **kwargs)
    if not calls:
        raise RuntimeError(f"{type(model).__name__}'s forward never called its ODE block")
    return calls[0]


def capture_call(model: nn.Module, ids: Tensor) -> tuple[tuple, dict]:
    """The positional and keyword arguments the parent model passes to its ODE block for ``ids``
    (masks, positions, RoPE), recorded in the block's capture mode.

    Example:
        >>> args, kwargs = capture_call(model, ids)
        >>> x0, run = get_block(model).bind(*args, **kwargs)
        >>> x0.shape, run.steps
        (torch.Size([2, 16, 32]), 4)
    """
    call = _first_call(model, ids)
    return call.args, call.kwargs


@dataclass
class Lyapunov:
    """Per-token finite-time Lyapunov exponents of the flow from t = 0 to 1.

    ``exponents`` [T, k] (float64, descending per token, per unit t): the top-k exponents of
    token k's diagonal flow block (see the module docstring). ``residual`` [T, k]: how much each
    exponent changed in the last refinement (NaN without refinement). ``largest``:
    exponents[:, 0].
    """

    exponents: Tensor
    residual: Tensor
    token_ids: Tensor
    steps: int
    scheme: str
    refine: int

    @property
    def largest(self) -> Tensor:
        return self.exponents[:, 0]

    def to_dict(self, tokens: list[str] | None = None) -> dict:
        """Plain lists for JSON; ``tokens`` are the decoded token strings, if known."""

        def finite(values: list) -> list:
            return [
                finite(v)
                if isinstance(v, list)
                else (v if v == v and abs(v) != float("inf") else None)
                for v in values
            ]

        out = {
            "definition": "top-k finite-time Lyapunov exponents of d x_k(1) / d x_k(0), per token",
            "steps": self.steps,
            "scheme": self.scheme,
            "refine": self.refine,
            "token_ids": self.token_ids.tolist(),
            "largest": finite(self.largest.tolist()),
            "exponents": finite(self.exponents.tolist()),
            "residual": finite(self.residual.tolist()),
        }
        if tokens is not None:
            out["tokens"] = list(tokens)
        return out


def _check_ids(model: nn.Module, ids) -> Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"ids must be one sequence, [T] or [1, T]; got shape {list(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be integer token ids, got {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError("the input is empty: lyapunov needs at least one token (an empty text?)")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and ids.numel() > context:
        raise ValueError(
            f"the input has {ids.numel()} tokens but the model's context is {context}; "
            f"pass at most {context} tokens (shorten the text)"
        )
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}), got {ids.min()}..{ids.max()}")
    return ids


def _block_of(model: nn.Module) -> ODEBlock:
    try:
        return get_block(model)
    except ValueError:
        raise ValueError(
            f"{type(model).__name__} is not odeified, and the Lyapunov exponents are those of the "
            "ODE flow: call odeify(model) first (the CLI, `odeify analyze`, does it in memory)"
        ) from None


def _check_arguments(model: nn.Module, block: ODEBlock, ids, k: int, oversample: int) -> Tensor:
    """The token ids on the block's device, after checking the model and the sizes."""
    if model.training:
        raise ValueError(
            "the model is in training mode (dropout makes the flow random): call model.eval()"
        )
    device = block.basis_tensor(block.names[0]).device
    ids = _check_ids(model, ids).to(device)
    hidden = model.config.hidden_size
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= hidden:
        raise ValueError(f"k must be an integer between 1 and the hidden size {hidden}, got {k!r}")
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"oversample must be an integer >= 0, got {oversample!r}")
    return ids


def _native_run(model: nn.Module, ids: Tensor, steps: int | None, scheme: str | None):
    """x(0) of the sequence and the bound run of a native scheme at ``steps`` / ``scheme``."""
    grid = {k: v for k, v in (("ode_steps", steps), ("ode_scheme", scheme)) if v is not None}
    call = _first_call(model, ids[None], **grid)
    if call.run.solver.native is None:
        raise ValueError(
            f"scheme {call.run.solver.name!r} is integrated by torchdiffeq, which has no step map "
            "to differentiate; pass a native fixed-grid scheme: sequential, euler, midpoint, "
            "heun or rk4"
        )
    return call.x.detach().squeeze(0), call.run


def _flow_exponents(
    block: ODEBlock, x0: Tensor, run, columns: int, refine: int, seed: int, progress: bool
) -> FlowExponents:
    """The Benettin recursion over the run's step maps, tangents routed to their own token."""

    def step(i: int, x: Tensor) -> Tensor:
        return block.step(x.unsqueeze(0), run, i).squeeze(0)

    q0 = random_subspace(x0.shape[:1], x0.shape[-1], columns, seed=seed, device=x0.device)
    with diagonal_routing(block.config):
        return finite_time_lyapunov(
            jvp_tangent(step),
            x0,
            q0,
            run.steps,
            duration=1.0,
            adjoint=vjp_adjoint(step),
            refine=refine,
            progress=progress,
            desc=f"lyapunov ({x0.shape[0]} tokens, {run.steps} steps, {columns} tangents)",
        )


def lyapunov(
    model: nn.Module,
    ids,
    steps: int | None = None,
    scheme: str | None = None,
    k: int = 4,
    *,
    refine: int = 2,
    oversample: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> Lyapunov:
    """Per token, the top-k finite-time Lyapunov exponents of the flow from t = 0 to 1.

    The flow is the odeified model's true step map at ``steps`` steps of ``scheme`` (default:
    the model's); token k's exponents are those of d x_k(1) / d x_k(0), computed with JVPs and a
    QR (Benettin) recursion on all tokens at once (see the module docstring for the definition
    and why paths through other tokens do not enter it).

    Args:
        model: an odeified model in eval mode.
        ids: one sequence of token ids, [T] or [1, T].
        k: exponents per token (1 <= k <= hidden size).
        refine: forward/backward subspace iterations before the final pass; each costs about
            two passes. 0 gives the classical Benettin exponents of a random k-dim subspace (at
            this finite time its largest is only a lower bound on the largest FTLE, often far
            below it); ``residual`` says how much the last iteration still moved them.
        oversample: extra tangent columns carried when refining (the top k of the k +
            oversample Ritz values are reported: the k-th converges like
            (sigma_{k + oversample + 1} / sigma_k)^(2 refine) instead of stalling when sigma_k
            and sigma_{k + 1} are close). Cost grows with k + oversample.
        seed: seed of the random initial subspace.

    Example:
        >>> tokens = ids[0, :8]
        >>> lam = lyapunov(odeify(base, progress=False), tokens, k=2, refine=1, progress=False)
        >>> lam.exponents.shape, lam.steps, lam.scheme   # [tokens, k]
        (torch.Size([8, 2]), 4, 'sequential')
        >>> bool((lam.exponents[:, :-1] >= lam.exponents[:, 1:]).all())   # descending per token
        True
    """
    block = _block_of(model)
    ids = _check_arguments(model, block, ids, k, oversample)
    x0, run = _native_run(model, ids, steps, scheme)
    # Extra columns only help the Ritz values of a refined subspace; the Gram-Schmidt exponents
    # of the first k columns do not depend on later ones.
    columns = min(x0.shape[-1], k + oversample) if refine else k
    result = _flow_exponents(block, x0, run, columns, refine, seed, progress)
    return Lyapunov(
        exponents=result.exponents[:, :k].cpu(),
        residual=result.residual[:, :k].cpu(),
        token_ids=ids.cpu(),
        steps=run.steps,
        scheme=run.solver.name,
        refine=refine,
    )
