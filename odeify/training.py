"""What every training recipe shares: recipe configs from YAML, AdamW groups, warmup + cosine,
seeds, atomic checkpoints that resume exactly, and a metrics file.

A checkpoint holds the model, optimizer, scheduler, step, RNG states and the recipe config; since
batches are a pure function of (seed, step) (see :class:`odeify.data.Batches`), the step is the
data position, and a run killed at any point and resumed sees the batches an unbroken run sees.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

CHECKPOINT_PREFIX = "step-"


def load_config(cls, path: str | os.PathLike | None, overrides: dict[str, Any] | None = None):
    """Build a recipe's config dataclass from a YAML file plus overrides; unknown keys are errors.

    Example:
        >>> @dataclasses.dataclass
        ... class C:
        ...     lr: float = 1e-3
        >>> load_config(C, None, {"lr": 0.1}).lr
        0.1
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(
                f"{path} must hold a mapping of option: value, not {type(data).__name__}"
            )
    data.update(overrides or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"unknown config keys {unknown} in {path or 'overrides'}; known keys: {sorted(known)}"
        )
    for key, value in data.items():
        # YAML 1.1 reads 3e-4 (no dot) as a string and 1 as an int; a float field means a number.
        if known[key].type in (float, "float") and isinstance(value, (int, str)):
            if isinstance(value, bool):
                raise ValueError(f"config key {key!r} takes a number, got {value!r}")
            try:
                data[key] = float(value)
            except ValueError:
                raise ValueError(f"config key {key!r} takes a number, got {value!r}") from None
    return cls(**data)


def config_stamp(cfg, presentation: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config a run's checkpoints are stamped with, less the fields that only change how a
    run looks (progress bars, threads): resuming under any other config is refused.

    Example:
        >>> Checkpoints(out / "checkpoints", config_stamp(cfg, ("progress",)))   # doctest: +SKIP
    """
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in presentation}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def adamw(
    model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), no_decay=None
) -> torch.optim.AdamW:
    """AdamW that decays weight matrices only: not norms, biases, or parameters ``no_decay`` names.

    For an odeified model the basis tensor of a matrix is [K, out, in] and that of a norm or a
    bias is [K, d]: what counts is the shape of the parameter it represents.

    Example:
        >>> opt = adamw(nn.Linear(4, 4), lr=1e-3, weight_decay=0.1)
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.1, 0.0]
    """
    from .surgery import find_block

    # The block's own basis tensors, not what peft hangs under them (LoRA factors are matrices).
    block = find_block(model)
    basis_ids = set() if block is None else {id(block.basis_tensor(n)) for n in block.names}
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        represented = p.dim() - 1 if id(p) in basis_ids else p.dim()
        skip = represented < 2 or (no_decay is not None and no_decay(name))
        (keep if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def warmup_cosine(
    optimizer, warmup: int, total: int, min_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base learning rate, then cosine decay to ``min_ratio`` of it at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
        >>> ckpt = Checkpoints("runs/x", config={"lr": 1e-3})          # doctest: +SKIP
        >>> ckpt.save(100, model, optimizer, scheduler)               # doctest: +SKIP
        >>> step = ckpt.resume(model, optimizer, scheduler)           # doctest: +SKIP
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
            >>> Checkpoints("runs/x", config={"lr": 1e-3}).check()   # doctest: +SKIP
            100
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


class Metrics:
    """Appends one JSON object per line to ``path`` (flushed each time), with wall-clock seconds."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.time()

    def log(self, **values) -> None:
        record = {"time": round(time.time() - self.start, 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return (
            [json.loads(line) for line in self.path.read_text().splitlines()]
            if self.path.exists()
            else []
        )
