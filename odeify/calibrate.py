"""Calibrated step schedules: for a step count N, the step times and gains with which the frozen
ODE model at N steps imitates itself at N = L, learned in minutes.

One pass of the original (N = L) over calibration text records the state after every layer;
from those states the initial nodes are chosen (which layers the N steps start at), then the
gains of every stage update (and, optionally, the step times) are fitted by Adam to the KL
between the original's next-token distribution and the N-step model's, the weights frozen.
The result is a :class:`odeify.schedule.Schedule` stored in the model's ODE settings under N,
which ``odeify.steps(model, N)``, ``ode_steps=N``, ``generate`` and ``materialize`` then use.

Initial nodes (``init=``), each from the recorded states x_0 .. x_L:

- ``"dp"``: dynamic programming over a one-step jump cost, as GITS does for diffusion: choose
  0 = l_0 < ... < l_{N-1} < L minimising the summed cost of jumping from layer a to layer b in
  one step, the relative error between x_b and x_{a+1} (what one kept layer with gain 1 gives);
  compounding is ignored;
- ``"bi"``: the N layers of highest Block Influence, 1 - mean cos(x_l, x_{l+1}) (ShortGPT);
- ``"angular"``: remove the contiguous block of L - N layers whose input and output states have
  the smallest mean angular distance (Gromov et al.);
- ``"uniform"``: t_i = i / N with gains L / N (today's retargeting), the others start at gain 1.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .api import get_block
from .schedule import UNIFORM, Schedule
from .schemes import check_steps, resolve_solver

INITS = ("dp", "bi", "angular", "uniform")


@dataclass
class Calibration:
    """What calibrating one step count gave: the schedule, its initial layers (None for
    ``init="uniform"``), the KL (nats per token) at each Adam step, seconds and peak memory."""

    steps: int
    schedule: Schedule
    layers: list[int] | None
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


def calibrate(
    model: nn.Module,
    steps: Sequence[int],
    data,
    *,
    init: str = "dp",
    learn_gains: bool = True,
    learn_times: bool = True,
    iters: int = 100,
    lr: float = 0.02,
    batch_size: int = 2,
    seq_len: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> dict[int, Calibration]:
    """Calibrate the ``sequential`` schedules of some step counts and store them in the model.

    Args:
        model: an odeified model; its weights stay as they are (frozen while calibrating).
        steps: the step counts N (each below L and above 2 x ``discrete_ends``).
        data: calibration tokens, a 1-D integer tensor, array or list (at least one batch).
        init: initial nodes: 'dp', 'bi', 'angular' or 'uniform' (see the module docstring).
        learn_gains, learn_times: what Adam fits (with neither, the initial schedule is kept).
        iters, lr, batch_size, seq_len, seed: Adam steps, its learning rate, and the random
            windows of tokens each step sees (batch i is the same for every N).
        progress: a tqdm bar per step count.

    Returns {N: :class:`Calibration`}; the schedules are in ``config.odeify["schedules"]``.

    Example:
        >>> ids = tokenizer(text, return_tensors="pt").input_ids[0]            # doctest: +SKIP
        >>> odeify.calibrate(model, steps=[15, 20], data=ids, iters=100)        # doctest: +SKIP
        >>> with odeify.steps(model, 15):                                      # doctest: +SKIP
        ...     logits = model(ids[None]).logits        # the calibrated schedule of 15
    """
    block = get_block(model)
    num_layers, ends = block.ode.num_layers, block.ode.discrete_ends
    counts = _check(steps, num_layers, ends, init)
    tokens = _tokens(data, batch_size, seq_len)
    batches = _Batches(tokens, batch_size, seq_len, seed)
    frozen = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        states = _teacher_states(model, batches.get(0), num_layers)
        results = {}
        for n in counts:
            start = time.perf_counter()
            layers = None if init == UNIFORM else initial_layers(states, n, init, ends)
            result = _fit(model, batches, n, layers, learn_gains, learn_times, iters, lr, progress)
            result.seconds = time.perf_counter() - start
            result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            saved = {**block.ode.schedules, str(n): result.schedule.to_dict()}
            block.ode.update(schedules=saved)
            results[n] = result
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return results


def _check(steps: Sequence[int], num_layers: int, ends: int, init: str) -> list[int]:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    counts = [check_steps(n) for n in ([steps] if isinstance(steps, int) else steps)]
    if not counts:
        raise ValueError("calibrate needs at least one step count")
    for n in counts:
        if n >= num_layers:
            raise ValueError(
                f"calibrate retargets to fewer steps than the L = {num_layers} layers (where "
                f"the model is the original); got N = {n}"
            )
        if n <= 2 * ends:
            raise ValueError(
                f"with discrete_ends = {ends} a schedule needs more than {2 * ends} steps "
                f"(the {ends} discrete layers at each end and one step between), got N = {n}"
            )
    return counts


def _tokens(data, batch_size: int, seq_len: int) -> Tensor:
    tokens = torch.as_tensor(np.asarray(data) if not isinstance(data, Tensor) else data)
    if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(
            f"calibration data must be a 1-D sequence of token ids, got shape "
            f"{tuple(tokens.shape)} of {tokens.dtype}"
        )
    if len(tokens) < batch_size * seq_len:
        raise ValueError(
            f"the calibration corpus has {len(tokens)} tokens, shorter than one batch of "
            f"{batch_size} x {seq_len} = {batch_size * seq_len}; give more text or a smaller "
            "batch_size / seq_len"
        )
    return tokens.long()


class _Batches:
    """Random windows of the corpus; batch i is a pure function of (seed, i)."""

    def __init__(self, tokens: Tensor, batch_size: int, seq_len: int, seed: int):
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def get(self, i: int) -> Tensor:
        rng = np.random.default_rng([self.seed, i])
        starts = rng.integers(0, len(self.tokens) - self.seq_len + 1, size=self.batch_size)
        return torch.stack([self.tokens[s : s + self.seq_len] for s in starts.tolist()])


@torch.no_grad()
def _teacher_states(model: nn.Module, ids: Tensor, num_layers: int) -> Tensor:
    """The original's state x_0 .. x_L at every token, [L + 1, tokens, d] (float32)."""
    block = get_block(model)
    device = next(model.parameters()).device
    with block.recording() as after:
        out = model(
            ids.to(device),
            use_cache=False,
            output_hidden_states=True,
            **_run(num_layers, UNIFORM),
        )
    states = [out.hidden_states[0], *after]
    return torch.stack([s.float().flatten(0, 1) for s in states])


def _run(steps: int, schedule) -> dict:
    # Calibrated schedules are sequential ones, whatever the model's default scheme.
    return {"ode_steps": steps, "ode_scheme": "sequential", "ode_schedule": schedule}


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)


def initial_layers(states: Tensor, steps: int, init: str, ends: int = 0) -> list[int]:
    """The layers l_0 < ... < l_{N-1} the N steps start at, from the original's states
    [L + 1, tokens, d] by ``init`` ('dp', 'bi', 'angular'); the first and last ``ends`` layers
    are always kept.

    Example:
        >>> states = torch.randn(7, 5, 4)
        >>> layers = initial_layers(states, 3, "dp")
        >>> len(layers), layers[0]
        (3, 0)
    """
    num_layers = states.shape[0] - 1
    fixed = list(range(ends)) + list(range(num_layers - ends, num_layers))
    if init == "bi":
        influence = 1 - _cos(states[:-1], states[1:]).mean(-1)
        free = [layer for layer in range(ends, num_layers - ends)]
        ranked = sorted(free, key=lambda layer: -float(influence[layer]))
        return sorted(fixed + ranked[: steps - 2 * ends])
    if init == "angular":
        n = num_layers - steps
        starts = range(ends, num_layers - ends - n + 1)
        distance = [float(torch.arccos(_cos(states[s], states[s + n])).mean()) for s in starts]
        best = list(starts)[int(np.argmin(distance))]
        return [layer for layer in range(num_layers) if not best <= layer < best + n]
    if init == "dp":
        return _jump_dp(states, steps, ends)
    raise ValueError(f"initial layers come from 'dp', 'bi' or 'angular', got {init!r}")


def _jump_dp(states: Tensor, steps: int, ends: int) -> list[int]:
    """min over 0 = l_0 < ... < l_{N-1} < l_N = L of sum_k cost(l_k, l_{k+1}), where
    cost(a, b) = mean_tokens ||x_b - x_{a+1}|| / ||x_b||; the ends' layers are forced."""
    num_layers = states.shape[0] - 1
    norms = states.norm(dim=-1).clamp_min(1e-12)
    cost = torch.full((num_layers + 1, num_layers + 1), math.inf, dtype=torch.float64)
    for a in range(num_layers):
        diff = (states[a + 2 :] - states[a + 1]).norm(dim=-1) / norms[a + 2 :]
        cost[a, a + 1] = 0.0
        cost[a, a + 2 :] = diff.mean(-1).double()
    forced = {k: k for k in range(ends)} | {steps - 1 - k: num_layers - 1 - k for k in range(ends)}
    # best[k][l]: the least cost of k + 1 steps whose last step starts at layer l.
    best = torch.full((steps, num_layers), math.inf, dtype=torch.float64)
    back = torch.zeros((steps, num_layers), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, steps):
        for b in range(k, num_layers - (steps - 1 - k)):
            if forced.get(k, b) != b:
                continue
            totals = best[k - 1, :b] + cost[:b, b]
            back[k, b] = int(totals.argmin())
            best[k, b] = totals.min()
    last = best[steps - 1] + cost[:num_layers, num_layers]
    layer = int(last.argmin())
    layers = [layer]
    for k in range(steps - 1, 0, -1):
        layer = int(back[k, layer])
        layers.append(layer)
    return layers[::-1]


class _Parametrised(nn.Module):
    """The schedule being fitted: gains as they are; the free times (all but t_0 = 0 and the
    discrete ends) t = a + (b - a) cumsum(softmax(z)) between the fixed times a and b around
    them, so they stay strictly increasing in [0, 1) whatever Adam does."""

    def __init__(self, start: Schedule, ends: int, learn_gains: bool, learn_times: bool):
        super().__init__()
        self.start, n = start, start.steps
        times = start.starts
        self.head, self.tail = times[: max(ends, 1)], times[n - ends :]
        self.a, self.b = self.head[-1], self.tail[0] if ends else 1.0
        increments = np.diff([self.a, *times[len(self.head) : n - ends], self.b])
        self.z = nn.Parameter(torch.tensor(increments).log(), requires_grad=learn_times)
        self.gains = nn.Parameter(
            torch.tensor(list(start.gains), dtype=torch.float32), requires_grad=learn_gains
        )

    def schedule(self) -> Schedule:
        times = self.start.starts
        if self.z.requires_grad:
            share = self.z.softmax(0) * (self.b - self.a)
            free = self.a + share.cumsum(0)[:-1]
            fixed = lambda values: torch.tensor(values, dtype=torch.float64)
            times = torch.cat([fixed(self.head), free, fixed(self.tail)])
        gains = self.gains if self.gains.requires_grad else list(self.start.gains)
        return Schedule(times, gains, self.start.num_layers, "sequential")

    def final(self) -> Schedule:
        schedule = self.schedule()
        times, gains = schedule.to_dict()["times"], schedule.to_dict()["gains"]
        return Schedule(times, gains, self.start.num_layers, "sequential")


def _fit(
    model: nn.Module,
    batches: _Batches,
    steps: int,
    layers: list[int] | None,
    learn_gains: bool,
    learn_times: bool,
    iters: int,
    lr: float,
    progress: bool,
) -> Calibration:
    block = get_block(model)
    num_layers, ends = block.ode.num_layers, block.ode.discrete_ends
    if layers is None:
        start = block.schedule_for(resolve_solver("sequential"), steps, UNIFORM)
    else:
        start = Schedule.from_layers(layers, num_layers)
    params = _Parametrised(start, ends, learn_gains, learn_times)
    trainable = [p for p in params.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr) if trainable else None
    result = Calibration(steps, start, layers)
    bar = tqdm(
        range(iters if trainable else 0), desc=f"calibrating N = {steps}", disable=not progress
    )
    device = next(model.parameters()).device
    for i in bar:
        ids = batches.get(i).to(device)
        with torch.no_grad():
            teacher = model(ids, use_cache=False, **_run(num_layers, UNIFORM))
        target = teacher.logits.float().log_softmax(-1)
        with torch.enable_grad():  # also under a caller's no_grad (the CLI, the demo)
            student = model(ids, use_cache=False, **_run(steps, params.schedule()))
            log_q = student.logits.float().log_softmax(-1)
            kl = F.kl_div(log_q, target, log_target=True, reduction="sum") / ids.numel()
            optimizer.zero_grad()
            kl.backward()
        optimizer.step()
        result.losses.append(float(kl.detach()))
        bar.set_postfix(kl=f"{result.losses[-1]:.3f}")
    result.schedule = params.final()
    return result
