"""Saving and loading odeified models: transformers' safetensors layout, ODE settings in config.json."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from .api import get_block, odeify
from .config import FORMAT_VERSION, ODEConfig
from .surgery import set_num_layers, stock_model


def save_pretrained(
    model: nn.Module, path: str | os.PathLike, tokenizer=None, overwrite: bool = False
) -> Path:
    """Write an odeified model (and optionally its tokenizer) to ``path`` atomically.

    The files go to a temporary folder beside ``path`` that is renamed into place at the end, so
    an interrupted save leaves no half-written checkpoint. ``model.save_pretrained(path)`` also
    works (not atomically).

    Example:
        >>> odeify.save_pretrained(model, "gpt2-ode")
        PosixPath('gpt2-ode')
        >>> sorted(p.name for p in Path("gpt2-ode").iterdir())
        ['config.json', 'generation_config.json', 'model.safetensors']
    """
    get_block(model)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return load_file(single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise FileNotFoundError(f"{path} is missing weight shards {missing}")
        state = {}
        for shard in shards:
            state.update(load_file(path / shard))
        return state
    present = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(f"{path} has no model.safetensors (files present: {present})")


def from_pretrained(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Load a model saved after :func:`odeify.odeify`; needs nothing but the saved folder.

    The round trip is bit-exact: same class, same ODE settings, same tensors and dtype.

    Example:
        >>> _ = odeify.save_pretrained(model, "gpt2-ode")
        >>> loaded = odeify.from_pretrained("gpt2-ode")
        >>> type(loaded).__name__, torch.equal(loaded(ids).logits, model(ids).logits)
        ('GPT2LMHeadModel', True)
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(
            f"{path} has no config.json; is it a folder written by save_pretrained?"
        )
    raw = json.loads(config_file.read_text())
    settings = raw.get("odeify")
    if settings is None:
        raise ValueError(
            f"{config_file} has no 'odeify' section: it is a plain transformers checkpoint. Load it "
            "with AutoModelForCausalLM.from_pretrained and call odeify(model)."
        )
    if settings.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by odeify format version {settings.get('version')}; this odeify "
            f"reads version {FORMAT_VERSION}. Convert the original model again with this version."
        )
    ode = ODEConfig.from_dict(settings)
    state = _read_state(path)

    config = transformers.AutoConfig.from_pretrained(path)
    # A one-layer skeleton gives the block's parameter shapes without building L layers.
    model = stock_model(config, 1)
    dtype = next(t.dtype for k, t in state.items() if ".basis." in k)
    model.to(dtype)
    options = {k: v for k, v in ode.to_dict().items() if k not in ("family", "version")}
    odeify(model, init="none", progress=False, **options)
    set_num_layers(model.config, config.num_hidden_layers)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embeddings) are saved once; they are loaded through their twin.
    params = model.state_dict(keep_vars=True)
    loaded = {id(params[k]) for k in params if k not in missing}
    missing = [k for k in missing if id(params[k]) not in loaded]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match its config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    if device is not None:
        model.to(device)
    return model.eval()
