"""Matrix-multiply FLOPs of training and inference steps, and the steps a FLOP budget buys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..api import get_block


@dataclass(frozen=True)
class CostModel:
    """Matrix-multiply FLOPs (2 per multiply-add, attention scores and norms left out): a
    forward token costs 2 (N P_layer + P_head), a training token ``train_factor`` times that,
    and the teacher's forward 2 (L P_layer + P_head). The factor is 3 when the weights get
    gradients (forward, backward to the activations, backward to the weights) and 2 when they
    are frozen and only low-rank adapters train (LoRA's own matmuls are a rounding error) or
    only a schedule's gains, times and correction (the hypersolver): the activations'
    gradients still run back through every step, the weights' are never formed. A linear
    correction's own d x d product per step is not counted, as in inference.

    Example:
        >>> cost = CostModel(layer_params=10, head_params=5, num_layers=4)
        >>> cost.forward(tokens=1, steps=2), cost.train_step(tokens=1, counts=[4, 2])
        (50.0, 510.0)
    """

    layer_params: int
    head_params: int
    num_layers: int
    train_factor: float = 3.0

    @classmethod
    def of(cls, model: nn.Module, train_factor: float = 3.0) -> CostModel:
        """From an odeified model: per-layer block parameters and the output embedding."""
        block = get_block(model)
        per_layer = sum(block.basis_tensor(n).numel() for n in block.names) // block.ode.num_basis
        head = model.get_output_embeddings()
        head_params = head.weight.numel() if head is not None else 0
        return cls(per_layer, head_params, block.ode.num_layers, train_factor)

    def forward(self, tokens: int, steps: int) -> float:
        return 2.0 * tokens * (steps * self.layer_params + self.head_params)

    def train_step(self, tokens: int, counts: Sequence[int]) -> float:
        teacher = self.forward(tokens, self.num_layers)
        return teacher + sum(self.train_factor * self.forward(tokens, n) for n in counts)


def steps_for_budget(
    budget: float, tokens: int, cost: CostModel, draw, limit: int = 10**7
) -> tuple[int, float]:
    """The number of training steps whose summed cost stays within ``budget`` FLOPs (at least
    one), and that cost; ``draw(step)`` gives each step's counts (a sampler's ``draw``).

    Example:
        >>> cost = CostModel(layer_params=10, head_params=0, num_layers=2)
        >>> steps_for_budget(500.0, tokens=1, cost=cost, draw=lambda s: [2])
        (3, 480.0)
    """
    if not budget > 0:
        raise ValueError(f"the FLOP budget must be > 0, got {budget}")
    total, step = cost.train_step(tokens, draw(0)), 1
    while step < limit:
        more = cost.train_step(tokens, draw(step))
        if total + more > budget:
            break
        total += more
        step += 1
    return step, total
