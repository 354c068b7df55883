"""Model-family adapters, registered by name. Installed as ``odeify.adapters``.

To add a family, write a module here that builds an :class:`odeify.family.Family` (see gpt2.py,
the shortest) and add it to ``FAMILIES``.
"""

from __future__ import annotations

from odeify.family import Family

from .gpt2 import GPT2
from .llama import LLAMA

FAMILIES: dict[str, Family] = {family.name: family for family in (GPT2, LLAMA)}


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
    model_type = getattr(config, "model_type", None)
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
