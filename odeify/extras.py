"""Optional dependencies, imported where they are used: plots need matplotlib (the ``plots``
extra), GGUF files need gguf (the ``gguf`` extra). A missing one is an error that names the
extra that installs it.

Figures are built without pyplot: its backend switch and figure registry are process-wide, and a
library that draws a PNG must not change how the host program's own plots are shown.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Top-level module -> the odeify extra that installs it.
EXTRAS = {"matplotlib": "plots", "gguf": "gguf"}


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or say which extra installs it.

    Example:
        >>> require("matplotlib.colors", "colour scales").__name__
        'matplotlib.colors'
        >>> require("gguf_not_there", "reading GGUF files")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ImportError: reading GGUF files needs the Python package gguf_not_there, which is not installed...
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        extra = EXTRAS.get(top)
        hint = f"pip install 'odeify[{extra}]'" if extra else f"pip install {top}"
        raise ImportError(
            f"{purpose} needs the Python package {top}, which is not installed: {hint}"
        ) from error


def figure(**kwargs):
    """A matplotlib ``Figure`` that saves through the Agg renderer, made without pyplot.

    Example:
        >>> fig = figure(figsize=(2, 2))
        >>> ax = fig.subplots()
        >>> _ = ax.plot([0, 1], [1, 0])
        >>> fig.savefig("line.png")
        >>> import os; os.path.getsize("line.png") > 0
        True
    """
    return require("matplotlib.figure", "drawing plots").Figure(**kwargs)
