"""State that holds for the calling thread only: what a ``with`` block or a forward sets.

A server runs requests on one model from several threads, each at its own depth and scheme. What
``with odeify.steps(...)``, ``block.recording()``, ``block.capture()`` or a live LoRA adapter
sets must reach the forwards of that thread and no other; kept on the model, it would leak into
the other requests. It lives here instead, in one ``threading.local`` keyed by the object it
belongs to: models stay picklable and deep-copyable (a copy starts with nothing set), and
torch.compile traces a thread-local's attributes under guards, where it cannot trace a
``contextvars.ContextVar``. The price: asyncio tasks that share a thread share these values, so
async code passes ``ode_steps=`` per call rather than holding ``odeify.steps`` across an await.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

_LOCAL = threading.local()
_EMPTY: dict = {}


def get(owner: object, kind: str, default: Any = None) -> Any:
    """What this thread set for ``owner`` under ``kind`` (``default`` when nothing is set).

    Example:
        >>> owner = object()
        >>> with holding(owner, "steps", 3):
        ...     get(owner, "steps")
        3
        >>> get(owner, "steps", "unset")
        'unset'
    """
    entry = getattr(_LOCAL, "state", _EMPTY).get((id(owner), kind))
    # The owner is stored with its value: an id reused by a new object finds nothing.
    return default if entry is None or entry[0] is not owner else entry[1]


def put(owner: object, kind: str, value: Any) -> None:
    """Set ``value`` for ``owner`` under ``kind`` in this thread (``None`` removes it)."""
    # Replaced, never mutated: a value read before the change stays what it was.
    state = dict(getattr(_LOCAL, "state", _EMPTY))
    if value is None:
        state.pop((id(owner), kind), None)
    else:
        state[(id(owner), kind)] = (owner, value)
    _LOCAL.state = state


@contextlib.contextmanager
def holding(owner: object, kind: str, value: Any) -> Iterator[Any]:
    """``put`` for the duration of a ``with`` block, then restore what was there (nesting works)."""
    before = get(owner, kind)
    put(owner, kind, value)
    try:
        yield value
    finally:
        put(owner, kind, before)
