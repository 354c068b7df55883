"""Model surgery: a model's block stack, odeified or not, its layers as tensors, and stock models
built at any depth.

Everything here reads the family's declarations (:mod:`odeify.adapters`); nothing guesses from
parameter names. ``odeify``, ``materialize``, ``from_pretrained``, layer dropping, LoRA and the
analysis all take models apart and put them together through these functions.

Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2))
    >>> len(block_stack(model)), is_odeified(model)
    (4, False)
    >>> samples = layer_samples(model)
    >>> half = stock_model(model, 2, lambda i: {n: s[2 * i] for n, s in samples.items()})
    >>> half.config.num_hidden_layers
    2
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from .adapters import family_for
from .block import ODEBlock

LayerState = Callable[[int], Mapping[str, Tensor]]


# ----------------------------------------------------------------------------------- the stack
def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def block_stack(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of blocks at the family's declared ``stack`` attribute (for an
    odeified model: the one-element list holding its ODE block).

    Example:
        >>> len(block_stack(GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=8, n_head=2))))
        3
    """
    family = family_for(model)
    stack = getattr(_base(model), family.stack, None)
    if not isinstance(stack, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no block stack at .{family.stack}; odeify expects a "
            f"transformers {family.name} model (e.g. a *ForCausalLM or the base *Model)"
        )
    return stack


def replace_stack(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Put ``blocks`` where the model's block stack is (how ``odeify`` inserts its ODE block).

    Example:
        >>> block = odeify.get_block(model)
        >>> replace_stack(base, nn.ModuleList([block]))
        >>> find_block(base) is block, len(block_stack(base))
        (True, 1)
    """
    block_stack(model)
    setattr(_base(model), family_for(model).stack, blocks)


def stack_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the block stack's entries (layer l's are ``<prefix><l>.``).

    Example:
        >>> stack_prefix(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2)))
        'transformer.h.'
    """
    stack = block_stack(model)
    return next(name for name, module in model.named_modules() if module is stack) + "."


# ------------------------------------------------------------------------------ odeified or not
def find_block(model: nn.Module) -> ODEBlock | None:
    """The ODE block inside ``model`` (under any wrapper, peft's included), or None.

    Example:
        >>> find_block(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2))) is None
        True
    """
    return next((m for m in model.modules() if isinstance(m, ODEBlock)), None)


def is_odeified(model: nn.Module) -> bool:
    """Whether ``model`` holds an ODE block (an odeified model, possibly wrapped).

    Example:
        >>> is_odeified(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2)))
        False
    """
    return find_block(model) is not None


def is_odeified_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a saved odeified model: its config.json has an ``odeify`` section.

    Example:
        >>> is_odeified_folder("no/such/folder")
        False
    """
    config = Path(path) / "config.json"
    return config.exists() and "odeify" in json.loads(config.read_text())


# ------------------------------------------------------------------------------------ the layers
def layer_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """{block parameter: shape} of a stock model, linear weights as [out, in], after checking
    that every block has the same parameters and that each lies in a declared weight group.

    Example:
        >>> shapes = layer_shapes(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2)))
        >>> shapes["attn.c_attn.weight"]   # Conv1D's [8, 24], as [out, in]
        torch.Size([24, 8])
    """
    family, stack = family_for(model), block_stack(model)
    reference = dict(stack[0].named_parameters())
    for layer, block in enumerate(stack):
        params = dict(block.named_parameters())
        if params.keys() != reference.keys() or any(
            p.shape != reference[n].shape for n, p in params.items()
        ):
            raise ValueError(
                f"block {layer} has different parameters than block 0; odeify needs identical blocks"
            )
    for name in reference:
        family.group_of(name)  # every parameter must belong to a declared weight group
        module = stack[0].get_submodule(family.module_of(name))
        if family.is_transposed(name) and type(module).__name__ != "Conv1D":
            raise ValueError(
                f"{family.name} adapter declares {name} transposed but it is not a Conv1D weight"
            )
    return {
        name: p.shape[::-1] if family.is_transposed(name) else p.shape
        for name, p in reference.items()
    }


def layer_samples(
    model: nn.Module, layers: Sequence[int] | None = None, names: Iterable[str] | None = None
) -> dict[str, Tensor]:
    """Block parameters of a stock model stacked over ``layers`` (default all) as
    {name: [len(layers), *shape]}, linear weights as [out, in]; ``names`` picks parameters.

    Example:
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=8, n_head=2))
        >>> layer_samples(model, layers=[0, 2], names=["ln_1.weight"])["ln_1.weight"].shape
        torch.Size([2, 8])
    """
    if is_odeified(model):
        raise ValueError("layer_samples reads a stock model's layers; this model is odeified")
    family, stack = family_for(model), block_stack(model)
    layers = range(len(stack)) if layers is None else layers
    names = [n for n, _ in stack[0].named_parameters()] if names is None else names

    def sample(block: nn.Module, name: str) -> Tensor:
        p = block.get_parameter(name).detach()
        return p.t() if family.is_transposed(name) else p

    return {name: torch.stack([sample(stack[i], name) for i in layers]) for name in names}


# ----------------------------------------------------------------------------- stock models
def set_num_layers(config: PretrainedConfig, depth: int) -> None:
    """Make a transformers config describe ``depth`` layers: ``num_hidden_layers`` and, where
    the config has them, ``layer_types`` (one type for every layer, as odeify requires).

    Example:
        >>> config = GPT2Config(n_layer=4)
        >>> set_num_layers(config, 2); config.num_hidden_layers
        2
    """
    config.num_hidden_layers = depth
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * depth


def _stock_config(config: PretrainedConfig, depth: int) -> PretrainedConfig:
    from .models import set_config_class, stock_class

    config = copy.deepcopy(config)
    if hasattr(config, "odeify"):
        delattr(config, "odeify")
    set_config_class(config, stock_class(type(config)))  # an odeify config's own stock class
    if config.architectures:
        config.architectures = [a.removeprefix("Odeify") for a in config.architectures]
    set_num_layers(config, depth)
    return config


def _from_config(config: PretrainedConfig) -> nn.Module:
    import transformers

    # A config without architectures (written by config.save_pretrained alone) is a causal LM.
    cls = getattr(transformers, config.architectures[0], None) if config.architectures else None
    if cls is None:
        return transformers.AutoModelForCausalLM.from_config(config)
    return cls(config)


def _copy_outer(source: nn.Module, plain: nn.Module) -> None:
    """Every weight outside the block stack (embeddings, final norm, head) from source to plain."""
    prefix = stack_prefix(source)
    outer = {k: v for k, v in source.state_dict().items() if not k.startswith(prefix)}
    missing, unexpected = plain.load_state_dict(outer, strict=False)
    if unexpected or any(not k.startswith(prefix) for k in missing):
        raise RuntimeError(
            f"stock_model: state mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


@torch.no_grad()
def _fill_layers(
    plain: nn.Module, layer: LayerState, scales: Sequence | None, corrections: Sequence | None
) -> None:
    family = family_for(plain)
    for i, block in enumerate(block_stack(plain)):
        state, params = layer(i), dict(block.named_parameters())
        if state.keys() != params.keys():
            raise ValueError(
                f"stock_model: layer {i} was given {sorted(state)}, but a block of "
                f"{type(plain).__name__} has {sorted(params)}"
            )
        scale = 1.0 if scales is None else scales[i]
        # One scale for both output projections, or one each (attention's, then the MLP's).
        per_projection = scale if isinstance(scale, tuple) else (scale,) * 2
        for name, w in state.items():
            module = family.module_of(name)
            if module in family.output_projections:
                s = per_projection[family.output_projections.index(module)]
                w = w if s == 1.0 else w * s
                t = None if corrections is None else corrections[i]
                if t is not None and module == family.output_projections[1]:
                    w = _compose(w, t)
            params[name].copy_(w.t() if family.is_transposed(name) else w)


def _compose(w: Tensor, t: Tensor) -> Tensor:
    """The MLP output projection whose output y is replaced by y T (row vectors): a weight in
    odeify's layout [out, in] (y = x W^T + b) becomes T^T W, a bias b T. The product is taken
    in float64 so that the folded weight is rounded once, to the model's dtype: the stock layer
    then matches the ODE block's (x W^T) T to that dtype's rounding."""
    t = t.to(device=w.device, dtype=torch.float64)
    wide = w.double()
    out = t.T @ wide if w.dim() == 2 else wide @ t
    return out.to(w.dtype)


def stock_model(
    source: nn.Module | PretrainedConfig,
    depth: int,
    layer: LayerState | None = None,
    scales: Sequence[float | tuple[float, float]] | None = None,
    corrections: Sequence[Tensor | None] | None = None,
) -> nn.Module:
    """A stock transformers model with ``depth`` layers.

    ``source`` is a model (stock or odeified), whose class, config, dtype, device, train/eval
    mode and weights outside the block stack the new model takes; or a config, for a freshly
    initialised model of its architecture. ``layer(i)`` gives layer i's parameters in odeify's
    layout (linear weights [out, in]); the output projections are multiplied by ``scales[i]``
    (a float, or a pair: the attention's and the MLP's, as a schedule's gains are), and the
    MLP's composed with ``corrections[i]`` (a [d, d] matrix T_i: the layer's MLP output y
    becomes y T_i, as a corrected schedule's step computes it; None: none).
    Without ``layer`` the layers keep their fresh init.

    Example:
        >>> weights = odeify.get_block(model).weights_at([0.0, 0.5])
        >>> plain = stock_model(model, 2, lambda i: {n: w[i] for n, w in weights.items()},
        ...                     scales=[2.0, 2.0])
        >>> type(plain).__name__, plain.config.num_hidden_layers, is_odeified(plain)
        ('GPT2LMHeadModel', 2, False)
    """
    if isinstance(source, nn.Module):
        from .models import stock_class

        plain = stock_class(type(source))(_stock_config(source.config, depth))
        plain.to(device=next(source.parameters()).device, dtype=source.dtype)
        _copy_outer(source, plain)
        plain.train(source.training)
    else:
        plain = _from_config(_stock_config(source, depth))
    if layer is not None:
        _fill_layers(plain, layer, scales, corrections)
    return plain
