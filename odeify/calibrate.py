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

``correction="linear"`` adds a per-step linear correction (ReplaceMe-style): a step that stands
in for several layers misses what the skipped layers added to the residual stream, so its MLP
update u is replaced by u T_i, with T_i a d x d matrix fitted in closed form by ridge least
squares on calibration activations (:func:`fit_linear_correction`): X the step's MLP updates,
Y what the step should have added after its attention update (the original's state where the
next step starts, minus the step's state after attention), T_i = argmin ||X T - Y||^2 +
lambda ||T - I||^2. Adam then refines T_i with the gains (``learn_correction``) when it runs.

``correction_rank=r`` makes each correction low rank, T_i = I + U_i V_i^T with U_i, V_i [d, r]
(2 d r numbers a step instead of d^2): the closed-form T_i is fitted as above, then T_i - I is
cut to its best rank-r approximation by truncated SVD (:func:`low_rank_factors`; with student
forcing the next step is fitted on the state the rank-r correction gives), and Adam refines
U_i and V_i. The schedule still holds the dense T_i, so what is saved and folded is unchanged.
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
from .block import _StepField
from .schedule import LINEAR, UNIFORM, Schedule
from .schemes import check_steps, resolve_solver

INITS = ("dp", "bi", "angular", "uniform")
CORRECTIONS = (LINEAR,)
FORCINGS = ("student", "teacher")


@dataclass
class Calibration:
    """What calibrating one step count gave: the schedule, its initial layers (None for
    ``init="uniform"``), the KL (nats per token) at each Adam step, wall and CPU seconds, peak
    memory and, with a linear correction, each step's relative least-squares residual
    ||X T - Y||^2 / ||Y||^2 on the fitting tokens without (T = I) and with the correction."""

    steps: int
    schedule: Schedule
    layers: list[int] | None
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    residuals: list[tuple[float, float]] = field(default_factory=list)


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
    correction: str | None = None,
    correction_tokens: int = 32_768,
    ridge: float = 1e-3,
    forcing: str = "student",
    learn_correction: bool = True,
    correction_lr: float = 1e-4,
    correction_rank: int | None = None,
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
        correction: None, or 'linear': fit each step's d x d correction of its MLP update in
            closed form (see the module docstring; needs layer initial nodes, not 'uniform').
        correction_tokens: how many calibration tokens the least squares sees (windows of
            ``seq_len`` spread evenly over the corpus; all of it when shorter). d^2 unknowns
            per step want many more tokens than d to stay clear of overfitting.
        ridge: lambda / (mean eigenvalue of X^T X): the pull of T towards the identity.
        forcing: the input of step i while fitting: 'student' (the corrected N-step model's own
            state there, fitted step after step, so a step also undoes the error of the jumps
            before it; SmolLM2, N = 15: 174.5 held-out perplexity) or 'teacher' (the original's
            state where step i starts; 770.5 there, benchmarks/RESULTS.md).
        learn_correction, correction_lr: whether Adam (when it runs) refines the matrices too,
            and its learning rate for them (entries of T move by about this much per step).
        correction_rank: None (or 0): each T_i a full d x d matrix; r in 1..d: T_i = I + U_i
            V_i^T of rank r, initialised by the truncated SVD of the closed-form T_i - I (the
            residuals then hold a third entry, that of the rank-r T_i), U_i and V_i refined by
            Adam.

    Returns {N: :class:`Calibration`}; the schedules are in ``config.odeify["schedules"]``.

    Example:
        >>> ids = tokenizer(text, return_tensors="pt").input_ids[0]            # doctest: +SKIP
        >>> odeify.calibrate(model, steps=[15, 20], data=ids, iters=100)        # doctest: +SKIP
        >>> odeify.calibrate(model, [15], ids, correction="linear", iters=0)  # doctest: +SKIP
        >>> odeify.calibrate(model, [15], ids, correction="linear", correction_rank=32)  # doctest: +SKIP
        >>> with odeify.steps(model, 15):                                      # doctest: +SKIP
        ...     logits = model(ids[None]).logits        # the calibrated schedule of 15
    """
    block = get_block(model)
    num_layers, ends = block.ode.num_layers, block.ode.discrete_ends
    counts = _check(steps, num_layers, ends, init)
    _check_correction(correction, init, forcing, ridge, correction_tokens)
    rank = check_rank(correction_rank, correction, _hidden_size(model))
    tokens = _tokens(data, batch_size, seq_len)
    batches = _Batches(tokens, batch_size, seq_len, seed)
    frozen = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        states = teacher_states(model, batches.get(0), num_layers)
        results = {}
        for n in counts:
            start, cpu = time.perf_counter(), time.process_time()
            layers = None if init == UNIFORM else initial_layers(states, n, init, ends)
            initial, residuals = _initial(model, n, layers), []
            if correction is not None:
                windows = spread_windows(tokens, correction_tokens, seq_len)
                initial, residuals = fit_linear_correction(
                    model,
                    initial,
                    windows,
                    ridge=ridge,
                    forcing=forcing,
                    progress=progress,
                    rank=rank,
                )
            learn = (learn_gains, learn_times, learn_correction)
            result = _fit(
                model, batches, n, initial, layers, learn, iters, lr, correction_lr, progress, rank
            )
            result.residuals = residuals
            result.seconds = time.perf_counter() - start
            result.cpu_seconds = time.process_time() - cpu
            result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            block.store_schedule(result.schedule)
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


def _check_correction(
    correction: str | None, init: str, forcing: str, ridge: float, tokens: int
) -> None:
    if correction is None:
        return
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be None or one of {CORRECTIONS}, got {correction!r}")
    if init == UNIFORM:
        raise ValueError(
            "a linear correction is fitted to the original's states at the layers where the "
            "steps start; init='uniform' steps start between layers. Use 'dp', 'bi' or 'angular'"
        )
    if forcing not in FORCINGS:
        raise ValueError(f"forcing must be one of {FORCINGS}, got {forcing!r}")
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"correction_tokens must be an integer >= 1, got {tokens!r}")


def _hidden_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[-1])


def check_rank(rank: int | None, correction: str | None, hidden_size: int) -> int | None:
    """The correction's rank as calibrate uses it: None for a full d x d matrix (``rank`` None
    or 0), else r, an integer in 1..d; anything else is refused with what to give instead.

    Example:
        >>> check_rank(None, "linear", 576), check_rank(0, "linear", 576), check_rank(32, "linear", 576)
        (None, None, 32)
    """
    if rank is None or (rank == 0 and not isinstance(rank, bool)):
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= hidden_size:
        raise ValueError(
            f"correction_rank must be an integer from 1 to the hidden size d = {hidden_size} "
            f"(or None / 0 for a full d x d correction), got {rank!r}"
        )
    if correction is None:
        raise ValueError(
            f"correction_rank = {rank} is the rank of a linear correction; set "
            "correction='linear' too (or leave correction_rank out)"
        )
    return rank


def low_rank_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """U, V [..., d, r] with U V^T the best rank-r approximation of ``delta`` [..., d, d] (the
    truncated SVD, Eckart-Young): U = U_r S_r, V = V_r, the right singular vectors. V is never
    zero, so a step whose fit is T = I (delta = 0: a step that stands for one layer) does not
    start at the saddle U = V = 0, where neither factor gets a gradient. Computed in float64,
    returned in ``delta``'s dtype.

    Example:
        >>> a, b = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
        >>> u, v = low_rank_factors(a @ b.T, 2)
        >>> u.shape, torch.allclose(u @ v.T, a @ b.T), torch.allclose(v.T @ v, torch.eye(2, dtype=torch.float64))
        (torch.Size([6, 2]), True, True)
    """
    left, values, right = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    u = left[..., :rank] * values[..., :rank].unsqueeze(-2)
    v = right[..., :rank, :].transpose(-1, -2)
    return u.to(delta.dtype), v.to(delta.dtype)


def truncate_correction(t: Tensor, rank: int) -> Tensor:
    """I + the best rank-r approximation of T - I, for T [..., d, d] (float64 inside).

    Example:
        >>> t = torch.eye(4) + torch.outer(torch.ones(4), torch.arange(4.0))
        >>> torch.allclose(truncate_correction(t, 1), t)
        True
    """
    eye = torch.eye(t.shape[-1], dtype=torch.float64)
    u, v = low_rank_factors(t.to(torch.float64) - eye, rank)
    return (eye + u @ v.transpose(-1, -2)).to(t.dtype)


def spread_windows(tokens: Tensor, count: int, seq_len: int) -> Tensor:
    """ceil(count / seq_len) windows [W, seq_len] spread evenly over the corpus (as many as fit
    without overlapping when it is shorter): the fit sees all of the text, not one part.

    Example:
        >>> spread_windows(torch.arange(100), 40, 10)[:, 0].tolist()
        [0, 30, 60, 90]
    """
    wanted = max(1, math.ceil(count / seq_len))
    fit = max(1, len(tokens) // seq_len)
    starts = np.linspace(0, len(tokens) - seq_len, min(wanted, fit)).round().astype(int)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


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
def teacher_states(model: nn.Module, ids: Tensor, num_layers: int) -> Tensor:
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


class ParametrisedSchedule(nn.Module):
    """The schedule being fitted (here, and with the weights in ``recipes/adapt_depth.py``): gains as they are; the free times (all but t_0 = 0 and the
    discrete ends) t = a + (b - a) cumsum(softmax(z)) between the fixed times a and b around
    them, so they stay strictly increasing in [0, 1) whatever Adam does. A linear correction
    is trained as it is (``correction`` [N, d, d]) or, with ``rank`` r, as T = I + U V^T
    (``u``, ``v`` [N, d, r], the truncated SVD of the start's T - I); :meth:`dense` gives T."""

    def __init__(
        self,
        start: Schedule,
        ends: int,
        learn_gains: bool,
        learn_times: bool,
        learn_correction: bool = False,
        rank: int | None = None,
    ):
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
        self.correction = self.u = self.v = None
        if start.correction is not None and rank:
            size = start.correction.shape[-1]
            eye = torch.eye(size, dtype=start.correction.dtype)
            u, v = low_rank_factors(start.correction.detach() - eye, rank)
            self.u = nn.Parameter(u, requires_grad=learn_correction)
            self.v = nn.Parameter(v, requires_grad=learn_correction)
        elif start.correction is not None:
            self.correction = nn.Parameter(
                start.correction.detach().clone(), requires_grad=learn_correction
            )

    def matrices(self) -> list[nn.Parameter]:
        if self.u is not None:
            return [self.u, self.v]
        return [] if self.correction is None else [self.correction]

    def dense(self) -> Tensor | None:
        """The correction T [N, d, d] as the steps apply it (None without one)."""
        if self.u is None:
            return self.correction
        eye = torch.eye(self.u.shape[-2], dtype=self.u.dtype, device=self.u.device)
        return eye + self.u @ self.v.transpose(-1, -2)

    def schedule(self) -> Schedule:
        times = self.start.starts
        if self.z.requires_grad:
            share = self.z.softmax(0) * (self.b - self.a)
            free = self.a + share.cumsum(0)[:-1]
            fixed = lambda values: torch.tensor(values, dtype=torch.float64)
            times = torch.cat([fixed(self.head), free, fixed(self.tail)])
        gains = self.gains if self.gains.requires_grad else list(self.start.gains)
        return Schedule(times, gains, self.start.num_layers, "sequential", correction=self.dense())

    def final(self) -> Schedule:
        schedule = self.schedule()
        times, gains = schedule.to_dict()["times"], schedule.to_dict()["gains"]
        dense = self.dense()
        correction = None if dense is None else dense.detach().clone()
        return Schedule(times, gains, self.start.num_layers, "sequential", correction=correction)


def _initial(model: nn.Module, steps: int, layers: list[int] | None) -> Schedule:
    block = get_block(model)
    if layers is None:
        return block.schedule_for(resolve_solver("sequential"), steps, UNIFORM)
    return Schedule.from_layers(layers, block.ode.num_layers)


def _fit(
    model: nn.Module,
    batches: _Batches,
    steps: int,
    start: Schedule,
    layers: list[int] | None,
    learn: tuple[bool, bool, bool],
    iters: int,
    lr: float,
    correction_lr: float,
    progress: bool,
    rank: int | None = None,
) -> Calibration:
    block = get_block(model)
    num_layers, ends = block.ode.num_layers, block.ode.discrete_ends
    params = ParametrisedSchedule(start, ends, *learn, rank=rank)
    groups = [
        {"params": [p for p in (params.z, params.gains) if p.requires_grad], "lr": lr},
        {"params": [p for p in params.matrices() if p.requires_grad], "lr": correction_lr},
    ]
    # The matrices get their own learning rate: entries of T near 1 (diagonal) or ~1 / sqrt(d)
    # (off it), where a gain's lr would move the whole d x d map by about lr x sqrt(d) a step.
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.Adam(groups) if groups else None
    result = Calibration(steps, start, layers)
    bar = tqdm(range(iters if groups else 0), desc=f"calibrating N = {steps}", disable=not progress)
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


class LinearFit:
    """Ridge least squares for one d x d correction, accumulated over batches in float64:
    T = argmin ||X T - Y||^2 + lambda ||T - I||^2, i.e. (X^T X + lambda I) T = X^T Y + lambda I.

    The ridge pulls T towards the identity (the uncorrected step), not towards zero, so a
    direction the data never excites keeps the step's own update. lambda = ``ridge`` x the
    mean eigenvalue of X^T X (trace / d): scale-free, so one value serves every step and model
    (MLP updates differ by orders of magnitude in norm between layers).

    Example:
        >>> x = torch.randn(500, 4, dtype=torch.float64)
        >>> t = torch.randn(4, 4, dtype=torch.float64)
        >>> fit = LinearFit(4)
        >>> fit.add(x, x @ t)
        >>> torch.allclose(fit.solve(ridge=0.0), t)
        True
    """

    def __init__(self, size: int):
        self.size = size
        self.xx = torch.zeros(size, size, dtype=torch.float64)
        self.xy = torch.zeros(size, size, dtype=torch.float64)
        self.yy = 0.0
        self.count = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        """Add rows: x, y [..., d] (the same leading shape)."""
        x = x.reshape(-1, self.size).to("cpu", torch.float64)
        y = y.reshape(-1, self.size).to("cpu", torch.float64)
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.yy += float((y * y).sum())
        self.count += x.shape[0]

    def solve(self, ridge: float) -> Tensor:
        """T [d, d] (float64)."""
        if self.count == 0:
            raise ValueError("no rows to fit a correction to")
        eye = torch.eye(self.size, dtype=torch.float64)
        lam = ridge * float(torch.trace(self.xx)) / self.size
        return torch.linalg.solve(self.xx + lam * eye, self.xy + lam * eye)

    def residual(self, t: Tensor) -> float:
        """||X T - Y||^2 / ||Y||^2 over the rows added."""
        t = t.to(torch.float64)
        sq = float(torch.trace(t.T @ self.xx @ t) - 2 * torch.trace(t.T @ self.xy)) + self.yy
        return max(sq, 0.0) / max(self.yy, 1e-300)


@torch.no_grad()
def fit_linear_correction(
    model: nn.Module,
    schedule: Schedule,
    windows: Tensor,
    *,
    ridge: float = 1e-3,
    forcing: str = "student",
    batch_windows: int = 8,
    progress: bool = False,
    rank: int | None = None,
) -> tuple[Schedule, list[tuple[float, ...]]]:
    """Fit the linear correction of a ``sequential`` schedule whose steps start at layers of the
    original (times l_i / L), in closed form on token windows [W, S].

    For step i the step's input is the corrected N-step model's own state (``forcing="student"``,
    fitted step after step) or the original's state x_{l_i} (``"teacher"``); with h its state
    after the attention update and u its MLP update (times the gain), T_i solves
    ``u T ~ x_{l_{i+1}} - h`` by :class:`LinearFit` (x_{l_N} the original's last state).

    With ``rank`` r, T_i is then cut to I + the rank-r truncated SVD of T_i - I
    (:func:`truncate_correction`), and under student forcing the next step starts from the
    state that rank-r T_i gives.

    Returns the schedule with the correction, and each step's relative residual before (T = I)
    and after (the full T_i), and with ``rank`` a third, that of the rank-r T_i. The model is
    not changed (store the schedule with ``block.store_schedule``).

    Example:
        >>> start = Schedule.from_layers([0, 2], num_layers=4)                # doctest: +SKIP
        >>> fixed, residuals = fit_linear_correction(model, start, ids.view(-1, 16))  # doctest: +SKIP
        >>> fixed.correction.shape                                               # doctest: +SKIP
        torch.Size([2, 32, 32])
    """
    if forcing not in FORCINGS:
        raise ValueError(f"forcing must be one of {FORCINGS}, got {forcing!r}")
    if schedule.scheme != "sequential":
        raise ValueError(
            f"a linear correction is for 'sequential' schedules, not {schedule.scheme!r}"
        )
    block = get_block(model)
    num_layers = block.ode.num_layers
    schedule.check_layers(num_layers)
    layers = [round(t * num_layers) for t in schedule.starts]
    if any(
        abs(t * num_layers - layer) > 1e-6 for t, layer in zip(schedule.starts, layers, strict=True)
    ):
        raise ValueError(
            f"a linear correction is fitted where the steps start on the original's layers; "
            f"this schedule's steps start between layers (times {schedule.starts})"
        )
    plain = Schedule(schedule.starts, list(schedule.gains), num_layers, "sequential", schedule.name)
    bounds = [*layers, num_layers]
    device = next(model.parameters()).device
    # Per batch of windows: the original's states at the step bounds, and the bound N-step run.
    batches = []
    for ids in windows.split(batch_windows):
        ids = ids.to(device)
        with block.recording() as after:
            out = model(
                ids, use_cache=False, output_hidden_states=True, **_run(num_layers, UNIFORM)
            )
        states = [out.hidden_states[0], *after]
        targets = {layer: states[layer].float() for layer in set(bounds)}
        del states, after, out
        with block.capture() as calls:
            model(ids, use_cache=False, **_run(schedule.steps, plain))
        batches.append([targets, calls[0].run, targets[0]])
    size = batches[0][0][0].shape[-1]
    matrices, residuals = [], []
    for i in tqdm(range(schedule.steps), desc="fitting corrections", disable=not progress):
        fit, updates = LinearFit(size), []
        g_attn, g_mlp = plain.step_gains(i)
        for targets, run, state in batches:
            x = targets[bounds[i]] if forcing == "teacher" else state
            field = _StepField(run, run.inputs(i, region=False))
            h = x + field.attention(x, 0) * g_attn
            u = field.mlp(h, 0) * g_mlp
            fit.add(u, targets[bounds[i + 1]] - h)
            updates.append((h, u))
        t = fit.solve(ridge)
        residual = (fit.residual(torch.eye(size)), fit.residual(t))
        if rank:
            t = truncate_correction(t, rank)
            residual = (*residual, fit.residual(t))
        residuals.append(residual)
        matrices.append(t)
        if forcing == "student":
            t = t.to(device, batches[0][0][0].dtype)
            for batch, (h, u) in zip(batches, updates, strict=True):
                batch[2] = h + u @ t
    correction = torch.stack(matrices).to(next(block.basis.parameters()).dtype)
    fixed = Schedule(
        plain.starts, list(plain.gains), num_layers, "sequential", plain.name, correction=correction
    )
    return fixed, residuals
