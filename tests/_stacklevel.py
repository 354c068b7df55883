"""Where a warning points: checks of ``stacklevel`` that hold however the warning function is reached."""

import sys
import warnings


def record_callers(monkeypatch, up: int) -> list[tuple[str, int]]:
    """Patch ``warnings.warn`` to record, for each warning, the file and line ``up`` frames above
    it (1: the function that warns, 2: its caller, ...), the place its ``stacklevel`` should name.

    Found by walking up from the warning call itself, so the check also holds when the function
    is reached through a wrapper (mutmut's trampolines add a frame to both sides).

    Example:
        >>> import pytest
        >>> mp = pytest.MonkeyPatch()
        >>> callers = record_callers(mp, 1)
        >>> with warnings.catch_warnings(record=True):
        ...     warnings.simplefilter("always")
        ...     warnings.warn("x")
        >>> len(callers)
        1
        >>> mp.undo()
    """
    real, callers = warnings.warn, []

    def warn(*args, stacklevel=1, **kwargs):
        caller = sys._getframe(up)
        callers.append((caller.f_code.co_filename, caller.f_lineno))
        real(*args, stacklevel=stacklevel + 1, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)
    return callers
