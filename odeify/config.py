"""The ODE settings of an odeified model: their schema (:class:`ODEConfig`) and the typed view
(:class:`ODESettings`) through which the one copy, the dict ``config.odeify`` that
``save_pretrained`` writes into config.json, is read and changed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from . import local
from .schedule import CHOICES, Schedule, correction_size
from .schemes import check_sample_steps, check_steps, resolve_solver, spans

# Bumped whenever the saved layout changes; `from_pretrained` refuses other versions.
FORMAT_VERSION = 1


@dataclass
class ODEConfig:
    """How the continuous-depth block is parametrised and integrated.

    Stored under the key ``"odeify"`` of the Hugging Face config, so ``model.save_pretrained``
    records it and :func:`odeify.from_pretrained` rebuilds the block from it.

    Example:
        >>> cfg = ODEConfig(family="gpt2", num_layers=12, steps=6)
        >>> cfg.resolved_steps
        6
    """

    family: str = field(metadata={"help": "Adapter name of the model family ('gpt2', 'llama')."})
    num_layers: int = field(
        metadata={
            "help": "L, the depth of the original stack. The field is L * F(x; W(t)) on [0, 1]."
        }
    )
    basis: str = field(
        default="hat",
        metadata={
            "help": "Time basis: 'hat', 'chebyshev', 'legendre' (fixed) or 'fourier' (learned)."
        },
    )
    num_basis: int | None = field(
        default=None,
        metadata={
            "help": "K, basis tensors per parameter. None: L (exact fit) or E + 1 for 'fourier'."
        },
    )
    basis_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Extra options of the time basis, e.g. {'features': 128} for 'fourier'."},
    )
    scheme: str = field(
        default="sequential",
        metadata={"help": "Integrator: a native fixed-grid scheme or any torchdiffeq method name."},
    )
    steps: int | None = field(
        default=None, metadata={"help": "Solver steps N on the fixed grid t_i = i / N. None: L."}
    )
    discrete_ends: int = field(
        default=0,
        metadata={
            "help": "d, layers kept discrete at each end: the first and last d steps are always "
            "the first and last d layers (one layer long, at the layer times) and the other N - 2d "
            "steps share the middle evenly; N must exceed 2d. Native schemes, one grid per batch."
        },
    )
    schedule: str = field(
        default="calibrated",
        metadata={
            "help": "Which grid a step count N runs: 'calibrated' (the schedule of N in "
            "`schedules` when there is one, else uniform) or 'uniform' (t_i = i / N, gains L / N)."
        },
    )
    schedules: dict[str, dict] = field(
        default_factory=dict,
        metadata={
            "help": "Calibrated step schedules by step count ({'15': Schedule.to_dict()}), "
            "written by odeify.calibrate: step start times, one gain per stage update and, with "
            "a linear correction, its description (the matrices are the block's `corrections`)."
        },
    )
    rtol: float = field(default=1e-3, metadata={"help": "Relative tolerance of adaptive solvers."})
    atol: float = field(default=1e-4, metadata={"help": "Absolute tolerance of adaptive solvers."})
    adjoint: bool = field(
        default=False,
        metadata={"help": "Backpropagate through torchdiffeq's adjoint (adaptive only)."},
    )
    cache_weights: bool = field(
        default=True,
        metadata={
            "help": "Outside training, keep W(t) of the current grid until parameters change."
        },
    )
    checkpoint_steps: bool = field(
        default=False, metadata={"help": "Recompute each solver step in backward (saves memory)."}
    )
    version: int = field(default=FORMAT_VERSION, metadata={"help": "Saved-format version."})

    def __post_init__(self) -> None:
        d = self.discrete_ends
        if isinstance(d, bool) or not isinstance(d, int) or d < 0 or 2 * d >= self.num_layers:
            raise ValueError(
                f"discrete_ends must be an integer d >= 0 with 2d < L = {self.num_layers} "
                f"(d layers kept at each end, a middle left to integrate), got {d!r}"
            )
        if self.schedule not in CHOICES:
            raise ValueError(f"schedule must be one of {CHOICES}, got {self.schedule!r}")
        for steps, data in self.schedules.items():
            # A correction's matrices are tensors of the model, not of this dict: here only
            # its description is checked (the block checks the matrices against it).
            plain = {k: v for k, v in data.items() if k != "correction"}
            correction_size(data.get("correction"))
            schedule = Schedule.from_dict(plain)
            schedule.check_layers(self.num_layers)
            if str(schedule.steps) != steps:
                raise ValueError(
                    f"the schedule saved under steps {steps!r} has {schedule.steps} steps"
                )

    @property
    def resolved_steps(self) -> int:
        return self.num_layers if self.steps is None else self.steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ODEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown odeify settings {unknown}: this checkpoint was written by another version "
                f"of odeify (this one reads format version {FORMAT_VERSION})"
            )
        return cls(**data)


class ODESettings:
    """The ODE settings of one odeified model: a typed, validated view of ``config.odeify``.

    The dict under ``"odeify"`` in the model's Hugging Face config is the one copy of the
    settings (``save_pretrained`` writes it, :func:`odeify.from_pretrained` reads it). This view
    reads the fields of :class:`ODEConfig` from it as attributes, and every change, attribute
    assignment included, goes through :meth:`update`, which validates before it writes. The ODE
    block's ``ode`` is such a view of its parent's config. Inside :meth:`local` (what
    ``with odeify.steps(...)`` enters) the calling thread reads its own changes over the saved
    ones; other threads and the saved dict never see them.

    Example:
        >>> from transformers import GPT2Config
        >>> config = GPT2Config()
        >>> config.odeify = ODEConfig(family="gpt2", num_layers=12).to_dict()
        >>> settings = ODESettings(config)
        >>> settings.update(steps=6, scheme="rk4")
        >>> settings.resolved_steps, config.odeify["scheme"]
        (6, 'rk4')
    """

    def __init__(self, config) -> None:
        object.__setattr__(self, "_config", config)

    def __setattr__(self, name: str, value: Any) -> None:
        self.update(**{name: value})

    def _data(self) -> dict[str, Any]:
        saved = self._config.odeify
        changes = local.get(self._config, "settings")
        return saved if changes is None else {**saved, **changes}

    def _checked(self, data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
        """Changes validated against ``data``: a scheme must resolve, a step count must be an
        integer grid the discrete ends fit in (or per-sample counts, a 1-D integer tensor)."""
        changes = dict(changes)
        if "scheme" in changes:
            resolve_solver(changes["scheme"])
        steps = changes.get("steps")
        if isinstance(steps, (Tensor, list, tuple)):
            changes["steps"] = check_sample_steps(steps)
        elif steps is not None:
            merged = {**data, **changes}
            spans(check_steps(steps), merged["num_layers"], merged["discrete_ends"])
        ODEConfig.from_dict({**data, **changes})  # known fields, and the dataclass's own checks
        return changes

    def update(self, **changes: Any) -> None:
        """Validate changes of fields and write them into the saved settings."""
        self._config.odeify.update(self._checked(self._config.odeify, changes))

    @contextlib.contextmanager
    def local(self, **changes: Any) -> Iterator[ODESettings]:
        """Validated changes that hold for the calling thread until the ``with`` block ends;
        nested blocks stack, and the saved settings are never touched.

        Example:
            >>> from transformers import GPT2Config
            >>> config = GPT2Config()
            >>> config.odeify = ODEConfig(family="gpt2", num_layers=12).to_dict()
            >>> settings = ODESettings(config)
            >>> with settings.local(steps=6):
            ...     settings.resolved_steps, config.odeify["steps"]
            (6, None)
            >>> settings.resolved_steps
            12
        """
        before = local.get(self._config, "settings") or {}
        changes = self._checked(self._data(), changes)
        with local.holding(self._config, "settings", {**before, **changes}):
            yield self

    @property
    def resolved_steps(self) -> int:
        steps = self._data()["steps"]
        return self._data()["num_layers"] if steps is None else steps

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (ODESettings, ODEConfig)):
            return self.to_dict() == other.to_dict()
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"ODESettings({self._data()!r})"


def _field(name: str, doc: str) -> property:
    return property(lambda self: self._data()[name], doc=doc)


for _f in dataclasses.fields(ODEConfig):
    setattr(ODESettings, _f.name, _field(_f.name, _f.metadata.get("help", "")))
del _f
