"""The transformers releases odeify is tested with, checked before a model is converted or loaded.

odeify runs the parent model's own layer code paths (attention interfaces, the KV cache, the
layer call's keywords), which change between transformers minor releases; a release outside the
tested range may compute something else silently, so it is refused with a clear error.
"""

from __future__ import annotations

import os

import transformers
from packaging.version import Version

# [lowest, highest] tested: the development setup's version, and CI's second transformers run.
TESTED_TRANSFORMERS = ("5.17.0", "5.24.0")
_OVERRIDE = "ODEIFY_UNTESTED_TRANSFORMERS"


def check_transformers(version: str | None = None) -> None:
    """Raise if the installed transformers (or ``version``) is outside the tested range, unless
    the environment variable ODEIFY_UNTESTED_TRANSFORMERS=1 asks to try it anyway.

    Example:
        >>> check_transformers("5.23.0")
        >>> check_transformers("4.57.0")
        Traceback (most recent call last):
        ...
        RuntimeError: odeify is tested with transformers 5.17.0 to 5.24.x, not 4.57.0: ...
    """
    found = Version(version or transformers.__version__)
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    inside = low <= found and (found.major, found.minor) <= (high.major, high.minor)
    if inside or os.environ.get(_OVERRIDE) == "1":
        return
    raise RuntimeError(
        f"odeify is tested with transformers {low} to {high.major}.{high.minor}.x, not {found}: "
        f"install one of those (pip install 'transformers>={low},<{high.major}.{high.minor + 1}'), "
        f"or set {_OVERRIDE}=1 to try this one anyway and compare its outputs with the original "
        "model's at the original depth"
    )
