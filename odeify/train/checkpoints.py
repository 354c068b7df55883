"""Atomic checkpoints that resume exactly.

A checkpoint holds the model, optimizer, scheduler, step, RNG states and the recipe config; since
batches are a pure function of (seed, step) (see :class:`odeify.train.data.Batches`), the step is
the data position, and a run killed at any point and resumed sees the batches an unbroken run sees.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_file
from .config import LOCATION_FIELDS

CHECKPOINT_PREFIX = "step-"


# Version 2 holds only tensors and plain data (loads with weights_only=True); version 1 (no
# "format" key) also held NumPy's RNG state as an array, read through an allow-list.
FORMAT = 2
_MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # NumPy < 2
_OLD_FORMAT_GLOBALS = [_MULTIARRAY._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's contents, never unpickling anything but tensors and plain data; a file that
    cannot be read so is refused with a ValueError that says why."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (a save killed before it began writing?)")
    try:
        with torch.serialization.safe_globals(_OLD_FORMAT_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors and plain data, which odeify never "
            f"unpickles (crafted, or not written by odeify): {str(error).splitlines()[0]}"
        ) from None
    # A file of a few bytes fails in the pickle reader itself: IndexError (1 byte), struct.error.
    except (RuntimeError, EOFError, OSError, IndexError, struct.error) as error:
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or corrupt: {error})"
        ) from None
    if not isinstance(state, dict) or not {"step", "config", "model"} <= set(state):
        raise ValueError(f"{path} is not a checkpoint written by odeify's recipes")
    return state


class Checkpoints:
    """Checkpoints in ``folder``: written atomically (temporary file, then rename), the last
    ``keep`` kept, each stamped with the recipe config so a resume under another config is refused.

    Example:
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        >>> ckpt = Checkpoints("runs/x", config={"lr": 1e-3})
        >>> ckpt.save(100, model, optimizer, scheduler)
        PosixPath('runs/x/step-100.pt')
        >>> step, extra = ckpt.resume(model, optimizer, scheduler)
        >>> step, extra
        (100, {})
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        config: dict[str, Any],
        keep: int = 2,
        trainable_only: bool = False,
    ):
        self.folder, self.config, self.keep = Path(folder), config, keep
        # LoRA: the frozen base is rebuilt from its source on resume; saving it would make every
        # checkpoint the size of the whole model.
        self.trainable_only = trainable_only

    def _model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        if not self.trainable_only:
            return state
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in trainable}

    def paths(self) -> list[Path]:
        """The checkpoints in the folder, oldest first (files not named step-<int>.pt ignored)."""
        found = self.folder.glob(f"{CHECKPOINT_PREFIX}*.pt") if self.folder.exists() else []
        numbered = [p for p in found if p.stem[len(CHECKPOINT_PREFIX) :].isdigit()]
        return sorted(numbered, key=lambda p: int(p.stem[len(CHECKPOINT_PREFIX) :]))

    def save(
        self, step: int, model: nn.Module, optimizer, scheduler=None, extra: dict | None = None
    ) -> Path:
        path = self.folder / f"{CHECKPOINT_PREFIX}{step}.pt"
        state = {
            "format": FORMAT,
            "step": step,
            "config": self.config,
            "model": self._model_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": _rng_state(),
            "extra": extra or {},
        }
        with atomic_file(path, "wb") as f:
            torch.save(state, f)
        for old in self.paths()[: -self.keep]:
            old.unlink()
        return path

    def _check_config(self, path: Path, config: dict[str, Any]) -> None:
        # Where the run lives is no part of it: a moved or copied run folder resumes.
        config = {k: v for k, v in config.items() if k not in LOCATION_FIELDS}
        if config != self.config:
            differ = sorted(
                k for k in set(config) | set(self.config) if config.get(k) != self.config.get(k)
            )
            raise ValueError(
                f"{path} was written under another config (differs in {differ}); resume with "
                "the same config or start a new run folder"
            )

    def _newest(self, mmap: bool = False) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint and its contents; unreadable newer ones are skipped
        with a warning, and when none is readable the error says what each one was."""
        problems = []
        for path in reversed(self.paths()):
            try:
                state = _load(path, mmap)
            except ValueError as error:
                problems.append(str(error))
                continue
            if problems:
                warnings.warn(
                    f"resuming from {path.name}, the newest readable checkpoint: "
                    + "; ".join(problems),
                    stacklevel=3,
                )
            return path, state
        if problems:
            raise ValueError(
                f"no checkpoint in {self.folder} can be read: " + "; ".join(problems) + ". Start "
                "the run again (without --resume, or in another out_dir)"
            )
        return None

    def check(self) -> int:
        """The step of the newest readable checkpoint (0 when there is none), refusing one
        written under another config. The file is memory-mapped, not read, so a recipe can
        refuse a wrong run folder before any work.

        Example:
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
            >>> _ = Checkpoints("runs/x", config={"lr": 1e-3}).save(100, model, optimizer)
            >>> Checkpoints("runs/x", config={"lr": 1e-3}).check()
            100
            >>> Checkpoints("runs/x", config={"lr": 0.1}).check()
            Traceback (most recent call last):
            ValueError: runs/x/step-100.pt was written under another config (differs in ['lr']); ...
        """
        newest = self._newest(mmap=True)
        if newest is None:
            return 0
        path, state = newest
        self._check_config(path, state["config"])
        return state["step"]

    def resume(self, model: nn.Module, optimizer, scheduler=None) -> tuple[int, dict]:
        """Load the newest readable checkpoint; returns (step, extra), or (0, {}) when there is
        none."""
        newest = self._newest()
        if newest is None:
            return 0, {}
        path, state = newest
        self._check_config(path, state["config"])
        if self.trainable_only:
            expected = self._model_state(model).keys()
            if state["model"].keys() != expected:
                raise ValueError(
                    f"{path} holds other trainable tensors than this model "
                    f"({sorted(set(state['model']) ^ set(expected))[:4]} differ)"
                )
            model.load_state_dict(state["model"], strict=False)
        else:
            model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        return state["step"], state["extra"]


def finished(checkpoints: Checkpoints, summary: str | os.PathLike, resume: bool) -> dict | None:
    """On ``resume``, the summary of a run that already finished (``summary``, the file a run
    writes last, exists; its checkpoints' config is checked), so the recipe returns it instead
    of redoing the end of the run; otherwise None.

    Example:
        >>> out, stamp = Path("runs/x"), {"lr": 1e-3}
        >>> print(finished(Checkpoints(out / "checkpoints", stamp), out / "summary.json", True))
        None
        >>> out.mkdir(parents=True)
        >>> _ = (out / "summary.json").write_text('{"loss": 2.5}')   # the run's last write
        >>> finished(Checkpoints(out / "checkpoints", stamp), out / "summary.json", True)
        {'loss': 2.5}
        >>> print(finished(Checkpoints(out / "checkpoints", stamp), out / "summary.json", False))
        None
    """
    summary = Path(summary)
    if not resume or not summary.exists():
        return None
    checkpoints.check()
    print(f"{summary.parent} holds a finished run: nothing to resume ({summary})", file=sys.stderr)
    return json.loads(summary.read_text())


def claim(checkpoints: Checkpoints, metrics: str | os.PathLike, resume: bool) -> int:
    """The step a run in ``checkpoints.folder`` starts at, before any work: 0 for a new run,
    refusing a folder that holds a run unless ``resume``, and checkpoints of another config.

    Example:
        >>> out, stamp = Path("runs/x"), {"lr": 1e-3}
        >>> claim(Checkpoints(out / "checkpoints", stamp), out / "metrics.jsonl", resume=False)
        0
        >>> optimizer = torch.optim.SGD(model.parameters())
        >>> _ = Checkpoints(out / "checkpoints", stamp).save(5, model, optimizer)
        >>> claim(Checkpoints(out / "checkpoints", stamp), out / "metrics.jsonl", resume=True)
        5
    """
    if not resume and (checkpoints.paths() or Path(metrics).exists()):
        raise FileExistsError(
            f"{Path(metrics).parent} already holds a run; pass --resume to continue it or choose "
            "another out_dir"
        )
    return checkpoints.check()
