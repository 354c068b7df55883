"""Fetch transformers' common model tests for the installed transformers release (``make test``
runs this first; ``make transformers-tests`` alone).

The files come from that release's source distribution on the package index (``pip download
--no-binary``; pip checks the index's hash), never from this repository: they are transformers'
code, tied to its version, and are extracted under ``.cache/transformers-tests/<version>/``
(git-ignored). The sdist ships only the top level of transformers' ``tests/`` folder: the common
mixins are there, but not the sub-packages they import (``tests/generation``, ``tests/exporters``,
``tests/utils``); ``tests/common/conftest.py`` fills those three imports (see there why). GitHub,
which has the whole folder, is not reachable from CI's machines.

Run with the venv's python: ``python tests/common/fetch_transformers_tests.py``. It does nothing
when the files of this version are there already.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The upstream test modules the harness imports (the mixins and what they need at import time).
FILES = ("test_modeling_common.py", "test_configuration_common.py")
STAMP = ".complete"


def target(version: str | None = None) -> Path:
    """Where the files of ``version`` (default: the installed transformers) are kept."""
    version = version or importlib.metadata.version("transformers")
    return ROOT / ".cache" / "transformers-tests" / version


def fetch(version: str | None = None) -> Path:
    version = version or importlib.metadata.version("transformers")
    dest = target(version)
    if (dest / STAMP).exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"transformers=={version}",
                "--dest",
                tmp,
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("transformers-*.tar.gz")
        with tarfile.open(sdist) as archive:
            members = {m.name: m for m in archive.getmembers()}
            wanted = [f"transformers-{version}/tests/{name}" for name in FILES]
            missing = [name for name in wanted if name not in members]
            if missing:
                raise SystemExit(f"the transformers {version} sdist lacks {missing}")
            dest.mkdir(parents=True, exist_ok=True)
            for name in wanted:
                source = archive.extractfile(members[name])
                (dest / Path(name).name).write_bytes(source.read())
    # The package marker the sdist leaves out (upstream's is empty): the fetched files import
    # their siblings relatively, and test_configuration_common executes this file by path.
    (dest / "__init__.py").write_text("")
    (dest / STAMP).write_text(f"transformers {version} sdist: {', '.join(FILES)}\n")
    return dest


if __name__ == "__main__":
    print(f"transformers' common tests in {fetch().relative_to(ROOT)}")
