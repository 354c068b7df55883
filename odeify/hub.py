"""Where a checkpoint lives: a local folder, or a Hugging Face hub id resolved to its snapshot.

A source that exists on disk is that folder. Anything else that reads as a hub id
(``owner/name`` or ``name``) goes through ``huggingface_hub.snapshot_download``: online it
downloads what a checkpoint needs (configs, safetensors, tokenizer files) into the hub cache;
offline (``HF_HUB_OFFLINE=1``) it returns the cached snapshot, and an id that is not cached is
refused with an error that says so.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What a checkpoint folder needs: no .bin, .gguf, .onnx or .msgpack duplicates of its weights.
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "README.md")

# owner/name as the hub spells it (letters, digits, '-', '_', '.'), or a bare name.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether ``source`` reads as a hub id rather than a path (it need not exist anywhere).

    Example:
        >>> is_hub_id("HuggingFaceTB/SmolLM2-135M"), is_hub_id("./out/model"), is_hub_id("/tmp/x")
        (True, False, False)
    """
    text = os.fspath(source)
    return (
        bool(_HUB_ID.match(text))
        and not text.startswith(".")
        and ".." not in text
        and not text.endswith(".gguf")
    )


def resolve(
    source: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The local folder of ``source``: the folder itself, or a hub id's snapshot (downloaded when
    online, from the cache when offline).

    Example:
        >>> resolve(".") == Path(".")
        True
        >>> resolve("no-such-owner/no-such-model")   # HF_HUB_OFFLINE=1 and not cached
        Traceback (most recent call last):
        FileNotFoundError: 'no-such-owner/no-such-model' is neither a local folder nor a cached hub model, ...
    """
    path = Path(source).expanduser()
    if path.exists() or not is_hub_id(source):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            os.fspath(source),
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=list(CHECKPOINT_FILES),
        )
    except LocalEntryNotFoundError as error:
        offline = constants.HF_HUB_OFFLINE
        why = (
            "and HF_HUB_OFFLINE is set, so the hub is not asked: download it once online, or "
            "pass the folder it is in"
            if offline
            else f"and the hub could not be reached ({error})"
        )
        raise FileNotFoundError(
            f"{os.fspath(source)!r} is neither a local folder nor a cached hub model, {why}"
        ) from None
    except HfHubHTTPError as error:  # not found, gated, unauthorised: the hub's own words
        raise FileNotFoundError(
            f"{os.fspath(source)!r} is not a local folder, and the hub refused it: {error}"
        ) from None
    return Path(folder)
