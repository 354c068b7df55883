"""Step schedules: where each of N native solver steps starts in depth time and how much each
stage update is scaled.

A :class:`Schedule` for N steps holds the start time t_i of every step (strictly increasing, in
[0, 1); step i ends where step i + 1 starts, the last at 1) and its gains: for ``sequential``
one per sub-update (attention, then MLP, of every step: 2N), for the parallel native schemes
one step size per step (N). The uniform schedule (t_i = i / N, gains L / N) is what
``odeify.steps`` has always run; discrete ends are a schedule too (the first and last d steps
one layer long at the layer times, gain 1, the middle sharing the rest), and calibrated
schedules (:func:`odeify.calibrate`) are stored in the model's ODE settings, one per N.

A ``sequential`` schedule may also carry a linear correction (ReplaceMe-style): one d x d matrix
T_i per step, applied to the step's MLP update, y = h + g M(h) T_i (row vectors), so a step that
stands in for several layers can add what the skipped ones would have. The matrices are tensors:
the saved dict holds only their description (``{"kind": "linear", "hidden_size": d}``) and the
model keeps them with its weights (the ODE block's ``corrections`` buffers, in the safetensors).

Times and gains are floats, or tensors while :func:`odeify.calibrate` learns them (the weights
of the grid and the updates then stay in the autograd graph).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .schemes import layer_bounds, resolve_solver, spans

UNIFORM = "uniform"
CALIBRATED = "calibrated"
CHOICES = (CALIBRATED, UNIFORM)
LINEAR = "linear"  # the one kind of correction: a d x d matrix per step


def _floats(values) -> list[float]:
    if isinstance(values, Tensor):
        return [float(v) for v in values.detach().reshape(-1).tolist()]
    return [float(v) for v in values]


@dataclass(frozen=True, eq=False)
class Schedule:
    """The grid of N native solver steps: step start times and stage gains.

    Args:
        times: t_0 < ... < t_{N-1} in [0, 1), the start of each step (a float list or a
            tensor), in units of 1 / ``unit``.
        gains: 2N scales of the attention and MLP updates (``sequential``: step i's are
            ``gains[2i]``, ``gains[2i + 1]``) or N step sizes (parallel native schemes).
        num_layers: L of the model the schedule was made for.
        scheme: the native scheme it is for.
        name: what made it ('uniform', 'discrete_ends', 'calibrated', ...), for messages.
        unit: the unit of ``times`` (1: they are the times). The uniform grid gives step
            numbers i in units of N, so a stage time is the one quotient (i + c) / N.
        correction: None, or [N, d, d]: step i's MLP update (after its gain) is multiplied on
            the right by ``correction[i]`` (``sequential`` only; see the module docstring).

    Example:
        >>> s = Schedule.uniform(3, num_layers=6)
        >>> s.starts, s.gains
        ([0.0, 0.3333333333333333, 0.6666666666666666], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0])
        >>> Schedule.from_dict(s.to_dict()).key == s.key
        True
    """

    times: Sequence[float] | Tensor
    gains: Sequence[float] | Tensor
    num_layers: int
    scheme: str = "sequential"
    name: str = CALIBRATED
    unit: float = 1.0
    correction: Tensor | None = None

    def __post_init__(self) -> None:
        solver = resolve_solver(self.scheme)
        if solver.native is None:
            raise ValueError(
                f"a schedule is a grid of native steps; {self.scheme!r} is not a native scheme"
            )
        if not (isinstance(self.unit, (int, float)) and self.unit > 0):
            raise ValueError(f"a schedule's unit must be a number > 0, got {self.unit!r}")
        times, gains = [t / self.unit for t in _floats(self.times)], _floats(self.gains)
        if not times:
            raise ValueError("a schedule needs at least one step")
        if any(not math.isfinite(t) or t < 0.0 or t >= 1.0 for t in times):
            raise ValueError(f"schedule times must lie in [0, 1), got {times}")
        if any(b <= a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"schedule times must be strictly increasing, got {times}")
        expected = self.gains_per_step * len(times)
        if len(gains) != expected:
            raise ValueError(
                f"a {self.scheme!r} schedule of {len(times)} steps needs {expected} gains "
                f"({self.gains_per_step} per step), got {len(gains)}"
            )
        if any(not math.isfinite(g) for g in gains):
            raise ValueError(f"schedule gains must be finite, got {gains}")
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int):
            raise ValueError(f"num_layers must be an integer, got {self.num_layers!r}")
        if self.correction is not None:
            self._check_correction(len(times))

    def _check_correction(self, steps: int) -> None:
        c = self.correction
        if not _is_sequential(self.scheme):
            raise ValueError(
                f"a linear correction multiplies the MLP update of a 'sequential' step; the "
                f"{self.scheme!r} scheme has no separate MLP update to correct"
            )
        if not isinstance(c, Tensor) or c.dim() != 3 or c.shape[0] != steps:
            shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(
                f"a schedule of {steps} steps takes a correction of shape [{steps}, d, d] (one "
                f"d x d matrix per step), got {shape}"
            )
        if c.shape[1] != c.shape[2] or not c.dtype.is_floating_point:
            raise ValueError(
                f"correction matrices are square and floating point, got {tuple(c.shape)} {c.dtype}"
            )
        # Checked through the sum (a NaN or inf anywhere makes it non-finite): this runs at every
        # forward of a corrected schedule, and isfinite(c).all() cost 17 ms at N = 20, d = 576.
        if not bool(torch.isfinite(c.detach().sum())):
            raise ValueError("the correction matrices must be finite")

    @property
    def hidden_size(self) -> int | None:
        """d of the correction matrices (None without a correction)."""
        return None if self.correction is None else int(self.correction.shape[-1])

    def check_hidden_size(self, hidden_size: int) -> None:
        """Refuse a correction made for a model of another width."""
        if self.correction is not None and self.hidden_size != hidden_size:
            raise ValueError(
                f"this schedule's correction is for hidden size {self.hidden_size}; the model "
                f"has {hidden_size}. Calibrate it again for this model (odeify.calibrate)"
            )

    # ------------------------------------------------------------------------------ builders
    @classmethod
    def uniform(cls, steps: int, num_layers: int, scheme: str = "sequential") -> Schedule:
        """t_i = i / N and every update scaled by L / N (step size 1 / N): today's grid, exactly.

        Example:
            >>> Schedule.uniform(2, 4, scheme="heun").gains
            [0.5, 0.5]
        """
        h = 1.0 / steps
        per_step = [h * num_layers] * 2 if _is_sequential(scheme) else [h]
        return cls(
            [float(i) for i in range(steps)], per_step * steps, num_layers, scheme, UNIFORM, steps
        )

    @classmethod
    def discrete_ends(
        cls, steps: int, num_layers: int, ends: int, scheme: str = "sequential"
    ) -> Schedule:
        """The first and last ``ends`` steps one layer long at the layer times (gain 1), the
        middle N - 2d steps sharing the other L - 2d layers evenly (see
        :func:`odeify.schemes.layer_bounds`).

        Example:
            >>> s = Schedule.discrete_ends(4, 6, ends=1)
            >>> s.times, s.unit, s.gains[::2]
            ([0.0, 1.0, 3.0, 5.0], 6, [1.0, 2.0, 2.0, 1.0])
        """
        bounds = layer_bounds(steps, num_layers, ends)
        sizes = [s / num_layers for s in spans(steps, num_layers, ends)]
        sequential = _is_sequential(scheme)
        gains = [g for h in sizes for g in ([h * num_layers] * 2 if sequential else [h])]
        return cls(bounds[:-1], gains, num_layers, scheme, "discrete_ends", num_layers)

    @classmethod
    def from_layers(
        cls, layers: Sequence[int], num_layers: int, gains: Sequence[float] | None = None
    ) -> Schedule:
        """A ``sequential`` schedule that visits the given layers of the original (times l / L),
        each update scaled by 1 (the kept layers of a pruned model) unless ``gains`` says.

        Example:
            >>> Schedule.from_layers([0, 2, 5], 6).starts
            [0.0, 0.3333333333333333, 0.8333333333333334]
        """
        gains = [1.0] * (2 * len(layers)) if gains is None else gains
        return cls([layer / num_layers for layer in layers], gains, num_layers, "sequential")

    # ------------------------------------------------------------------------------ the grid
    @property
    def steps(self) -> int:
        return len(self.times)

    @property
    def starts(self) -> list[float]:
        """The start time t_i of every step, as floats."""
        return [t / self.unit for t in _floats(self.times)]

    @property
    def gains_per_step(self) -> int:
        return 2 if _is_sequential(self.scheme) else 1

    @property
    def key(self) -> tuple:
        """What identifies the grid for the weight and KV caches (times and gains as floats,
        and a fingerprint of the correction: keys written under one correction are not those
        of another)."""
        key = (self.scheme, tuple(self.starts), tuple(_floats(self.gains)))
        if self.correction is None:
            return key
        # A strided sample of the matrices, not all of them: the key is taken at every forward
        # with a KV cache (decode steps), and summing N d^2 values cost 38 ms at N = 20, d = 576.
        flat = self.correction.detach().reshape(-1)
        c = flat[:: max(1, flat.numel() // 4096)].double()
        return (*key, (LINEAR, tuple(self.correction.shape), float(c.sum()), float((c * c).sum())))

    def step_correction(self, i: int) -> Tensor | None:
        """Step i's correction matrix T_i [d, d], or None."""
        return None if self.correction is None else self.correction[i]

    def stage_times(self, offsets: Sequence[float]) -> tuple[list, list[int]]:
        """The distinct stage times of the grid and, for each (step, stage), its index.

        A stage at fraction c of step i is at (p_i + c (p_{i+1} - p_i)) / unit, the p the
        ``times`` and p_N = unit (t = 1). With tensor times the result is one tensor of all
        stage times in order (one index per time).

        Example:
            >>> Schedule.uniform(2, 4, scheme="heun").stage_times((0.0, 1.0))
            ([0.0, 0.5, 1.0], [0, 1, 1, 2])
        """
        if isinstance(self.times, Tensor):
            p = self.times / self.unit
            ends = torch.cat([p[1:], p.new_ones(1)])
            flat = [a + c * (b - a) for a, b in zip(p, ends, strict=True) for c in offsets]
            return torch.stack(flat), list(range(len(flat)))
        bounds = [*self.times, self.unit]
        flat = [
            (bounds[i] + c * (bounds[i + 1] - bounds[i])) / self.unit
            for i in range(self.steps)
            for c in offsets
        ]
        times = sorted(set(flat))
        where = {t: j for j, t in enumerate(times)}
        return times, [where[t] for t in flat]

    def step_gains(self, i: int):
        """Step i's gains: (attention, MLP) for ``sequential``, else its step size."""
        if self.gains_per_step == 2:
            return self.gains[2 * i], self.gains[2 * i + 1]
        return self.gains[i]

    def check_layers(self, num_layers: int) -> None:
        """Refuse a schedule made for a model of another depth."""
        if self.num_layers != num_layers:
            raise ValueError(
                f"this schedule was made for a model of {self.num_layers} layers; the model has "
                f"{num_layers}. Calibrate it again for this model (odeify.calibrate)"
            )

    # ----------------------------------------------------------------------------- saving
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: times (as times, unit 1), gains, num_layers, scheme, name, and with a
        correction its description (the matrices themselves are saved as tensors)."""
        data = {
            "times": self.starts,
            "gains": _floats(self.gains),
            "num_layers": self.num_layers,
            "scheme": self.scheme,
            "name": self.name,
        }
        if self.correction is not None:
            data["correction"] = {"kind": LINEAR, "hidden_size": self.hidden_size}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], correction: Tensor | None = None) -> Schedule:
        """The schedule of :meth:`to_dict` (validated); a dict that describes a correction
        needs its matrices, ``correction`` [N, d, d] (the model keeps them, see
        ``ODEBlock.schedule_for``), and a plain one refuses them.

        Example:
            >>> s = Schedule.from_layers([0, 2], 4)
            >>> c = torch.eye(3).expand(2, 3, 3)
            >>> fixed = Schedule(s.times, s.gains, 4, correction=c)
            >>> Schedule.from_dict(fixed.to_dict(), correction=c).hidden_size
            3
        """
        if not isinstance(data, dict):
            raise ValueError(f"a saved schedule is a dict, got {type(data).__name__}")
        known = {"times", "gains", "num_layers", "scheme", "name", "correction"}
        if set(data) - known or not {"times", "gains", "num_layers"} <= set(data):
            raise ValueError(
                f"a saved schedule has the keys {sorted(known)} (scheme, name and correction "
                f"optional), got {sorted(data)}"
            )
        data = dict(data)
        described = correction_size(data.pop("correction", None))
        if described is None and correction is not None:
            raise ValueError("this saved schedule has no correction; none can be attached to it")
        if described is not None:
            if correction is None:
                raise ValueError(
                    "this saved schedule has a linear correction, whose matrices are saved with "
                    "the model's tensors: load the model (ODEBlock.schedule_for reads it)"
                )
            schedule = cls(**data, correction=correction)
            schedule.check_hidden_size(described)
            return schedule
        return cls(**data)

    def __repr__(self) -> str:
        times = ", ".join(f"{t:.3f}" for t in self.starts)
        return f"Schedule({self.name}, N={self.steps}, L={self.num_layers}, times=[{times}])"


def correction_size(data: Any) -> int | None:
    """The hidden size d a saved schedule's ``correction`` entry describes (None: no entry);
    anything but ``{"kind": "linear", "hidden_size": d}`` is refused.

    Example:
        >>> correction_size({"kind": "linear", "hidden_size": 576}), correction_size(None)
        (576, None)
    """
    if data is None:
        return None
    size = data.get("hidden_size") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or set(data) != {"kind", "hidden_size"}
        or data["kind"] != LINEAR
        or isinstance(size, bool)
        or not isinstance(size, int)
        or size < 1
    ):
        raise ValueError(
            f'a saved correction is {{"kind": "{LINEAR}", "hidden_size": d}} with d >= 1, got '
            f"{data!r}"
        )
    return size


def _is_sequential(scheme: str) -> bool:
    native = resolve_solver(scheme).native
    return native is not None and native.name == "sequential"
