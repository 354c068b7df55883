"""The per-head attention weights of a model at a set of times.

Which parameter (in odeify's ``[out, in]`` layout) holds W_Q, W_K, W_V and W_O, and for fused
projections like GPT-2's ``c_attn`` which row block, is the family's declared
``attention_layout`` (:class:`odeify.family.AttentionLayout`, in the adapter). Everything else
(head counts, GQA groups) comes from the Hugging Face config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..adapters import family_for
from ..family import Projection
from ..surgery import block_stack, find_block, layer_samples
from ..weight_function import WeightFunction


@dataclass(frozen=True)
class HeadShape:
    """Head counts of a model: H query heads, KV key/value heads (GQA when KV < H), head_dim."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> HeadShape:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if heads % kv:
            raise ValueError(f"{heads} query heads are not a multiple of {kv} key/value heads")
        return cls(heads, kv, head_dim)


@dataclass
class HeadWeights:
    """W_Q, W_K, W_V, W_O of a model at ``times``, in nn.Linear's ``[out, in]`` layout.

    q: [n, H * hd, d], k and v: [n, KV * hd, d], o: [n, d, H * hd].
    """

    times: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    shape: HeadShape
    source: str


def uniform_times(count: int) -> list[float]:
    """``count`` equispaced times on [0, 1): i / count (the left ends of ``count`` steps)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"times must be an integer >= 1 or a list of times, got {count!r}")
    return [i / count for i in range(count)]


def check_times(times: int | Sequence[float]) -> list[float]:
    """A time grid as floats in [0, 1]: an int n means the uniform grid i / n on [0, 1).

    Example:
        >>> check_times(4)
        [0.0, 0.25, 0.5, 0.75]
    """
    if isinstance(times, int):
        return uniform_times(times)
    values = [float(t) for t in torch.as_tensor(times, dtype=torch.float64).reshape(-1)]
    if not values:
        raise ValueError("times is empty; pass an integer (a uniform grid) or a list of times")
    if any(not 0.0 <= t <= 1.0 for t in values):
        raise ValueError(f"times must lie in [0, 1] (the ODE's depth interval), got {values}")
    return values


def _rows(weight: Tensor, projection: Projection) -> Tensor:
    return weight.chunk(projection.parts, dim=-2)[projection.part]


def _odeified(weight_fn: WeightFunction, names: set[str], times: list[float]) -> dict[str, Tensor]:
    # Only the attention projections: the MLP at 64 times would cost gigabytes for nothing.
    with torch.no_grad():
        return weight_fn.weights_at(times, names=sorted(names))


def _discrete(model: nn.Module, names: set[str], times: list[float]) -> dict[str, Tensor]:
    depth = len(block_stack(model))
    layers = []
    for t in times:
        layer = round(t * depth)
        if abs(layer - t * depth) > 1e-6 or layer >= depth:
            raise ValueError(
                f"a discrete model has weights only at its layer times l / {depth} "
                f"(l = 0..{depth - 1}); t = {t} is not one. Pass times=None (its layers), an "
                f"integer dividing {depth}, or odeify the model to evaluate between layers"
            )
        layers.append(layer)
    return layer_samples(model, layers, names)


def resolve_times(model: nn.Module, times: int | Sequence[float] | None) -> list[float]:
    """The time grid of an analysis: None means 64 uniform times for an odeified model and
    every layer time l / L for a discrete one.

    Example:
        >>> resolve_times(base, None)   # base: a stock 4-layer GPT-2
        [0.0, 0.25, 0.5, 0.75]
        >>> len(resolve_times(model, None)), resolve_times(model, 2)   # model: odeified
        (64, [0.0, 0.5])
    """
    if times is not None:
        return check_times(times)
    return uniform_times(64 if find_block(model) is not None else len(block_stack(model)))


def describe(model: nn.Module) -> str:
    """Where the weights come from, in words (for plots and reports)."""
    block = find_block(model)
    if block is None:
        return f"discrete ({len(block_stack(model))} layers)"
    ode = block.ode
    return f"odeified ({ode.basis} basis, K = {ode.num_basis}, L = {ode.num_layers})"


def head_weights(model: nn.Module, times: int | Sequence[float] | None = None) -> HeadWeights:
    """W_Q, W_K, W_V, W_O at ``times`` for an odeified model (W(t) from its basis) or an original
    discrete one (layer l at t = l / L); ``times`` as in :func:`resolve_times`.

    Example:
        >>> w = head_weights(model, times=[0.0, 0.5])
        >>> w.q.shape, w.shape
        (torch.Size([2, 32, 32]), HeadShape(num_heads=2, num_kv_heads=2, head_dim=16))
        >>> config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
        ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
        >>> w = head_weights(LlamaForCausalLM(config))   # GQA: 2 key/value heads for 4 queries
        >>> w.q.shape, w.k.shape, w.o.shape
        (torch.Size([2, 32, 32]), torch.Size([2, 16, 32]), torch.Size([2, 32, 32]))
    """
    layout = family_for(model).attention_layout
    shape = HeadShape.of(model.config)
    grid = resolve_times(model, times)
    names = {p.name for p in layout.projections()}
    block = find_block(model)
    weights = _discrete(model, names, grid) if block is None else _odeified(block, names, grid)
    q, k, v, o = (_rows(weights[p.name], p) for p in layout.projections())
    return HeadWeights(torch.tensor(grid, dtype=torch.float64), q, k, v, o, shape, describe(model))
