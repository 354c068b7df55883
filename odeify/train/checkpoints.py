"""Atomic checkpoints that resume exactly.

A checkpoint holds the model, optimizer, scheduler, step, RNG states and the recipe config; since
batches are a pure function of (seed, step) (see :class:`odeify.train.data.Batches`), the step is
the data position, and a run killed at any point and resumed sees the batches an unbroken run sees.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_PREFIX = "step-"


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        found = self.folder.glob(f"{CHECKPOINT_PREFIX}*.pt") if self.folder.exists() else []
        return sorted(found, key=lambda p: int(p.stem[len(CHECKPOINT_PREFIX) :]))

    def save(
        self, step: int, model: nn.Module, optimizer, scheduler=None, extra: dict | None = None
    ) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{CHECKPOINT_PREFIX}{step}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(
            {
                "step": step,
                "config": self.config,
                "model": self._model_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "rng": _rng_state(),
                "extra": extra or {},
            },
            tmp,
        )
        os.replace(tmp, path)
        for old in self.paths()[: -self.keep]:
            old.unlink()
        return path

    def _check_config(self, path: Path, config: dict[str, Any]) -> None:
        if config != self.config:
            differ = sorted(
                k for k in set(config) | set(self.config) if config.get(k) != self.config.get(k)
            )
            raise ValueError(
                f"{path} was written under another config (differs in {differ}); resume with "
                "the same config or start a new run folder"
            )

    def check(self) -> int:
        """The step of the newest checkpoint (0 when there is none), refusing one written under
        another config. The file is memory-mapped, not read, so a recipe can refuse a wrong run
        folder before any work.

        Example:
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
            >>> _ = Checkpoints("runs/x", config={"lr": 1e-3}).save(100, model, optimizer)
            >>> Checkpoints("runs/x", config={"lr": 1e-3}).check()
            100
            >>> Checkpoints("runs/x", config={"lr": 0.1}).check()
            Traceback (most recent call last):
            ValueError: runs/x/step-100.pt was written under another config (differs in ['lr']); ...
        """
        paths = self.paths()
        if not paths:
            return 0
        state = torch.load(paths[-1], map_location="cpu", weights_only=False, mmap=True)
        self._check_config(paths[-1], state["config"])
        return state["step"]

    def resume(self, model: nn.Module, optimizer, scheduler=None) -> tuple[int, dict]:
        """Load the newest checkpoint; returns (step, extra), or (0, {}) when there is none."""
        paths = self.paths()
        if not paths:
            return 0, {}
        state = torch.load(paths[-1], map_location="cpu", weights_only=False)
        self._check_config(paths[-1], state["config"])
        if self.trainable_only:
            expected = self._model_state(model).keys()
            if state["model"].keys() != expected:
                raise ValueError(
                    f"{paths[-1]} holds other trainable tensors than this model "
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
