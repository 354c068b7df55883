"""The contract between the ODE block and a model family's adapter (``odeify.adapters``).

A family is data plus two functions. The data says where the block stack is, how the original
block is called, which modules of a block hold its parameters (each a norm or a linear, each in
a weight group), which linears are output projections or stored transposed, and where the
attention projections are; the functions run the block's two sub-updates (attention, MLP) on
weights at one time. Everything odeify does to a model of the family reads these declarations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

# Odeified models have model type "odeify-<stock type>" (see odeify.models); adapters match the
# stock type.
ODEIFY_TYPE_PREFIX = "odeify-"


def stock_model_type(config) -> str | None:
    """The stock transformers model type of a config, odeified or not.

    Example:
        >>> from transformers import LlamaConfig
        >>> stock_model_type(LlamaConfig()), stock_model_type({"model_type": "odeify-qwen3"})
        ('llama', 'qwen3')
    """
    model_type = config.get("model_type") if isinstance(config, dict) else None
    model_type = model_type or getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type.startswith(ODEIFY_TYPE_PREFIX):
        return model_type[len(ODEIFY_TYPE_PREFIX) :]
    return model_type


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
class Projection:
    """Rows ``part`` of ``parts`` equal row blocks of the ``[out, in]`` weight ``name``."""

    name: str
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class AttentionLayout:
    """The four attention projections of one block, as parameter names in odeify's layout.

    q, k, v map the residual stream to heads (rows: head-major, ``head_dim`` rows per head);
    o maps the concatenated heads back (columns: head-major). A fused projection (GPT-2's
    ``c_attn``) is one weight split into row blocks.
    """

    q: Projection
    k: Projection
    v: Projection
    o: Projection

    def projections(self) -> tuple[Projection, Projection, Projection, Projection]:
        return self.q, self.k, self.v, self.o


@dataclass(frozen=True, kw_only=True)
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
    groups: dict[str, str]  # module of a block -> weight group (one learned time unit each)
    norms: tuple[str, ...]  # the modules in ``groups`` that are norms (a scale, maybe a shift)
    linears: tuple[str, ...]  # the modules in ``groups`` that are linears (a matrix, maybe a bias)
    output_projections: tuple[str, ...]  # the last linear of A and of M: scaled by L / N
    attention_layout: AttentionLayout  # where W_Q, W_K, W_V, W_O are
    attention: Callable[[Tensor, Any, Stage], Tensor]
    mlp: Callable[[Tensor, Any, Stage], Tensor]
    check_config: Callable[[Any], None]
    attention_attrs: Callable[[Any], dict[str, Any]]  # attributes attention interfaces read
    transposed: tuple[str, ...] = ()  # linears holding weight as [in, out] (GPT-2's Conv1D)

    def __post_init__(self) -> None:
        def check(field: str, names, allowed, what: str) -> None:
            outside = sorted(set(names) - set(allowed))
            if outside:
                raise ValueError(f"{self.name} adapter: {field} names {outside}, not {what}")

        both = sorted(set(self.norms) & set(self.linears))
        if both:
            raise ValueError(f"{self.name} adapter: {both} are declared both norms and linears")
        check("groups", self.groups, (*self.norms, *self.linears), "declared norms or linears")
        check("norms", self.norms, self.groups, "modules in groups")
        check("linears", self.linears, self.groups, "modules in groups")
        check("output_projections", self.output_projections, self.linears, "declared linears")
        check("transposed", self.transposed, self.linears, "declared linears")
        layout = [p.name for p in self.attention_layout.projections()]
        check("attention_layout", layout, [f"{m}.weight" for m in self.linears], "linear weights")

    def module_of(self, name: str) -> str:
        """The declared module (a key of ``groups``) that holds parameter ``name``."""
        for prefix in self.groups:
            if name == prefix or name.startswith(prefix + "."):
                return prefix
        raise KeyError(f"{self.name} adapter: parameter {name!r} belongs to no weight group")

    def group_of(self, name: str) -> str:
        return self.groups[self.module_of(name)]

    def is_transposed(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self.transposed
