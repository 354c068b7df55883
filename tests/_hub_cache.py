"""A folder laid out as the Hugging Face hub cache holds a downloaded snapshot, for offline tests."""

import shutil

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_snapshot(folder, cache_dir, repo, commit=COMMIT, ref="main"):
    """Copy ``folder`` into ``cache_dir`` as snapshot ``commit`` of ``repo``, named by ``ref``."""
    root = cache_dir / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
