"""Perplexity of a model on token windows: the one-count case of :func:`odeify.train.evaluate.sweep`."""

from __future__ import annotations

import torch


@torch.no_grad()
def perplexity(
    model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "ppl"
) -> float:
    """exp(mean next-token NLL) over every window of a [n, T] token tensor, the model as it is
    (its own step count), in eval mode.

    Example:
        >>> from odeify.train.data import windows
        >>> tokens = torch.randint(0, 97, (256,)).numpy()
        >>> round(perplexity(model, windows(tokens, 32), progress=False))  # untrained: ~ vocab size
        97
    """
    from .train.evaluate import sweep

    return sweep(model, windows, [None], batch_size, progress=progress, desc=desc).perplexity()[
        None
    ]
