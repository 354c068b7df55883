"""The contract between the ODE block and a model family's adapter (``odeify.adapters``).

An adapter is data plus two functions: where the block stack is, which parameters vary with t
(all of them), how the original block is called, and how to run its two sub-updates
(attention, MLP) functionally on weights at one time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


@dataclass
class Stage:
    """One stage of a solver step: what a sub-update needs besides the hidden states and weights."""

    t: float | Tensor  # the time of this stage ([B] when every sample has its own grid)
    slot: int  # KV-cache slot of this (step, stage)
    cache: Any  # a transformers Cache or None
    mask: Tensor | None  # the mask the parent model built for its own layers
    position_embeddings: tuple[Tensor, Tensor] | None  # RoPE (cos, sin), Llama family
    extra: dict[str, Any]  # other keyword arguments the parent passes to its layers
    module: nn.Module  # the ODE block; attention interfaces read .training etc. from it
    num_layers: int  # L
    attentions: list | None = None  # output_attentions' collection, when it is active

    def record_attention(self, weights: Tensor | None) -> None:
        if self.attentions is not None and weights is not None:
            self.attentions.append(weights)


@dataclass(frozen=True)
class Family:
    """A model family described as data, plus its sub-updates written functionally.

    ``attention(x, w, step)`` and ``mlp(x, w, step)`` return the residual updates A(x) and M(x)
    of one block whose parameters are ``w`` (a :class:`odeify.weights.Weights`); the original
    block computes ``h = x + A(x); y = h + M(h)``.
    """

    name: str
    model_types: tuple[str, ...]
    stack: str  # attribute of the base model holding the ModuleList of blocks
    call_signature: tuple[str, ...]  # positional parameters of the original block's forward
    groups: dict[str, str]  # parameter-name prefix -> weight group (one learned time unit each)
    output_projections: tuple[str, ...]  # the last linear of A and of M: scaled by L / N
    attention: Callable[[Tensor, Any, Stage], Tensor]
    mlp: Callable[[Tensor, Any, Stage], Tensor]
    check_config: Callable[[Any], None]
    attention_attrs: Callable[[Any], dict[str, Any]]  # attributes attention interfaces read
    transposed: tuple[str, ...] = ()  # modules holding weight as [in, out] (GPT-2's Conv1D)

    def group_of(self, name: str) -> str:
        for prefix, group in self.groups.items():
            if name == prefix or name.startswith(prefix + "."):
                return group
        raise KeyError(f"{self.name} adapter: parameter {name!r} belongs to no weight group")

    def is_transposed(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self.transposed
