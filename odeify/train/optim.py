"""Optimisation every recipe shares: AdamW with weight decay on matrices only, linear warmup +
cosine decay, and seeds."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators.

    Example:
        >>> seed_everything(0)
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def adamw(
    model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), no_decay=None
) -> torch.optim.AdamW:
    """AdamW that decays weight matrices only: not norms, biases, or parameters ``no_decay`` names.

    For an odeified model the basis tensor of a matrix is [K, out, in] and that of a norm or a
    bias is [K, d]: what counts is the shape of the parameter it represents.

    Example:
        >>> opt = adamw(nn.Linear(4, 4), lr=1e-3, weight_decay=0.1)
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.1, 0.0]
    """
    from ..surgery import find_block

    # The block's own basis tensors, not what peft hangs under them (LoRA factors are matrices).
    block = find_block(model)
    basis_ids = set() if block is None else {id(block.basis_tensor(n)) for n in block.names}
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        represented = p.dim() - 1 if id(p) in basis_ids else p.dim()
        skip = represented < 2 or (no_decay is not None and no_decay(name))
        (keep if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def warmup_cosine(
    optimizer, warmup: int, total: int, min_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base learning rate, then cosine decay to ``min_ratio`` of it at ``total``.

    Example:
        >>> schedule = warmup_cosine(adamw(nn.Linear(2, 2), 1e-3, 0.0), warmup=10, total=100)
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
