"""The solver step counts of each training step, one sampler every recipe configures.

Counts are a pure function of (seed, step), so every rank of a distributed run and a resumed
run draw what an unbroken run draws:

- depth adaptation: N = L every ``full_every`` steps (the anchor) plus ``draws`` counts from
  [low, high] or ``choices``, weighted 1 / N;
- step-adjusted fine-tuning: one of ``choices`` per step, uniformly (or N = L: ``draws=0``);
- pretraining with step augmentation: one count from [low, high] per step, uniformly.

Example:
    >>> StepSampler(num_layers=4, low=2, high=8, full_every=0, weighting="uniform").draw(3)
    [8]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WEIGHTINGS = ("inverse", "uniform")


@dataclass(frozen=True)
class StepSampler:
    """The solver step counts of each training step, a pure function of (seed, step).

    Every ``full_every``-th step includes N = L (the anchor that keeps the model at full depth
    close to the original; 0 never does), and every step draws ``draws`` counts from
    [low, high], or from ``choices`` when it is given (the step counts that matter to a user, so
    each gets many updates instead of a few from a wide range). ``weighting='inverse'`` draws N
    with probability proportional to 1 / N: a step at N costs about N, so each N gets about the
    same compute, and the short grids, far from L and the hardest to reach, get the most
    updates. ``'uniform'`` draws every N alike. ``every=True`` takes every one of ``choices`` at
    every step instead of drawing (each count a deployment serves trained on every batch, each
    under its own schedule in depth adaptation v2); ``draws`` is then unused.

    Example:
        >>> sampler = StepSampler(num_layers=30, low=10, high=60, seed=0)
        >>> sampler.draw(0)[0], 10 <= sampler.draw(0)[1] <= 60
        (30, True)
        >>> sampler.draw(7) == sampler.draw(7)
        True
        >>> StepSampler(num_layers=30, low=15, high=60, choices=(15, 60)).support()[0]
        array([15, 60])
    """

    num_layers: int
    low: int
    high: int
    draws: int = 1
    weighting: str = "inverse"
    full_every: int = 1
    seed: int = 0
    choices: tuple[int, ...] = ()
    every: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.low > self.high:
            raise ValueError(f"the step range is empty: low = {self.low} > high = {self.high}")
        if self.draws < 0 or self.full_every < 0:
            raise ValueError(
                f"draws and full_every must be >= 0, got {self.draws} and {self.full_every}"
            )
        if self.every and not self.choices:
            raise ValueError("every=True takes every one of choices at each step; give choices")
        if self.draws == 0 and self.full_every == 0 and not self.every:
            raise ValueError("draws = 0 and full_every = 0 train at no step count at all")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        bad = [n for n in self.choices if isinstance(n, bool) or not isinstance(n, int) or n < 1]
        if bad:
            raise ValueError(f"choices must be step counts >= 1, got {list(self.choices)!r}")
        object.__setattr__(self, "choices", tuple(sorted(set(self.choices))))

    def support(self) -> tuple[np.ndarray, np.ndarray]:
        """The step counts that can be drawn and their probabilities.

        Example:
            >>> StepSampler(num_layers=4, low=2, high=4).support()[1].round(3)
            array([0.462, 0.308, 0.231])
        """
        values = np.array(self.choices) if self.choices else np.arange(self.low, self.high + 1)
        weights = 1.0 / values if self.weighting == "inverse" else np.ones(len(values))
        return values, weights / weights.sum()

    def draw(self, step: int) -> list[int]:
        """The step counts of training step ``step``: [L] first when it is an anchor step."""
        counts = [self.num_layers] if self.full_every and step % self.full_every == 0 else []
        if self.every:
            return counts + list(self.choices)
        if self.draws:
            values, probs = self.support()
            rng = np.random.default_rng([self.seed, 6, step])
            counts += [int(n) for n in rng.choice(values, size=self.draws, p=probs)]
        return counts
