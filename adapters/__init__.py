"""Model-family adapters, found by module. Installed as ``odeify.adapters``.

A new family is one adapter file: a module in this folder (gpt2.py is the shortest) whose
``FAMILY`` is an :class:`odeify.family.Family`. It is registered by being here; nothing else in
odeify names a family. The adapter declares, as keyword arguments of ``Family``:

- ``name`` and ``model_types`` (the transformers ``config.model_type`` values it converts);
- ``stack``: the attribute of the base model holding the ``nn.ModuleList`` of blocks;
- ``call_signature``: the positional parameters of the original block's ``forward``;
- ``groups``: every module of a block that holds parameters -> its weight group;
- ``norms`` and ``linears``: which of those modules are norms and which are linears (every
  module in ``groups`` is exactly one of them);
- ``output_projections``: the last linear of the attention and of the MLP (scaled by L / N);
- ``transposed``: the linears storing their weight as [in, out] (GPT-2's Conv1D), if any;
- ``attention_layout``: which linear weights (and row blocks of a fused one) are W_Q, W_K,
  W_V and W_O;
- ``attention`` and ``mlp``: the two sub-updates, written on weights at one time;
- ``check_config``: refuses configs the functional sub-updates do not reproduce;
- ``attention_attrs``: the attributes transformers' attention interfaces read off the block.

A declaration left out is a TypeError naming it; inconsistent ones (a module in ``groups`` that
is neither a norm nor a linear, a layout weight that is no declared linear, ...) a ValueError.
"""

from __future__ import annotations

import importlib
import pkgutil

from odeify.family import Family, stock_model_type


def _discover() -> dict[str, Family]:
    families = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if not isinstance(family, Family):
            raise TypeError(
                f"adapter module {__name__}.{info.name} defines no FAMILY = Family(...); every "
                "module in odeify/adapters is an adapter"
            )
        families[family.name] = family
    return families


FAMILIES: dict[str, Family] = _discover()


def supported() -> str:
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES.values())


def family_for(model) -> Family:
    """The adapter of a transformers model, or a ValueError that says what is supported.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> family_for(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2))).name
        'gpt2'
    """
    config = getattr(model, "config", None)
    model_type = stock_model_type(config) if config is not None else None
    how_to_add = "To add a family, write an adapter in odeify/adapters (see adapters/gpt2.py)."
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model; odeify converts decoder-only "
            f"stacks. Supported families: {supported()}. {how_to_add}"
        )
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"odeify has no adapter for {type(model).__name__} (model_type={model_type!r}). "
        f"Supported families: {supported()}. {how_to_add}"
    )
