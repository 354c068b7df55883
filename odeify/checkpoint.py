"""The safetensors files of a checkpoint folder, read one tensor (or a few rows of one) at a time.

A folder holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json``.
:class:`Checkpoint` is a read-only mapping over all their tensors that reads nothing until a
tensor is asked for, so checksums, shape checks and the streaming conversion never hold more
than the tensor in hand. It also decides what dtype a load gives (:func:`load_dtype`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors' dtype names (as get_slice().get_dtype() gives them) and torch's.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The floating dtypes a model can be loaded in, by the names a user types.
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder (one, or the shards its index lists).

    Example:
        >>> _ = odeify.save_pretrained(model, "gpt2-ode")
        >>> [p.name for p in weight_files("gpt2-ode")]
        ['model.safetensors']
    """
    folder = Path(folder)
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.exists():
        return [single]
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise FileNotFoundError(f"{folder} is missing weight shards {missing}")
        return [folder / s for s in shards]
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"{folder} has no {SINGLE_FILE} (files present: {present})")


class Checkpoint(Mapping[str, Tensor]):
    """Every tensor of a checkpoint folder by name, read from disk when asked for.

    The headers (names, shapes, dtypes) are read once; each tensor is read by opening its file
    for that read alone. safetensors reads through a memory map, and the pages a read touches
    count as this process's memory for as long as the file stays mapped: kept open, a pass over
    a checkpoint would hold all of it, on top of what the reads filled.

    Example:
        >>> _ = odeify.save_pretrained(model, "gpt2-ode")
        >>> with Checkpoint("gpt2-ode") as tensors:
        ...     name = "transformer.h.0.basis.mlp.c_fc.weight"
        ...     tensors.shape(name), tensors.dtype(name), tensors.rows(name, 0, 1).shape
        ((4, 128, 32), torch.float32, torch.Size([1, 128, 32]))
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        self._header: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in weight_files(self.folder):
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    part = handle.get_slice(name)
                    self._where[name] = file
                    self._header[name] = (tuple(part.get_shape()), part.get_dtype())

    def __getitem__(self, name: str) -> Tensor:
        with safe_open(self._file(name), framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def _file(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"{self.folder} has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header (no data read)."""
        self._file(name)
        return self._header[name][0]

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's dtype, from the file's header (no data read)."""
        self._file(name)
        kind = self._header[name][1]
        if kind not in _DTYPES:
            raise ValueError(f"{self.folder}: {name} is stored as {kind}, which odeify cannot read")
        return _DTYPES[kind]

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the tensor's first dimension (only those bytes are read)."""
        with safe_open(self._file(name), framework="pt") as handle:
            return handle.get_slice(name)[start:stop]

    def close(self) -> None:
        """Forget the headers (no file is held open between reads; this ends the mapping)."""
        self._where.clear()
        self._header.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """A torch dtype from what a user passes (``torch.bfloat16``, ``"bfloat16"``,
    ``"torch.bfloat16"``), or ``"auto"``/None as given; anything else is refused.

    Example:
        >>> parse_dtype("bfloat16"), parse_dtype(torch.float16), parse_dtype("auto")
        (torch.bfloat16, torch.float16, 'auto')
        >>> parse_dtype("float8")
        Traceback (most recent call last):
        ValueError: dtype 'float8' is not one of 'auto', 'float32', 'bfloat16', 'float16' (or a torch dtype)
    """
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.removeprefix("torch.")]
    names = ", ".join(repr(n) for n in ("auto", *DTYPE_NAMES))
    raise ValueError(f"dtype {dtype!r} is not one of {names} (or a torch dtype)")


def load_dtype(dtype: str | torch.dtype | None, saved: torch.dtype | None) -> torch.dtype:
    """The dtype a load gives: the one asked for, else (None or "auto") the weights' ``saved``
    dtype, else float32.

    Example:
        >>> load_dtype(None, torch.bfloat16), load_dtype("float32", torch.bfloat16)
        (torch.bfloat16, torch.float32)
    """
    dtype = parse_dtype(dtype)
    if dtype is None or dtype == "auto":
        return saved if saved is not None and saved.is_floating_point else torch.float32
    return dtype


def floating_dtype(tensors: Checkpoint) -> torch.dtype | None:
    """The dtype of the first floating tensor of a checkpoint (its weights' dtype), or None.

    Example:
        >>> _ = odeify.save_pretrained(model, "gpt2-ode")
        >>> with Checkpoint("gpt2-ode") as tensors:
        ...     floating_dtype(tensors)
        torch.float32
    """
    for name in tensors:
        dtype = tensors.dtype(name)
        if dtype.is_floating_point:
            return dtype
    return None
