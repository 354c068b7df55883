"""Saving and loading odeified models: transformers' safetensors layout, ODE settings in config.json."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from .adapters import family_for
from .api import get_block, odeify
from .atomic import replace_folder
from .card import model_card
from .checkpoint import Checkpoint, load_dtype
from .config import FORMAT_VERSION, ODEConfig
from .family import ODEIFY_TYPE_PREFIX
from .hub import resolve
from .models import adopt, odeify_class, odeify_config_class, set_config_class
from .surgery import stock_model

CHECKSUM_FILE = "checksum.json"


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    force: bool = False,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Write an odeified model (and optionally its tokenizer) to ``path`` atomically, with a
    model card.

    The config names odeify's own model type and class (``odeify-gpt2``,
    ``OdeifyGPT2LMHeadModel``): with odeify imported, ``AutoModelForCausalLM.from_pretrained``
    loads the folder as the ODE model; without it transformers refuses it, never mistaking it for
    a stock checkpoint. The model card (README.md, see :func:`odeify.card.model_card`) says what
    the model is and how to load it; ``card`` adds what the caller knows, e.g.
    ``{"base_model": "gpt2", "perplexity": 21.3}``.

    The files go to a temporary folder beside ``path``, are fsynced, and replace ``path`` only
    once complete; an old model there is deleted after the new one is in place, so a kill at any
    point leaves the old or the new model (see :mod:`odeify.atomic`). A checksum of the tensors
    goes to ``checksum.json``, verified by :func:`from_pretrained`, with the conversion's
    ``fit_residuals`` (restored on load). An existing ``path`` needs
    ``overwrite``; the working directory, a parent of it, or a folder holding anything but a
    checkpoint also needs ``force``. ``model.save_pretrained(path)`` also works (not atomically,
    no checksum).

    Example:
        >>> odeify.save_pretrained(model, "gpt2-ode")
        PosixPath('gpt2-ode')
        >>> sorted(p.name for p in Path("gpt2-ode").iterdir())
        ['README.md', 'checksum.json', 'config.json', 'generation_config.json', 'model.safetensors']
        >>> json.loads(Path("gpt2-ode/config.json").read_text())["architectures"]
        ['OdeifyGPT2LMHeadModel']
    """
    get_block(model)
    adopt(model)  # a model odeified by an older odeify: its stock classes never reach the folder
    text = model_card(model, Path(path).name, card)
    with replace_folder(path, overwrite, force) as tmp:
        model.save_pretrained(tmp)
        (tmp / "README.md").write_text(text)
        # Of the tensors as written (tied weights once, in the saved dtype), read back.
        with Checkpoint(tmp) as written:
            sha256 = tensor_checksum(written)
        digest = {
            "sha256": sha256,
            "fitted_with": _fitted_with(get_block(model).ode.to_dict()),
            "fit_residuals": get_block(model).fit_residuals,
        }
        (tmp / CHECKSUM_FILE).write_text(json.dumps(digest, indent=1) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def tensor_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: every tensor's name, dtype, shape and bytes, in name order (a
    :class:`odeify.checkpoint.Checkpoint` is read a tensor at a time).

    Example:
        >>> tensor_checksum({"w": torch.zeros(2)})[:12]
        '1b4484e4be5f'
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def from_pretrained(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    verify: bool = True,
    *,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Load a model saved after :func:`odeify.odeify` from its folder or hub id; needs nothing
    but the saved folder.

    The round trip is bit-exact: same class, same ODE settings, same tensors and dtype. Every
    ODE setting is checked against the tensors it implies (family, layer count, basis kind and
    K, learned time units) before any weight is read; with ``verify`` the tensors' checksum
    written by :func:`save_pretrained` is checked too, a tensor at a time (about a second for
    SmolLM2-135M; folders saved without one load unchecked). The weights are then loaded by
    transformers' own ``from_pretrained`` into a model built on the meta device, so the model is
    never held twice. The model comes back as odeify's class (``OdeifyGPT2LMHeadModel``, a
    ``GPT2LMHeadModel``); folders of the earlier format (the stock model type with an
    ``odeify`` section in config.json) load the same way, and saving the model again writes the
    current format (``odeify upgrade FOLDER`` does that in place).

    Args:
        path: a saved folder, or a hub id (downloaded through ``huggingface_hub`` when online,
            from its cache when ``HF_HUB_OFFLINE=1``; ``revision`` and ``cache_dir`` go there).
        device: where the model goes (``"cuda"``, ``"cpu"``...): loaded there directly.
        dtype: a torch dtype or its name, or "auto"/None: the saved dtype.
        device_map: as transformers takes it ("auto", "cpu", "cuda:0", {module: device}); the ODE
            block is one module that is never split.

    Example:
        >>> _ = odeify.save_pretrained(model, "gpt2-ode")
        >>> loaded = odeify.from_pretrained("gpt2-ode")
        >>> type(loaded).__name__, torch.equal(loaded(ids).logits, model(ids).logits)
        ('OdeifyGPT2LMHeadModel', True)
        >>> odeify.from_pretrained("gpt2-ode", dtype="bfloat16", device_map="cpu").dtype
        torch.bfloat16
    """
    if device is not None and device_map is not None:
        raise ValueError("pass device= (the whole model on one device) or device_map=, not both")
    if device is not None:
        device_map = {"": _device(device)}
    folder = resolve(path, revision=revision, cache_dir=cache_dir)
    ode, config = _read_config(folder)
    with Checkpoint(folder) as tensors:
        checksum = _read_checksum(folder)
        if checksum is not None:
            _check_fitted_with(folder, ode, checksum)
            if verify and tensor_checksum(tensors) != checksum["sha256"]:
                raise ValueError(
                    f"{folder}: the tensors do not match the checksum written with them (the "
                    "weight files were changed or corrupted); pass verify=False to load them anyway"
                )
        saved = _check_tensors(folder, config, ode, tensors)
    cls = _model_class(config)
    set_config_class(config, odeify_config_class(type(config)))  # the earlier format's stock one
    model = cls.from_pretrained(
        folder, config=config, dtype=load_dtype(dtype, saved), device_map=device_map
    )
    # The residuals of the conversion's fit, kept beside the checksum (none without one).
    get_block(model).fit_residuals = dict((checksum or {}).get("fit_residuals", {}))
    return model.eval()


def _device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device ({error})") from None


def _model_class(config: transformers.PretrainedConfig) -> type[nn.Module]:
    """The odeify class of the saved architecture (the stock name in the earlier format)."""
    from .models import stock_class

    names = config.architectures or []
    stock = getattr(transformers, names[0].removeprefix("Odeify"), None) if names else None
    if stock is None:
        mapping = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING
        stock = mapping[stock_class(type(config))]
    return odeify_class(stock)


def _check_tensors(
    path: Path, config: transformers.PretrainedConfig, ode: ODEConfig, tensors: Checkpoint
) -> torch.dtype:
    """The saved tensors' names and shapes against what the config implies (headers only, no
    data read); returns the basis tensors' dtype."""
    # A one-layer skeleton on the meta device gives the block's parameter shapes for free.
    with torch.device("meta"):
        model = stock_model(config, 1)
    family = family_for(model)
    if family.name != ode.family:
        raise ValueError(
            f"{path}: config.json describes a {family.name} model but its odeify section says "
            f"family {ode.family!r}"
        )
    basis = next((k for k in tensors if ".basis." in k), None)
    if basis is None:
        raise ValueError(
            f"{path}: config.json has an odeify section but the weights are a stock model's (no "
            "basis tensors); load it with AutoModelForCausalLM.from_pretrained, or delete the "
            "odeify section from config.json"
        )
    options = {k: v for k, v in ode.to_dict().items() if k not in ("family", "version")}
    odeify(model, init="none", progress=False, **options)
    expected = model.state_dict(keep_vars=True)
    wrong = [
        f"{k} {tensors.shape(k)} (config implies {tuple(expected[k].shape)})"
        for k in tensors
        if k in expected and tensors.shape(k) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ValueError(
            f"{path} does not match its config (basis kind, num_basis or model size edited?): "
            + "; ".join(wrong[:4])
        )
    # Tied weights (lm_head = embeddings) are saved once; they are loaded through their twin.
    loaded = {id(expected[k]) for k in expected if k in tensors}
    missing = [k for k in expected if k not in tensors and id(expected[k]) not in loaded]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match its config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return tensors.dtype(basis)


def _read_config(path: Path) -> tuple[ODEConfig, transformers.PretrainedConfig]:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(
            f"{path} has no config.json; is it a folder written by save_pretrained?"
        )
    saved = json.loads(config_file.read_text())
    settings = saved.get("odeify")
    if settings is None and str(saved.get("model_type", "")).startswith(ODEIFY_TYPE_PREFIX):
        raise ValueError(
            f"{config_file} has model type {saved['model_type']!r} but no 'odeify' section (the "
            "ODE settings): it was edited; restore it or convert the original model again"
        )
    if settings is None:
        raise ValueError(
            f"{config_file} has no 'odeify' section: it is a plain transformers checkpoint. Load it "
            "with AutoModelForCausalLM.from_pretrained and call odeify(model)."
        )
    if not isinstance(settings, dict):
        raise ValueError(
            f"{config_file}: the 'odeify' section must be a mapping of ODE settings, got "
            f"{settings!r}"
        )
    if settings.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by odeify format version {settings.get('version')}; this odeify "
            f"reads version {FORMAT_VERSION}. Convert the original model again with this version."
        )
    try:
        ode = ODEConfig.from_dict(settings)
    except TypeError as error:  # a required field missing
        raise ValueError(f"{config_file}: incomplete 'odeify' section ({error})") from None
    config = transformers.AutoConfig.from_pretrained(path)
    if config.num_hidden_layers != ode.num_layers:
        raise ValueError(
            f"{config_file} describes {config.num_hidden_layers} layers but its odeify section "
            f"says num_layers = {ode.num_layers}: one of them was edited"
        )
    return ode, config


def _read_checksum(path: Path) -> dict | None:
    file = path / CHECKSUM_FILE
    if not file.exists():
        return None  # saved before checksums, or by model.save_pretrained
    try:
        checksum = json.loads(file.read_text())
        checksum["sha256"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{file} is not a checksum file written by odeify") from None
    return checksum


def _check_fitted_with(path: Path, ode: ODEConfig, checksum: dict) -> None:
    """The settings that give the tensors their meaning, as saved beside them."""
    saved = checksum.get("fitted_with", {})
    now = _fitted_with(ode.to_dict())
    differ = sorted(k for k in saved if saved[k] != now.get(k))
    if differ:
        pairs = ", ".join(f"{k} {now.get(k)!r} (saved with {saved[k]!r})" for k in differ)
        raise ValueError(
            f"{path}/config.json does not match the tensors saved with it: {pairs}; restore the "
            "config or convert the model again"
        )


def _fitted_with(settings: dict) -> dict:
    fields = ("family", "num_layers", "basis", "num_basis", "basis_kwargs")
    return {k: v for k, v in settings.items() if k in fields}
