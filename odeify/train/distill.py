"""Depth adaptation: continuous-depth distillation of an odeified model from its frozen original.

A converted pretrained model equals the original at N = L steps, but pretrained layers are not a
smooth function of depth, so other step counts fail without training. Depth adaptation
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
N = L / 2 better moves N = L. :class:`odeify.train.sampler.StepSampler` keeps N = L in the loss mix (every step by
default) as the anchor that holds the adapted model close to the original at full depth.

Example:
    >>> from odeify.train.sampler import StepSampler
    >>> teacher = frozen_teacher(base)                     # base: the stock original
    >>> student = odeify(base, progress=False)
    >>> sampler = StepSampler(num_layers=4, low=2, high=8, seed=0)
    >>> ids, labels = ids[:, :-1], ids[:, 1:]
    >>> weights = LossWeights(kl=1.0, hidden=1.0)
    >>> targets = teacher_targets(teacher, ids, weights)
    >>> parts = adapt_step(student, targets, ids, labels, sampler.draw(0), weights)
    >>> [p["steps"] for p in parts], round(parts[0]["kl"], 6)   # N = L: exact before training
    ([4, 3], 0.0)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import get_block, odeify
from ..schedule import Schedule
from ..schemes import layer_bounds, spans
from ..surgery import block_stack, is_odeified, layer_samples, stock_model

__all__ = [
    "LossWeights",
    "Targets",
    "adapt_step",
    "distill_loss",
    "drop_layers",
    "frozen_teacher",
    "matching",
    "recording",
    "teacher_targets",
]


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
        >>> with recording(model) as states:
        ...     logits = model(ids).logits
        >>> len(states)   # one state per step, the model's 4 by default
        4
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
        >>> teacher = frozen_teacher(base)   # base: a stock GPT-2, left as it is
        >>> frozen = not any(p.requires_grad for p in teacher.parameters())
        >>> is_odeified(teacher), is_odeified(base), frozen
        (True, False, True)
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
        >>> teacher = frozen_teacher(base)
        >>> targets = teacher_targets(teacher, ids, LossWeights(hidden=1.0))
        >>> targets.log_probs.shape, len(targets.states)   # a state per teacher layer
        (torch.Size([2, 16, 97]), 4)
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
    schedule: Schedule | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The student's loss at ``steps`` solver steps against the teacher's targets for ``ids``,
    on ``schedule`` when given (a ``sequential`` :class:`odeify.schedule.Schedule` of ``steps``
    steps whose times and gains may be tensors being trained: the loss backpropagates to them).

    Returns the weighted loss (to backpropagate) and its parts as floats: ``kl`` (nats per
    token), ``lm`` (next-token cross-entropy), ``hidden`` (mean over matched states) and ``loss``.

    Example:
        >>> teacher, student = frozen_teacher(base), odeify(base, progress=False)
        >>> ids, labels = ids[:, :-1], ids[:, 1:]
        >>> targets = teacher_targets(teacher, ids)
        >>> loss, parts = distill_loss(student, ids, labels, targets, steps=2)
        >>> loss.backward()
        >>> sorted(parts), parts["kl"] > 0   # N = 2 of L = 4: not the teacher yet
        (['kl', 'loss'], True)
    """
    with _autocast(autocast, ids.device), contextlib.ExitStack() as stack:
        states = stack.enter_context(recording(student)) if weights.needs_states else None
        run = {} if schedule is None else {"ode_schedule": schedule, "ode_scheme": "sequential"}
        logits = student(ids, use_cache=False, ode_steps=steps, **run).logits
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
        uniform = schedule is None or all(
            abs(t - j / steps) < 1e-9 for j, t in enumerate(schedule.starts)
        )
        if not uniform:
            raise ValueError(
                "hidden-state matching pairs the uniform grid's step ends with the teacher's "
                "layers; a calibrated schedule's steps end elsewhere. Set hidden: 0"
            )
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
    schedules: Callable[[int], Schedule | None] | None = None,
) -> list[dict[str, float]]:
    """Accumulate the gradients of one training step: the loss at each step count in ``counts``
    on the same batch (one backward each, so only one grid's activations live at a time).

    The anchor N = L (the teacher's depth) is weighted by ``full_weight``; the other counts share
    a weight of 1. ``schedules(N)`` gives the schedule count N runs on (None: the model's own
    for N); it is called once per count, so trained schedule parameters get their gradients
    through a fresh graph each time. Returns each count's loss parts (with ``steps``). The
    caller steps the optimizer.

    Example:
        >>> teacher, student = frozen_teacher(base), odeify(base, progress=False)
        >>> optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        >>> ids, labels = ids[:, :-1], ids[:, 1:]
        >>> parts = adapt_step(student, teacher_targets(teacher, ids), ids, labels, [4, 2])
        >>> optimizer.step(); optimizer.zero_grad()
        >>> [(p["steps"], round(p["kl"], 6)) for p in parts][0]   # N = L matches the teacher
        (4, 0.0)
    """
    if not counts:
        raise ValueError("adapt_step needs at least one step count")
    drawn = [n for n in counts if n != targets.num_layers]
    anchors = len(counts) - len(drawn)
    reports = []
    for n in counts:
        share = full_weight / anchors if n == targets.num_layers else 1.0 / len(drawn)
        schedule = None if schedules is None else schedules(n)
        loss, parts = distill_loss(student, ids, labels, targets, n, weights, autocast, schedule)
        (loss * share).backward()
        reports.append({"steps": n, **parts})
    return reports


# ---------------------------------------------------------------------------------- baselines
@torch.no_grad()
def drop_layers(model: nn.Module, keep: int, layers: Sequence[int] | None = None) -> nn.Module:
    """Baseline (a): a stock model of ``keep`` of the original's L layers, layer i being original
    layer floor(i L / keep) (the layer at or before the ODE grid time i / keep) with the output
    projections scaled by L / keep, as :func:`odeify.materialize` scales them. For ``keep``
    dividing L this is exactly ``materialize(odeify(model), keep)`` (every other layer at L / 2).

    ``layers`` (increasing, ``keep`` of them) keeps those layers instead, unscaled: the pruned
    models of baselines (a') and (a'') (Block Influence, angular distance), which remove layers
    and leave the others as they are.

    Example:
        >>> plain = drop_layers(base, 2)   # base: a stock 4-layer GPT-2
        >>> plain.config.num_hidden_layers
        2
        >>> same = odeify.materialize(odeify(base, progress=False), 2)
        >>> torch.allclose(plain(ids).logits, same(ids).logits, atol=1e-5)
        True
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
    scales = spans(keep, num_layers)
    if layers is None:
        layers = [i * num_layers // keep for i in range(keep)]
    else:
        layers = [int(layer) for layer in layers]
        if len(layers) != keep or any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
            raise ValueError(f"layers must be {keep} increasing layer indices, got {layers}")
        if layers[0] < 0 or layers[-1] >= num_layers:
            raise ValueError(f"layers must lie in [0, {num_layers}), got {layers}")
        scales = [1.0] * keep
    samples = layer_samples(model, layers=layers)
    layer = lambda i: {name: s[i] for name, s in samples.items()}
    return stock_model(model, keep, layer, scales)
