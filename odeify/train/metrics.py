"""The ``metrics.jsonl`` of a run: one JSON object per line, and its trim when a run resumes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..atomic import write_text

# Events a finished run logs once at its end: a resumed run logs them again.
END_EVENTS = ("after", "final")


class Metrics:
    """Appends one JSON object per line to ``path`` (flushed each time), with wall-clock seconds.

    ``active=False`` (every rank of a distributed run but the first) logs nothing, so the
    recipe calls ``log`` on every rank alike.

    Example:
        >>> metrics = Metrics("runs/x/metrics.jsonl")
        >>> metrics.log(step=1, loss=2.5)
        >>> [{k: v for k, v in r.items() if k != "time"} for r in metrics.read()]
        [{'step': 1, 'loss': 2.5}]
        >>> Metrics("runs/y/metrics.jsonl", active=False).log(step=1)   # not rank 0
        >>> Path("runs/y").exists()
        False
    """

    def __init__(self, path: str | os.PathLike, active: bool = True):
        self.path, self.active = Path(path), active
        self.start = time.time()

    def log(self, **values) -> None:
        if not self.active:
            return
        record = {"time": round(time.time() - self.start, 3), **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)  # not before the first record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """Every record; a last line torn by a kill (half written, perhaps mid-character) is
        left out."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def resume(self, step: int) -> None:
        """Keep the records of the run up to checkpoint ``step``, the one a run resumes from:
        those of later steps (to be redone), end-of-run events and a torn last line go; with no
        checkpoint (``step`` 0) everything goes, the run starting over.

        Example:
            >>> metrics = Metrics("runs/x/metrics.jsonl")
            >>> for step in (50, 100, 150):
            ...     metrics.log(step=step)
            >>> metrics.log(event="final")
            >>> Metrics("runs/x/metrics.jsonl").resume(100)
            >>> [r.get("step") for r in metrics.read()]
            [50, 100]
        """
        if not self.active or not self.path.exists():
            return
        kept = [
            r
            for r in self.read()
            if step and r.get("step", 0) <= step and r.get("event") not in END_EVENTS
        ]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
