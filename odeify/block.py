"""The ODE block: one module that replaces a stack of L blocks with the flow of
dx/dt = L * (A(x; W(t)) + M(x; W(t))) on t in [0, 1].

The block is a :class:`odeify.weight_function.WeightFunction` (W(t), its fit and its grid cache
live there; subclassing keeps the saved keys, see that module) and adds the integration: it
binds the parent model's layer call, steps native schemes or bridges to torchdiffeq, dispatches
per-sample step counts, claims the KV cache and feeds transformers' ``output_hidden_states``.
Two documented modes let other code watch the flow without patching it: :meth:`ODEBlock.recording`
(the state after every step) and :meth:`ODEBlock.capture` (the bound call, without integrating).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchdiffeq import odeint, odeint_adjoint
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import logging

# Private to transformers (pinned at 5.23): how its output_hidden_states hooks collect states.
from transformers.utils.output_capturing import _active_collector

from . import local, lora_hooks
from .config import ODEConfig, ODESettings
from .family import Family, Stage
from .schedule import CALIBRATED, CHOICES, Schedule, correction_size
from .schemes import Solver, check_sample_steps, check_steps, resolve_solver
from .weight_function import WeightFunction, _get
from .weights import PerSampleWeights, Weights

# Keyword arguments of the parent's layer call that the block consumes itself.
_CONSUMED = ("use_cache", "encoder_attention_mask")

_logger = logging.get_logger(__name__)


@dataclass
class Call:
    """One forward call seen in :meth:`ODEBlock.capture` mode: the arguments the parent model
    passed and what :meth:`ODEBlock.bind` made of them (the initial state and the run)."""

    args: tuple
    kwargs: dict
    x: Tensor
    run: _Run


class ODEBlock(WeightFunction):
    """A continuous-depth replacement of a model's whole block stack.

    It sits where the stack was (a ModuleList of length one), is called by the parent model the
    way its layers were, and integrates from t = 0 to 1 with the configured scheme and steps.
    Build it with :func:`odeify.odeify`; this class is not public API.

    Its settings are ``config.odeify`` in the parent's config (the constructor writes them there);
    ``block.ode`` is the typed view of that dict (:class:`odeify.config.ODESettings`).
    """

    def __init__(
        self, family: Family, config, ode: ODEConfig, shapes: dict[str, torch.Size], dtype, device
    ):
        super().__init__(
            shapes,
            ode.basis,
            ode.num_basis,
            ode.num_layers,
            ode.basis_kwargs,
            family.group_of,
            transposed=[name for name in shapes if family.is_transposed(name)],
            dtype=dtype,
            device=device,
        )
        self.family, self.config = family, config
        config.odeify = ode.to_dict()  # the one copy of the settings, saved with the model
        for key, value in family.attention_attrs(config).items():
            setattr(self, key, value)
        self.layer_idx = 0
        # The unit transformers' activation_checkpointing_enable() checkpoints: one solver step.
        self.stepper = _Step()
        self._warned: set[tuple[str, int]] = set()  # (scheme, N) told they run uniform
        # The matrices of the schedules' linear corrections, buffers "n<N>" [N, d, d] saved with
        # the weights: registered here from the settings' descriptions so that a checkpoint's
        # skeleton (and transformers' loader) expects exactly the tensors that were saved.
        # Identity until loaded or calibrated: an unloaded correction changes nothing.
        self.corrections = nn.Module()
        for steps, data in ode.schedules.items():
            size = correction_size(data.get("correction"))
            if size is not None:
                self._check_width(size, f"the schedule of {steps} steps has a correction for")
                eye = torch.eye(size, dtype=dtype, device=device)
                self.corrections.register_buffer(f"n{steps}", eye.repeat(int(steps), 1, 1))
        lora_hooks.attach(self)

    def _check_width(self, size: int, what: str) -> None:
        width = getattr(self.config, "hidden_size", None)
        if width is not None and size != width:
            raise ValueError(
                f"{what} hidden size {size}; the model has {width}. Calibrate it again for "
                "this model (odeify.calibrate)"
            )

    def store_schedule(self, schedule: Schedule) -> None:
        """Save a schedule as the calibrated one of its step count: its dict in the settings
        (``schedules``), its correction matrices (if any) in the buffer ``corrections.n<N>``;
        a schedule without one removes an earlier correction of that count.

        Example:
            >>> block.store_schedule(Schedule.from_layers([0, 2], num_layers=4))  # doctest: +SKIP
            >>> block.ode.schedules["2"]["times"]                                 # doctest: +SKIP
            [0.0, 0.5]
        """
        schedule.check_layers(self.ode.num_layers)
        name = f"n{schedule.steps}"
        if schedule.correction is not None:
            self._check_width(schedule.hidden_size, "this schedule's correction is for")
            like = next(self.basis.parameters())
            value = schedule.correction.detach().to(like.device, like.dtype)
            self.corrections.register_buffer(name, value.clone().contiguous())
        elif name in self.corrections._buffers:
            del self.corrections._buffers[name]
        saved = {**self.ode.schedules, str(schedule.steps): schedule.to_dict()}
        self.ode.update(schedules=saved)

    @property
    def ode(self) -> ODESettings:
        """The ODE settings: a typed, validated view of ``config.odeify``."""
        return ODESettings(self.config)

    # ---------------------------------------------------------------------------- observing
    @contextlib.contextmanager
    def recording(self) -> Iterator[list[Tensor]]:
        """Record the state after every native solver step of the forward calls in the block.

        The states are the ones the integration continues from, so they stay in the autograd
        graph (hidden-state matching backpropagates through them); at N = L they are the
        original model's per-layer outputs. Torchdiffeq schemes record nothing.

        Example:
            >>> block = odeify.get_block(model)
            >>> with block.recording() as states:
            ...     logits = model(ids).logits
            >>> len(states), states[-1].shape
            (4, torch.Size([2, 16, 32]))
        """
        if local.get(self, "recording") is not None:
            raise RuntimeError("this model's ODE block is already being recorded")
        with local.holding(self, "recording", []) as states:
            yield states

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[Call]]:
        """Capture mode: each forward call inside the block binds its arguments, appends a
        :class:`Call` (the arguments, ``x0`` and the run) and returns x0 without integrating, so
        the parent's forward finishes at the cost of its embeddings and head. Analysis code then
        steps the flow itself with :meth:`step`. Pass ``use_cache=False``: bind claims a cache.

        Example:
            >>> block = odeify.get_block(model)
            >>> with torch.no_grad(), block.capture() as calls:
            ...     _ = model(ids, use_cache=False, ode_steps=12)
            >>> x, run = calls[0].x, calls[0].run
            >>> with torch.no_grad():
            ...     x = block.step(x, run, 0)
            >>> x.shape
            torch.Size([2, 16, 32])
        """
        if local.get(self, "capture") is not None:
            raise RuntimeError("this model's ODE block is already capturing its calls")
        with local.holding(self, "capture", []) as calls:
            yield calls

    # ---------------------------------------------------------------------------------- forward
    def solver(self, scheme: str | None = None, steps=None) -> tuple[Solver, int | Tensor]:
        """The validated scheme and step count of a call: an int, or per-sample counts [B]."""
        solver = resolve_solver(self.ode.scheme if scheme is None else scheme)
        steps = self.ode.resolved_steps if steps is None else steps
        if isinstance(steps, (Tensor, list, tuple)):
            return solver, check_sample_steps(steps)
        return solver, check_steps(steps)

    def bind(self, *args, **kwargs) -> tuple[Tensor, _Run]:
        """Parse the parent model's layer call into the hidden states and a run: solver, steps,
        mask, cache and, for native schemes, the weights of the grid.

        ``forward`` is ``bind`` followed by ``step`` for i < run.steps; analysis code that needs
        the states between steps gets the bound call from :meth:`capture` and does the same.
        """
        bound = dict(zip(self.family.call_signature, args, strict=False))
        bound.update(kwargs)
        x = bound.pop("hidden_states")
        if bound.pop("encoder_hidden_states", None) is not None:
            raise ValueError(
                "odeified models have no cross-attention; do not pass encoder_hidden_states"
            )
        solver, steps = self.solver(bound.pop("ode_scheme", None), bound.pop("ode_steps", None))
        # transformers 5.24 renamed the layer's keyword `past_key_values` to `cache`.
        cache = bound.pop("cache", bound.pop("past_key_values", None))
        if cache is not None and self.checkpointing:
            # A recomputed step would write its keys into the cache a second time in backward;
            # transformers' own checkpointed layers drop the cache the same way.
            _logger.warning_once(
                "Caching is incompatible with activation checkpointing in the ODE block: running "
                "without past_key_values."
            )
            cache = None
        mask = bound.pop("attention_mask", None)
        position_embeddings = bound.pop("position_embeddings", None)
        for key in _CONSUMED:
            bound.pop(key, None)
        choice = bound.pop("ode_schedule", None)
        per_sample = None
        if isinstance(steps, Tensor):
            steps, per_sample = self._per_sample(steps, solver, x.shape[0])
        ends = self.ode.discrete_ends
        if ends and (solver.native is None or per_sample is not None):
            raise ValueError(
                f"discrete_ends = {ends} fixes where the end steps fall on a native grid: use a "
                f"native scheme ({solver.name!r} is not one) and one step count for the batch"
            )
        run = _Run(self, solver, steps, cache, mask, position_embeddings, bound)
        if solver.native is not None:
            if per_sample is None:
                run.schedule = self.schedule_for(solver, steps, choice)
                times, run.index = run.schedule.stage_times(solver.native.offsets)
                run.times = [
                    float(t) for t in (times.detach() if isinstance(times, Tensor) else times)
                ]
                cached = self.ode.cache_weights and not isinstance(times, Tensor)
                key = (solver.native.name, tuple(run.times))
                if self.checkpointing and not isinstance(times, Tensor):
                    # Each checkpointed step builds W(t) of its own stages (step_weights): a
                    # grid built here would keep every step's weights alive through backward,
                    # and reentrant checkpointing cannot backpropagate through one graph shared
                    # by all steps. Learnable times (a tensor) keep the grid: its graph holds them.
                    run.low_rank = self._low_rank
                else:
                    run.weights = self.grid_weights(key, times, cache=cached)
                grid = (solver.native.name, steps, run.schedule.key)
            else:
                run.per_sample = per_sample.to(x.device)
                grid = self._per_sample_grid(run, choice, x.dtype)
            if cache is not None:
                _claim_cache(cache, grid, steps * solver.native.stages, x.shape[1])
        return x, run

    def schedule_for(
        self, solver: Solver, steps: int, choice: str | Schedule | None = None
    ) -> Schedule:
        """The schedule a native run of ``steps`` steps follows: ``choice`` (a
        :class:`Schedule`, 'calibrated' or 'uniform'; default the ``schedule`` setting). The
        calibrated schedule of N is used when one is stored for this scheme; otherwise the
        uniform grid (or that of ``discrete_ends``), with a warning, once per N, when
        calibrated schedules exist for other step counts.

        Example:
            >>> block.schedule_for(resolve_solver("sequential"), 15)   # doctest: +SKIP
            Schedule(calibrated, N=15, L=30, times=[0.000, 0.033, ...])
        """
        ode = self.ode
        choice = ode.schedule if choice is None else choice
        if isinstance(choice, Schedule):
            choice.check_layers(ode.num_layers)
            if choice.correction is not None:
                self._check_width(choice.hidden_size, "this schedule's correction is for")
            if choice.steps != steps or choice.scheme != solver.name:
                raise ValueError(
                    f"the schedule given has {choice.steps} steps of {choice.scheme!r}; the run "
                    f"has {steps} steps of {solver.name!r}"
                )
            return choice
        if choice not in CHOICES:
            raise ValueError(f"ode_schedule must be a Schedule or one of {CHOICES}, got {choice!r}")
        saved = ode.schedules if choice == CALIBRATED else {}
        data = saved.get(str(steps))
        if data is not None and data.get("scheme", "sequential") == solver.name:
            correction = None
            if data.get("correction") is not None:
                correction = self.corrections._buffers.get(f"n{steps}")
                if correction is None:
                    raise ValueError(
                        f"the calibrated schedule of {steps} steps has a linear correction but "
                        "the model holds no matrices for it (the settings were edited, or "
                        "copied without the weights); calibrate it again"
                    )
            return Schedule.from_dict(data, correction=correction)
        if saved and steps != ode.num_layers and (solver.name, steps) not in self._warned:
            self._warned.add((solver.name, steps))
            warnings.warn(
                f"no calibrated {solver.name!r} schedule for {steps} steps (calibrated: "
                f"{', '.join(sorted(saved, key=int))}); running the uniform grid. Calibrate it "
                "with odeify.calibrate(model, steps=[...]).",
                stacklevel=2,
            )
        if ode.discrete_ends:
            return Schedule.discrete_ends(steps, ode.num_layers, ode.discrete_ends, solver.name)
        return Schedule.uniform(steps, ode.num_layers, solver.name)

    def _per_sample_grid(self, run: _Run, choice, dtype: torch.dtype) -> tuple:
        """Each sample's stage times [B, steps * stages] and gains [B, steps, g] from the
        schedule of its own step count (padded past its end); the KV grid they make."""
        scheme, counts = run.solver.native, run.per_sample
        schedules = {n: self.schedule_for(run.solver, n, choice) for n in set(counts.tolist())}
        times, gains = [], []
        if any(s.correction is not None for s in schedules.values()):
            run.sample_schedules = [schedules[n] for n in counts.tolist()]
        for n in counts.tolist():
            schedule = schedules[n]
            t, index = schedule.stage_times(scheme.offsets)
            flat = [t[j] for j in index]
            times.append(flat + [flat[-1]] * (run.steps * scheme.stages - len(flat)))
            g = torch.tensor(schedule.gains, dtype=torch.float64).view(n, -1)
            gains.append(torch.cat([g, g[-1:].expand(run.steps - n, -1)]))
        run.sample_times = torch.tensor(times, dtype=torch.float64)
        run.sample_gains = torch.stack(gains).to(counts.device, dtype)
        return (scheme.name, tuple(counts.tolist()), tuple(schedules[n].key for n in schedules))

    def _per_sample(self, counts: Tensor, solver: Solver, batch: int) -> tuple[int, Tensor | None]:
        """(steps of the loop, per-sample counts or None when all samples share one grid)."""
        if counts.numel() != batch:
            raise ValueError(f"got {counts.numel()} per-sample step counts for a batch of {batch}")
        if bool((counts == counts[0]).all()):
            return int(counts[0]), None
        if solver.native is None:
            raise ValueError(
                f"per-sample step counts need a native fixed-grid scheme, not {solver.name!r}"
            )
        if self.time_scaled:
            raise ValueError(
                "per-sample step counts are not supported with scale_attn_by_inverse_layer_idx"
            )
        return int(counts.max()), counts

    def step(self, x: Tensor, run: _Run, i: int | _StepInputs) -> Tensor:
        """Step i of a native scheme, from t_i to t_{i+1} of the run's :class:`Schedule`, its
        updates scaled by the schedule's gains (uniform: t_i = i / N, gains L / N).

        ``i`` is the step index, or what ``run.inputs(i, region=True)`` made of it (what a
        compiled step is given, see :func:`odeify.compile`). With per-sample step counts N_b,
        sample b steps on the schedule of its own count, and leaves its state unchanged once
        i >= N_b.
        """
        if run.per_sample is None:
            inputs = i if isinstance(i, _StepInputs) else run.inputs(i, region=False)
            weights = inputs.weights or self.step_weights(run, inputs.times)
            field = _StepField(run, inputs, weights)
            return run.solver.native.step(field, x, inputs.gains)
        counts = run.per_sample.view(-1, 1, 1)
        g = run.sample_gains[:, i].unsqueeze(-1).unsqueeze(-1)  # [B, gains, 1, 1]
        h = (g[:, 0], g[:, 1]) if g.shape[1] == 2 else g[:, 0]
        moved = run.solver.native.step(_PerSampleStepField(run, i), x, h)
        return torch.where(counts > i, moved, x)

    def step_weights(self, run: _Run, times) -> list[Weights]:
        """The weights at a step's stage times (floats, or a tensor of them), built from the basis
        with the low-rank updates bind saw: what a checkpointed step computes, and recomputes."""
        base = functools.partial(_get, self.basis)
        weights = self._split(self._combine(self.coefficients(times), None, base))
        if run.low_rank:
            weights = self._with_low_rank(weights, times, run.low_rank)
        return weights

    def forward(self, *args, **kwargs) -> Tensor:
        x, run = self.bind(*args, **kwargs)
        captured = local.get(self, "capture")
        if captured is not None:
            captured.append(Call(args, kwargs, x, run))
            return x
        record = run.collected is not None and "hidden_states" in run.collected
        if record:
            _record_hidden(run.collected, x)
        if run.solver.native is None:
            x = self._integrate_torchdiffeq(x, run)
            if record:
                _record_hidden(run.collected, x)
            return x
        # odeify's own checkpoint_steps setting, where transformers' switch is off (the stepper
        # then checkpoints itself, through the function activation_checkpointing_enable gave it).
        own = self.checkpointing and not self.stepper.gradient_checkpointing
        recorded = local.get(self, "recording")
        # Under odeify.compile the stepper is one compiled region: it is given its step's inputs
        # (weights, gains as tensors) rather than i, so that no step and no step count retraces.
        # Per-sample grids are indexed by i: their steps run eagerly.
        region = self.stepper.compiled and run.per_sample is None
        stepper = self.stepper if region or not self.stepper.compiled else self._eager_stepper()
        for i in range(run.steps):
            # The run holds everything bind resolved for this call (scheme, steps, schedule,
            # weights, low-rank updates), so a step recomputed in backward, maybe in autograd's
            # own thread where this thread's odeify.steps() is not set, repeats this step.
            arg = run.inputs(i, region=True) if region else i
            if own:
                x = checkpoint(stepper, x, run, arg, use_reentrant=False)
            elif self.stepper.gradient_checkpointing and i % self.stepper.every:
                x = self.step(x, run, arg)  # every_n_layers: between checkpointed steps, kept
            else:
                x = stepper(x, run, arg)
            if recorded is not None:
                recorded.append(x)
            if record:
                _record_hidden(run.collected, x)
        return x

    def _eager_stepper(self):
        """The stepper's call without its compiled code: checkpointed as transformers' switch
        set it up (``_gradient_checkpointing_func``), or the plain step."""
        if self.checkpointing and self.stepper.gradient_checkpointing:
            return functools.partial(self.stepper._gradient_checkpointing_func, self.step)
        return self.step

    @property
    def time_scaled(self) -> bool:
        """Whether attention reads the stage time (GPT-2's ``scale_attn_by_inverse_layer_idx``)."""
        return bool(getattr(self.config, "scale_attn_by_inverse_layer_idx", False))

    @property
    def checkpointing(self) -> bool:
        """Whether a forward now checkpoints its steps: in training, with grad, and either
        transformers' ``activation_checkpointing_enable()`` or the ``checkpoint_steps`` setting."""
        switched = self.stepper.gradient_checkpointing or self.ode.checkpoint_steps
        return switched and self.training and torch.is_grad_enabled()

    def _integrate_torchdiffeq(self, x: Tensor, run: _Run) -> Tensor:
        solver = run.solver
        if run.cache is not None:
            # torchdiffeq evaluates at times it picks; there is no per-step KV slot to fill.
            _claim_cache(run.cache, (solver.name, None, None), 0, x.shape[1])
            run.cache = None
        if not solver.fixed_grid and x.dtype in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"the adaptive solver {solver.name!r} cannot run a {x.dtype} model: its step-size "
                "control underflows ('underflow in dt'); use model.float() or a fixed-grid scheme"
            )
        field = _TorchdiffeqField(self, run)
        t = torch.tensor([0.0, 1.0], dtype=torch.float32, device=x.device)
        kwargs = {"method": solver.method}
        if solver.fixed_grid:
            kwargs["options"] = {"step_size": 1.0 / run.steps}
        else:
            kwargs.update(rtol=self.ode.rtol, atol=self.ode.atol)
        if self.ode.adjoint:
            params = tuple(p for p in self.parameters() if p.requires_grad)
            return odeint_adjoint(field, x, t, adjoint_params=params, **kwargs)[-1]
        return odeint(field, x, t, **kwargs)[-1]

    def extra_repr(self) -> str:
        return (
            f"family={self.family.name}, L={self.ode.num_layers}, basis={self.ode.basis}, "
            f"K={self.ode.num_basis}, scheme={self.ode.scheme}, steps={self.ode.resolved_steps}"
        )


class _Step(GradientCheckpointingLayer):
    """One native solver step of the ODE block, as the layer transformers checkpoints.

    ``activation_checkpointing_enable()`` looks for ``GradientCheckpointingLayer`` modules and
    checkpoints their forward; the block's unit of recomputation is a step (checkpointing the
    whole integration would rebuild every step's activations at once in backward, saving
    nothing at the peak). It holds no state: the step's arguments are the hidden state, the
    call's run and the step index, all positional, as reentrant checkpointing needs.
    """

    def __init__(self):
        super().__init__()
        # Checkpoint every n-th step only: activation_checkpointing_enable(every_n_layers=n),
        # which counts this one layer, reaches it through the model's _set_gradient_checkpointing.
        self.every = 1
        self.compiled = False  # set by odeify.compile

    def forward(self, x: Tensor, run: _Run, i: int | _StepInputs) -> Tensor:
        return run.block.step(x, run, i)


class _Run:
    """What one forward call shares across its steps."""

    def __init__(
        self, block: ODEBlock, solver: Solver, steps: int, cache, mask, position_embeddings, extra
    ):
        self.block, self.solver, self.steps = block, solver, steps
        self.cache, self.mask = cache, mask
        self.position_embeddings, self.extra = position_embeddings, extra
        self.num_layers = block.ode.num_layers
        self.times: list[float] = []
        self.index: list[int] = []
        self.schedule: Schedule | None = None  # the grid of one step count for the batch
        self.weights: list[Weights] = []  # the grid's, or empty: each step builds its own
        self.low_rank: dict = {}  # the low-rank updates at bind, for steps that build weights
        self.per_sample: Tensor | None = None  # [B] step counts when samples have their own grids
        self.sample_times: Tensor | None = None  # [B, steps * stages] with per-sample counts
        self.sample_gains: Tensor | None = None  # [B, steps, gains per step]
        self.sample_schedules: list[Schedule] | None = None  # when some have a correction
        # Basis tensors with the low-rank update of this call (steps read them per sample and in
        # torchdiffeq, possibly again in backward, after the forward has emptied the slot).
        self.basis = block.adapted_basis()
        # What transformers' output_hidden_states / output_attentions asked to collect, if anything.
        self.collected = None if torch.compiler.is_compiling() else _active_collector.get()
        self.stages = solver.native.stages if solver.native is not None else 1
        self._gain_rows: Tensor | None = None  # [steps, gains per step], built by inputs()

    def inputs(self, i: int, *, region: bool) -> _StepInputs:
        """What step i reads of the run. ``region``: what a compiled step is given (see
        :func:`odeify.compile`), where each value it reads is a guard of its graph: so the
        gains come as tensors, the slots as the cache's layers, and stage times only where
        read (a step building its own weights, GPT-2's inverse-layer scaling)."""
        s = self.stages
        index = self.index[i * s : (i + 1) * s]
        times = [self.times[j] for j in index]
        weights = [self.weights[j] for j in index] if self.weights else None
        gains = self.schedule.step_gains(i)
        slots, caches = tuple(range(i * s, (i + 1) * s)), None
        if region:
            if self._gain_rows is None:
                p = next(iter(self.block.basis.parameters()))
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                rows = torch.as_tensor(self.schedule.gains, dtype=dtype)
                self._gain_rows = rows.to(p.device).view(self.steps, -1)
            row = self._gain_rows[i]
            gains = (row[0], row[1]) if row.numel() == 2 else row[0]
            cache = self.cache
            if hasattr(cache, "layers") and not getattr(cache, "offloading", False):
                caches = tuple(_SlotCache(cache, slot) for slot in slots)
            if cache is None or caches is not None:
                slots = (0,) * s
            if weights is None:
                times = torch.tensor(times, dtype=torch.float64)
            elif not self.block.time_scaled:
                times = [0.0] * s
        return _StepInputs(times, slots, weights, gains, self.schedule.step_correction(i), caches)

    def stage(self, t: float, slot: int, cache=None) -> Stage:
        return Stage(
            t,
            slot,
            self.cache if cache is None else cache,
            self.mask,
            self.position_embeddings,
            self.extra,
            self.block,
            self.num_layers,
            self.collected.get("attentions") if self.collected else None,
        )


@dataclass
class _StepInputs:
    """What one native step reads of its run, per stage of the step."""

    times: list[float] | Tensor
    slots: tuple[int, ...]  # KV-cache slots
    weights: list[Weights] | None  # None: the step builds its own (checkpointed steps)
    gains: tuple | float | Tensor
    correction: Tensor | None  # the schedule's T_i of the MLP update
    caches: tuple[_SlotCache, ...] | None = None  # the slots' cache layers (compiled steps)


class _SlotCache:
    """One slot of a KV cache, updated the way ``Cache.update`` updates it but without its index:
    what a compiled step is given, so that a slot is not a constant of its graph."""

    __slots__ = ("layer",)

    def __init__(self, cache, slot: int):
        layers = cache.layers
        while len(layers) <= slot:  # Cache.update grows a cache that replicates its layers
            layers.append(cache.layer_class_to_replicate())
        self.layer = layers[slot]

    def update(self, key: Tensor, value: Tensor, slot: int, *args, **kwargs):
        return self.layer.update(key, value, *args, **kwargs)


class _StepField:
    """The field and its two sub-updates at the stages of one native step."""

    __slots__ = ("run", "inputs", "num_layers", "weights")

    def __init__(self, run: _Run, inputs: _StepInputs, weights: list[Weights] | None = None):
        self.run, self.inputs, self.num_layers = run, inputs, run.num_layers
        self.weights = inputs.weights if weights is None else weights

    def _at(self, stage: int) -> tuple[Weights, Stage]:
        inputs = self.inputs
        cache = None if inputs.caches is None else inputs.caches[stage]
        return self.weights[stage], self.run.stage(inputs.times[stage], inputs.slots[stage], cache)

    def attention(self, x: Tensor, stage: int) -> Tensor:
        w, step = self._at(stage)
        return self.run.block.family.attention(x, w, step)

    def mlp(self, x: Tensor, stage: int) -> Tensor:
        w, step = self._at(stage)
        return self._corrected(self.run.block.family.mlp(x, w, step))

    def _corrected(self, update: Tensor) -> Tensor:
        # The schedule's linear correction of this step's MLP update, M T_i (row vectors).
        t = self.inputs.correction
        return update if t is None else update @ t.to(update.dtype)

    def __call__(self, x: Tensor, stage: int) -> Tensor:
        w, step = self._at(stage)
        family = self.run.block.family
        return (family.attention(x, w, step) + family.mlp(x, w, step)) * self.num_layers


class _PerSampleStepField(_StepField):
    """Each sample's stage time on the schedule of its step count; linear layers through
    time_linear."""

    __slots__ = ("i",)

    def __init__(self, run: _Run, i: int):
        self.run, self.i, self.num_layers = run, i, run.num_layers

    def _at(self, stage: int) -> tuple[PerSampleWeights, Stage]:
        run, block = self.run, self.run.block
        slot = self.i * run.stages + stage
        t = run.sample_times[:, slot].to(run.per_sample.device)
        w = PerSampleWeights(block.coefficients(t), run.basis, block.group)
        return w, run.stage(t, slot)

    def _corrected(self, update: Tensor) -> Tensor:
        # Each sample's own T_i; the identity past its last step (its state is kept there) and
        # for schedules without a correction.
        schedules = self.run.sample_schedules
        if schedules is None:
            return update
        eye = torch.eye(update.shape[-1], dtype=update.dtype, device=update.device)
        t = [
            eye if s.correction is None or self.i >= s.steps else s.correction[self.i]
            for s in schedules
        ]
        return torch.bmm(update, torch.stack(t).to(update.dtype))


class _TorchdiffeqField(nn.Module):
    """f(t, x) = L * (A + M) at any time, for torchdiffeq. A module so the adjoint finds parameters."""

    def __init__(self, block: ODEBlock, run: _Run):
        super().__init__()
        self.block, self.run = block, run

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        block = self.block
        grid = block._combine(block.coefficients(t), None, self.run.basis)
        w = Weights({name: value[0] for name, value in grid.items()})
        step = self.run.stage(float(t.detach()), 0)
        return (
            block.family.attention(x, w, step) + block.family.mlp(x, w, step)
        ) * self.run.num_layers


def _record_hidden(collected: dict, x: Tensor) -> None:
    """Append a state to transformers' output_hidden_states collection: the input, then the state
    after each step (so at N = L, exactly the original's per-layer hidden states)."""
    states, selection = collected["hidden_states"], collected.get("_hidden_states_layers")
    states.append(x if selection is None or len(states) in selection else None)


def _claim_cache(cache, grid: tuple, slots: int, new_tokens: int) -> None:
    """Check that a KV cache belongs to this grid, give it one slot per (step, stage), count tokens.

    A cache filled at N steps holds N slots of keys computed at those steps' times: it is
    meaningless at any other N or scheme, so reusing it is an error, never a silent mismatch.
    """
    state = getattr(cache, "_odeify", None)
    if state is None:
        if cache.get_seq_length() > 0:
            raise ValueError(
                "past_key_values already holds keys that odeify did not write (e.g. from the original "
                "model); pass past_key_values=None to start a new cache"
            )
        seen = 0
    else:
        (scheme, steps, schedule), seen = state
        if seen and steps is None:
            raise ValueError(
                f"scheme {scheme!r} is integrated by torchdiffeq, which keeps no KV cache: call "
                "generate(..., use_cache=False) or use a native fixed-grid scheme"
            )
        if seen and (scheme, steps) == grid[:2] and schedule != grid[2]:
            raise ValueError(
                f"this KV cache was filled under another schedule of {steps} steps of {scheme!r} "
                "(calibrated or uniform, see odeify.steps(..., schedule=)); its keys belong to "
                "that grid's times. Start a new cache (past_key_values=None) or restore it."
            )
        if seen and (scheme, steps) != grid[:2]:
            raise ValueError(
                f"this KV cache was filled at {steps} steps of {scheme!r} but the model now runs "
                f"{grid[1] or 'adaptive'} steps of {grid[0]!r}; a cache holds one slot per step and "
                "stage, so it is valid for one grid only. Start a new cache (past_key_values=None) or "
                "restore the steps."
            )
    layers = getattr(cache, "layers", None)
    if (
        layers is not None
        and getattr(cache, "layer_class_to_replicate", None) is None
        and len(layers) < slots
    ):
        if not layers:
            raise ValueError("past_key_values has no layers to replicate; pass a DynamicCache()")
        template = layers[0]
        layers.extend(copy.deepcopy(template) for _ in range(slots - len(layers)))
    cache._odeify = (grid, seen + new_tokens)
