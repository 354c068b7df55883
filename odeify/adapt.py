"""Depth adaptation: continuous-depth distillation of an odeified model from its frozen original.

A converted pretrained model equals the original at N = L steps, but pretrained layers are not a
smooth function of depth, so other step counts fail (DESIGN.md section 4). Depth adaptation
trains the weight functions W(t) so that the model at step counts N drawn from a range matches
the original model (the teacher, run at N = L):

    loss(N) = kl * KL(p_teacher || p_N) + lm * CE(p_N, next token) + hidden * D(x_N, x_teacher)

where D is the mean squared difference of RMS-normalised hidden states wherever the two grids
meet (student step j of N ends at t = j / N = l / L, where teacher layer l ends). RMS-normalised
states are what the next layer's input norm (and the final norm) passes on, so D measures what
the rest of the network sees, on the same scale at every depth.

The central constraint: step i of N runs at t_i = i / N, so a grid with N dividing L lands on the
layer times. Any W(t) that is exact at N = L (W(l / L) = W_l) is therefore, at N = L / 2, exactly
the layer-dropped model (layers 0, 2, 4, ... with the output projections doubled). Whatever makes
N = L / 2 better moves N = L. :class:`StepSampler` keeps N = L in the loss mix (every step by
default) as the anchor that holds the adapted model close to the original at full depth.

Example:
    >>> teacher = frozen_teacher(model)                          # doctest: +SKIP
    >>> student = odeify(model)                                  # doctest: +SKIP
    >>> sampler = StepSampler(num_layers=30, low=10, high=60)    # doctest: +SKIP
    >>> targets = teacher_targets(teacher, ids, states=True)     # doctest: +SKIP
    >>> parts = adapt_step(student, targets, ids, labels, sampler.draw(step))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .api import get_block, odeify
from .schemes import layer_bounds, spans
from .surgery import block_stack, is_odeified, layer_samples, stock_model

__all__ = [
    "CostModel",
    "LossWeights",
    "StepSampler",
    "Targets",
    "adapt_step",
    "distill_loss",
    "drop_layers",
    "evaluate_depths",
    "frozen_teacher",
    "matching",
    "recording",
    "steps_for_budget",
    "teacher_targets",
]

WEIGHTINGS = ("inverse", "uniform")


# ----------------------------------------------------------------------------------- step counts
@dataclass(frozen=True)
class StepSampler:
    """The solver step counts of each training step, a pure function of (seed, step).

    Every ``full_every``-th step includes N = L (the anchor that keeps the model at full depth
    close to the original; 0 never does), and every step draws ``draws`` counts from
    [low, high], or from ``choices`` when it is given (the step counts that matter to a user, so
    each gets many updates instead of a few from a wide range). ``weighting='inverse'`` draws N
    with probability proportional to 1 / N: a step at N costs about N, so each N gets about the
    same compute, and the short grids, far from L and the hardest to reach, get the most
    updates. ``'uniform'`` draws every N alike.

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
        if self.draws == 0 and self.full_every == 0:
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
        if self.draws:
            values, probs = self.support()
            rng = np.random.default_rng([self.seed, 6, step])
            counts += [int(n) for n in rng.choice(values, size=self.draws, p=probs)]
        return counts


def matching(steps: int, num_layers: int, ends: int = 0) -> list[tuple[int, int]]:
    """Where a grid of ``steps`` meets the teacher's layers: pairs (j, l) where student step j
    ends at t = l / L, j >= 1 (the state after student step j is compared with the state after
    teacher layer l). ``ends`` is the student's ``discrete_ends``.

    Example:
        >>> matching(20, 30)[:3]
        [(2, 3), (4, 6), (6, 9)]
        >>> matching(6, 30, ends=2)
        [(1, 1), (2, 2), (3, 15), (4, 28), (5, 29), (6, 30)]
    """
    bounds = layer_bounds(steps, num_layers, ends)
    return [(j, int(b)) for j, b in enumerate(bounds) if j >= 1 and b == int(b)]


# ---------------------------------------------------------------------------------- recording
@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[list[Tensor]]:
    """Record the hidden state after every solver step of the model's forward calls.

    The ODE block's forward is ``bind`` followed by ``step`` for each step (see
    :meth:`ODEBlock.bind`); this is the block's own :meth:`ODEBlock.recording` for the duration
    of the ``with`` block, so the states stay in the autograd graph (hidden-state matching
    backpropagates through them). Native fixed-grid schemes only.

    Example:
        >>> with recording(model) as states:          # doctest: +SKIP
        ...     logits = model(ids).logits
        >>> len(states)                               # doctest: +SKIP
        30
    """
    with get_block(model).recording() as states:
        yield states


# ------------------------------------------------------------------------------------- losses
@dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms of the distillation loss, and the KL temperature.

    Example:
        >>> LossWeights(kl=1.0, lm=0.1, hidden=1.0).needs_states
        True
    """

    kl: float = 1.0
    lm: float = 0.0
    hidden: float = 0.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if min(self.kl, self.lm, self.hidden) < 0 or self.kl + self.lm + self.hidden == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not all zero, got kl={self.kl}, lm={self.lm}, "
                f"hidden={self.hidden}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def needs_states(self) -> bool:
        return self.hidden > 0


@dataclass
class Targets:
    """What the teacher says about one batch: log-probabilities at the KL temperature [B, T, V]
    and, for hidden-state matching, the state after each of its L layers."""

    log_probs: Tensor
    states: list[Tensor] | None
    num_layers: int


def frozen_teacher(model: nn.Module) -> nn.Module:
    """The original model as a frozen, odeified (exact, hat basis) copy: at N = L it computes
    what the original computes, and :func:`recording` gives its state after every layer.

    Example:
        >>> teacher = frozen_teacher(stock_model)   # doctest: +SKIP
    """
    teacher = copy.deepcopy(model)
    if not is_odeified(teacher):
        odeify(teacher, progress=False)
    block = get_block(teacher)
    if block.ode.basis != "hat" or block.ode.num_basis != block.ode.num_layers:
        raise ValueError(
            "the teacher must be exact at N = L: give the original (stock) model, or one "
            f"odeified with the hat basis and K = L (got basis={block.ode.basis!r}, "
            f"K={block.ode.num_basis}, L={block.ode.num_layers})"
        )
    return teacher.eval().requires_grad_(False)


def _normalised(x: Tensor) -> Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _autocast(dtype: torch.dtype | None, device: torch.device):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module,
    ids: Tensor,
    weights: LossWeights = LossWeights(),
    autocast: torch.dtype | None = None,
) -> Targets:
    """Run the teacher at N = L on ``ids`` once; every student step count is compared with it.

    Example:
        >>> targets = teacher_targets(teacher, ids, LossWeights(hidden=1.0))   # doctest: +SKIP
        >>> len(targets.states)                                               # doctest: +SKIP
        30
    """
    block = get_block(teacher)
    num_layers = block.ode.num_layers
    with _autocast(autocast, ids.device), contextlib.ExitStack() as stack:
        states = stack.enter_context(recording(teacher)) if weights.needs_states else None
        logits = teacher(ids, use_cache=False, ode_steps=num_layers).logits
    log_probs = (logits.float() / weights.temperature).log_softmax(-1)
    return Targets(log_probs, [s.float() for s in states] if states else None, num_layers)


def distill_loss(
    student: nn.Module,
    ids: Tensor,
    labels: Tensor,
    targets: Targets,
    steps: int,
    weights: LossWeights = LossWeights(),
    autocast: torch.dtype | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The student's loss at ``steps`` solver steps against the teacher's targets for ``ids``.

    Returns the weighted loss (to backpropagate) and its parts as floats: ``kl`` (nats per
    token), ``lm`` (next-token cross-entropy), ``hidden`` (mean over matched states) and ``loss``.

    Example:
        >>> loss, parts = distill_loss(student, ids, labels, targets, steps=15)   # doctest: +SKIP
        >>> loss.backward()                                                      # doctest: +SKIP
    """
    with _autocast(autocast, ids.device), contextlib.ExitStack() as stack:
        states = stack.enter_context(recording(student)) if weights.needs_states else None
        logits = student(ids, use_cache=False, ode_steps=steps).logits
    logits = logits.float()
    tokens = labels.numel()
    parts: dict[str, Tensor] = {}
    if weights.kl > 0:
        log_q = (logits / weights.temperature).log_softmax(-1)
        kl = F.kl_div(log_q, targets.log_probs, log_target=True, reduction="sum") / tokens
        parts["kl"] = kl * weights.temperature**2
    if weights.lm > 0:
        parts["lm"] = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    if weights.needs_states:
        if targets.states is None:
            raise ValueError(
                "hidden-state matching needs teacher_targets(..., weights) with hidden > 0"
            )
        pairs = matching(steps, targets.num_layers, get_block(student).ode.discrete_ends)
        parts["hidden"] = sum(
            (_normalised(states[j - 1]) - _normalised(targets.states[layer - 1])).pow(2).mean()
            for j, layer in pairs
        ) / len(pairs)
    scale = {"kl": weights.kl, "lm": weights.lm, "hidden": weights.hidden}
    loss = sum(scale[name] * value for name, value in parts.items())
    report = {name: float(value.detach()) for name, value in parts.items()}
    report["loss"] = float(loss.detach())
    return loss, report


def adapt_step(
    student: nn.Module,
    targets: Targets,
    ids: Tensor,
    labels: Tensor,
    counts: Sequence[int],
    weights: LossWeights = LossWeights(),
    full_weight: float = 1.0,
    autocast: torch.dtype | None = None,
) -> list[dict[str, float]]:
    """Accumulate the gradients of one training step: the loss at each step count in ``counts``
    on the same batch (one backward each, so only one grid's activations live at a time).

    The anchor N = L (the teacher's depth) is weighted by ``full_weight``; the other counts share
    a weight of 1. Returns each count's loss parts (with ``steps``). The caller steps the optimizer.

    Example:
        >>> parts = adapt_step(student, targets, ids, labels, [30, 14])   # doctest: +SKIP
        >>> optimizer.step(); optimizer.zero_grad()                      # doctest: +SKIP
    """
    if not counts:
        raise ValueError("adapt_step needs at least one step count")
    drawn = [n for n in counts if n != targets.num_layers]
    anchors = len(counts) - len(drawn)
    reports = []
    for n in counts:
        share = full_weight / anchors if n == targets.num_layers else 1.0 / len(drawn)
        loss, parts = distill_loss(student, ids, labels, targets, n, weights, autocast)
        (loss * share).backward()
        reports.append({"steps": n, **parts})
    return reports


# ---------------------------------------------------------------------------------- baselines
@torch.no_grad()
def drop_layers(model: nn.Module, keep: int) -> nn.Module:
    """Baseline (a): a stock model of ``keep`` of the original's L layers, layer i being original
    layer floor(i L / keep) (the layer at or before the ODE grid time i / keep) with the output
    projections scaled by L / keep, as :func:`odeify.materialize` scales them. For ``keep``
    dividing L this is exactly ``materialize(odeify(model), keep)`` (every other layer at L / 2).

    Example:
        >>> plain = drop_layers(stock_model, 15)   # doctest: +SKIP
        >>> plain.config.num_hidden_layers          # doctest: +SKIP
        15
    """
    if is_odeified(model):
        raise ValueError("drop_layers takes the original (stock) model, not an odeified one")
    num_layers = len(block_stack(model))
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= num_layers:
        raise ValueError(f"keep must be an integer in [1, {num_layers}], got {keep!r}")
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False) and keep != num_layers:
        raise ValueError(
            "scale_attn_by_inverse_layer_idx ties each layer to its index; dropping layers changes it"
        )
    samples = layer_samples(model, layers=[i * num_layers // keep for i in range(keep)])
    layer = lambda i: {name: s[i] for name, s in samples.items()}
    return stock_model(model, keep, layer, spans(keep, num_layers))


# ---------------------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class CostModel:
    """Matrix-multiply FLOPs (2 per multiply-add, attention scores and norms left out): a
    forward token costs 2 (N P_layer + P_head), a training token ``train_factor`` times that,
    and the teacher's forward 2 (L P_layer + P_head). The factor is 3 when the weights get
    gradients (forward, backward to the activations, backward to the weights) and 2 when they
    are frozen and only low-rank adapters train (LoRA's own matmuls are a rounding error).

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


# ------------------------------------------------------------------------------------ evaluate
@torch.no_grad()
def evaluate_depths(
    student: nn.Module,
    teacher: nn.Module,
    windows: Tensor,
    counts: Sequence[int],
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Perplexity of the student at each step count, its KL from the teacher (nats per token),
    and the teacher's own perplexity, in one pass over the windows (the teacher runs once per
    batch). Returns ``{"original": ppl, "steps": {N: {"perplexity", "kl"}}}``.

    Example:
        >>> evaluate_depths(student, teacher, windows, [15, 30])["steps"][30]   # doctest: +SKIP
        {'perplexity': 28.4, 'kl': 0.003}
    """
    training = student.training
    student.eval()
    nll = dict.fromkeys(counts, 0.0)
    kl = dict.fromkeys(counts, 0.0)
    teacher_nll, tokens = 0.0, 0
    num_layers = get_block(teacher).ode.num_layers
    for start in tqdm(
        range(0, len(windows), batch_size), desc="evaluate", disable=not progress, leave=False
    ):
        batch = windows[start : start + batch_size]
        targets = batch[:, 1:].reshape(-1)
        log_p = teacher(batch, use_cache=False, ode_steps=num_layers).logits[:, :-1]
        log_p = log_p.float().log_softmax(-1).flatten(0, 1)
        teacher_nll += F.nll_loss(log_p, targets, reduction="sum").item()
        for n in counts:
            log_q = student(batch, use_cache=False, ode_steps=n).logits[:, :-1]
            log_q = log_q.float().log_softmax(-1).flatten(0, 1)
            nll[n] += F.nll_loss(log_q, targets, reduction="sum").item()
            kl[n] += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        tokens += targets.numel()
    student.train(training)
    return {
        "original": math.exp(teacher_nll / tokens),
        "tokens": tokens,
        "steps": {
            n: {"perplexity": math.exp(nll[n] / tokens), "kl": kl[n] / tokens} for n in counts
        },
    }
