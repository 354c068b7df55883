"""Compiling an odeified model once for every step count: regional compilation of its solver step.

``torch.compile(model)`` traces the native loop unrolled, so each step count (and scheme) is a
graph of its own, and after dynamo's ``recompile_limit`` (8) distinct ones the model runs the
next ones eagerly. :func:`compile` compiles the unit the loop repeats instead, one solver step,
given its step's weights and gains as tensors: one graph serves every step and every step count,
and a new depth costs no compilation.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .api import get_block


def compile(model: nn.Module, **options: Any) -> nn.Module:  # noqa: A001 (torch.compile's name)
    """Compile the ODE block's solver step in place (``torch.compile`` ``options``: backend,
    mode, dynamic, ...) and return the model.

    Each step of every native run then calls the one compiled step: changing the step count
    (``odeify.steps``, ``ode_steps=``), the calibrated schedule or the uniform grid compiles
    nothing new. The step is compiled on the first call for each scheme, dtype and input shape
    (``dynamic=True`` makes the sequence length symbolic); the embeddings and the head stay
    eager, as in transformers' own regional compilation of decoder layers. Runs that stay
    eager: per-sample step counts (each sample's grid is indexed per step) and torchdiffeq
    schemes. Two cases trace once per KV-cache slot (bounded by the slots of the largest step
    count, not by how many step counts are served): generation with a KV cache, and GPT-2's
    ``scale_attn_by_inverse_layer_idx`` (its scaling is a float of the step's time).

    Example:
        >>> model = odeify.compile(model, backend="eager")   # no C compiler needed for "eager"
        >>> with odeify.steps(model, 2):
        ...     logits = model(ids).logits
        >>> logits.shape[-1] == model.config.vocab_size
        True
    """
    block = get_block(model)
    block.stepper.compile(**options)
    block.stepper.compiled = True
    return model
