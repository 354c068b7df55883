"""Atomic writes: a file or a folder at a path is either the old one or the new one, never half
of either, whenever the process is killed.

A file is written to a temporary file in the same folder, fsynced, renamed over the target and
the folder fsynced. A folder is written to a temporary sibling, then swapped with the old one in
one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``: a reader finds the old folder or the
new one at the path, at every instant), and only then is the old one deleted. Where the exchange
is not available, the old folder is renamed aside and the new one renamed in (a reader can then
find no folder for that instant; a kill between the two leaves the old one aside, put back by the
next write). Leftovers of killed writes (their names carry the writer's pid) are removed, or an
old folder put back, by the next write to the same parent.

Example:
    >>> with replace_folder("out/model", overwrite=True) as tmp:
    ...     model.save_pretrained(tmp)
    >>> write_text("out/summary.json", "{}").read_text()
    '{}'
    >>> sorted(os.listdir("out"))   # no temporary file or folder is left beside them
    ['model', 'summary.json']
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_TMP, _OLD = "odeify-tmp", "odeify-old"
# What a transformers / peft / odeify checkpoint folder holds; anything else is not ours to delete.
_CHECKPOINT_SUFFIXES = {".json", ".safetensors", ".bin", ".txt", ".model", ".jinja", ".md"}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it is fsynced and renamed over
    ``path``, on an exception removed (``path`` keeps its old content).

    Example:
        >>> with atomic_file("runs/x/step-3.pt", "wb") as f:
        ...     torch.save({"step": 3}, f)
        >>> with atomic_file("runs/x/step-3.pt", "wb") as f:   # a write that fails half-way
        ...     _ = f.write(b"half a checkpoint")
        ...     raise OSError("disk full")
        Traceback (most recent call last):
        OSError: disk full
        >>> torch.load("runs/x/step-3.pt"), os.listdir("runs/x")   # the old file, nothing else
        ({'step': 3}, ['step-3.pt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_TMP}-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Example:
        >>> write_text("out/summary.json", '{"loss": 2.5}')
        PosixPath('out/summary.json')
        >>> Path("out/summary.json").read_text()
        '{"loss": 2.5}'
    """
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def _is_checkpoint_folder(path: Path) -> bool:
    """Whether ``path`` holds only what a transformers, peft or odeify save writes (a config and
    weight, tokenizer and card files, no subfolders)."""
    entries = list(path.iterdir())
    names = {p.name for p in entries}
    return bool(names & {"config.json", "adapter_config.json"}) and all(
        p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES for p in entries
    )


def check_target(path: str | os.PathLike, overwrite: bool = False, force: bool = False) -> Path:
    """Refuse a folder that may not be replaced, before any work: an existing one without
    ``overwrite``; the working directory, a parent of it, or a non-empty folder that is not a
    checkpoint, without ``force``.

    Example:
        >>> check_target("out/new")   # nothing there yet: free to write
        PosixPath('out/new')
        >>> _ = write_text("out/new/notes.txt", "mine")
        >>> check_target("out/new")
        Traceback (most recent call last):
        FileExistsError: out/new exists; pass overwrite=True (CLI: --overwrite) to replace it
        >>> check_target("out/new", overwrite=True)
        Traceback (most recent call last):
        FileExistsError: out/new holds files that are not a model checkpoint; ...
        >>> check_target(".", overwrite=True)
        Traceback (most recent call last):
        FileExistsError: . is the working directory or a parent of it; ...
    """
    path = Path(path)
    if not path.exists():
        return path
    if not overwrite:
        raise FileExistsError(
            f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    if force:
        return path
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a model folder; remove it or choose another")
    here, target = Path.cwd().resolve(), path.resolve()
    if target == here or target in here.parents:
        raise FileExistsError(
            f"{path} is the working directory or a parent of it; an overwrite would replace it "
            "whole: choose another folder (or pass force=True, CLI --force)"
        )
    if any(path.iterdir()) and not _is_checkpoint_folder(path):
        raise FileExistsError(
            f"{path} holds files that are not a model checkpoint; an overwrite would delete them: "
            "choose another folder (or pass force=True, CLI --force)"
        )
    return path


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@functools.cache
def _renameat2():
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    except (OSError, TypeError):  # no C library to open by name (Windows)
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system cannot (then nothing moved)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # a kernel or filesystem without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(path: Path) -> None:
    """Clean up what killed writes of ``path`` left: temporary files and folders go; an old
    folder set aside is put back when the new one never arrived, else deleted."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.({_TMP}|{_OLD})-(\d+)-")
    for entry in sorted(path.parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or (int(match.group(2)) != os.getpid() and _alive(int(match.group(2)))):
            continue  # a write in progress in another process
        if match.group(1) == _OLD and not path.exists() and (entry / path.name).exists():
            (entry / path.name).rename(path)
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def replace_folder(
    path: str | os.PathLike, overwrite: bool = False, force: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to write into; on a clean exit its files are
    fsynced and it replaces ``path`` (the old folder is deleted only once the new one is in
    place), on an exception it is removed. :func:`check_target` decides what may be replaced.

    Example:
        >>> with replace_folder("out/model") as tmp:
        ...     model.save_pretrained(tmp)
        >>> with replace_folder("out/model", overwrite=True) as tmp:   # a save that fails
        ...     _ = (tmp / "config.json").write_text("{")
        ...     raise RuntimeError("the save failed")
        Traceback (most recent call last):
        RuntimeError: the save failed
        >>> os.listdir("out"), "model_type" in (Path("out/model") / "config.json").read_text()
        (['model'], True)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    check_target(path, overwrite, force)
    tag = f".{path.name}.{{}}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=tag.format(_TMP), dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with file.open("rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists() and _exchange(tmp, path):
            _fsync_dir(path.parent)  # tmp now holds the old folder; finally deletes it
            return
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=tag.format(_OLD), dir=path.parent))
            path.rename(old / path.name)
        tmp.rename(path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
