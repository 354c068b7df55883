"""The start every recipe shares: its processes, the claim on its run folder, its metrics log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import Checkpoints, claim
from .distributed import Dist, setup_distributed
from .metrics import Metrics


@dataclass
class Run:
    """What :func:`open_run` set up: the processes, the metrics log, the step the run starts at."""

    ctx: Dist
    metrics: Metrics
    start: int


def open_run(
    out: Path, checkpoints: Checkpoints, resume: bool, check: Callable[[int], None]
) -> Run:
    """Join the processes (torchrun's, or this one alone), check the config against their number
    (``check(world)``), claim the run folder (refused if it holds a run and ``resume`` is off)
    and, on resume, trim the metrics back to the checkpoint the run goes on from.

    Example:
        >>> out = Path("runs/x")
        >>> run = open_run(out, Checkpoints(out / "checkpoints", {"lr": 1e-3}), False, lambda w: None)
        >>> run.start, run.ctx.world, run.metrics.path.name
        (0, 1, 'metrics.jsonl')
    """
    ctx = setup_distributed()
    check(ctx.world)
    metrics = Metrics(out / "metrics.jsonl", active=ctx.main)
    start = claim(checkpoints, metrics.path, resume)
    if resume:
        # Records past the checkpoint are redone by this run (with no checkpoint: all of them).
        metrics.resume(start)
    return Run(ctx, metrics, start)
