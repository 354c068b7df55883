"""LoRA through peft on odeified models: an update that is itself a function of depth t.

peft's ``target_parameters`` on a basis tensor ``[K, out, in]`` gives K low-rank updates dB_k
(one rank-r pair per basis tensor), so the adapted weight is
``W(t) + dW(t)`` with ``dW(t) = sum_k c_k(t) dB_k``: the update lives in the same time basis as
the weights and the model stays retargetable (any step count, any scheme, ``materialize``).
With the hat basis and K = L this is per-layer LoRA on the original model at N = L, with the same
parameter count; between layers dW(t) blends the two nearest layers' updates.

Standard peft calls work on an odeified model::

    from peft import PeftModel, get_peft_model
    model = get_peft_model(odeify(base), odeify.lora_config(r=8))   # train it, then
    model.save_pretrained("adapter")                                 # adapter only
    again = PeftModel.from_pretrained(odeify.from_pretrained("base-ode"), "adapter")
    plain = again.merge_and_unload()                                 # an odeified model again

How the update reaches the block: the ODE block's forward hooks (:mod:`odeify.lora_hooks`,
attached by its constructor) read each live adapter's factors (peft's ``get_delta_factors``:
dB_k = s B_k A_k) into the weight function's low-rank slot, and the block applies
``sum_k c_k(t) s B_k (A_k x)`` beside the cached frozen W(t) on the fixed grid, over the k with
c_k(t) != 0 only: one or two for the hat basis, so a step costs what LoRA on a stock layer costs
(``benchmarks/measure_finetune.py steptime``). Forming W + dW instead would compute a full-size
weight gradient per step, about 1.3x the step time. Per-sample step counts and torchdiffeq read
``basis_tensor``, which adds the full dB_k. Wrappers peft cannot factor (one basis tensor, K = 1)
fall back to peft's own parametrisation for the forward. The adapter state (``set_adapter``,
``disable_adapter()``, merging) keys the block's weight cache, since it leaves the parameters'
versions alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .adapters import FAMILIES, family_for
from .api import get_block
from .surgery import is_odeified, layer_shapes
from .weight_function import _ParamTree

ALL_LINEAR = "all-linear"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Without a model to inspect, targets resolve against the linears of every supported family
# (their paths inside a block).
_ANY_FAMILY_LINEARS = sorted({linear for family in FAMILIES.values() for linear in family.linears})


def _matrices(family, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """{linear: (out, in)} of the declared linears among parameter ``shapes``, in their order."""
    return {
        name[: -len(".weight")]: tuple(shape)
        for name, shape in shapes.items()
        if name.endswith(".weight") and name[: -len(".weight")] in family.linears
    }


def _stock_linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{name inside a block: (out, in)} of the linears of a stock model's blocks."""
    return _matrices(family_for(model), layer_shapes(model))


def _block_matrices(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module name inside the block: (out, in)} of every weight matrix of the ODE block."""
    block = get_block(model)
    return _matrices(block.family, {n: block.basis_tensor(n).shape[1:] for n in block.names})


def _check_rank(r) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")


def _resolve(
    available: dict[str, tuple[int, int]], targets, r: int, what: str
) -> dict[str, tuple[int, int]]:
    """The modules that ``targets`` (names or dotted suffixes) select, checked against rank r."""
    _check_rank(r)
    if targets == ALL_LINEAR:
        chosen = dict(available)
    else:
        chosen = {}
        for target in [targets] if isinstance(targets, str) else targets:
            hits = {n: s for n, s in available.items() if n == target or n.endswith("." + target)}
            if not hits:
                raise ValueError(
                    f"LoRA target {target!r} matches no weight matrix of {what}. Targets are module "
                    f"names or dotted suffixes of them; the matrices are {sorted(available)} "
                    f"(norms and biases take no LoRA), or use {ALL_LINEAR!r}."
                )
            chosen.update(hits)
    too_small = {n: s for n, s in chosen.items() if r > min(s)}
    if too_small:
        name, (rows, cols) = next(iter(too_small.items()))
        raise ValueError(
            f"LoRA rank r={r} is larger than the {rows}x{cols} weight of {name} (a rank-r update "
            f"of it needs r <= {min(rows, cols)}); choose a smaller r or leave that module out"
        )
    return chosen


def lora_config(
    r: int = 8,
    alpha: float | None = None,
    targets: str | Sequence[str] = ALL_LINEAR,
    model: nn.Module | None = None,
    **kwargs,
):
    """A peft ``LoraConfig`` for an odeified model: continuous-in-t LoRA on the basis tensors.

    Each targeted ``[K, out, in]`` basis tensor gets K rank-r updates, so dW(t) = sum_k c_k(t) dB_k
    (see the module docstring). Pass ``model`` to have the targets and the rank checked against
    it with clear errors (and the target list written out exactly); given a stock (not odeified)
    transformers model, the same call returns ordinary per-layer LoRA on its Linear/Conv1D
    layers, which is how the recipe does LoRA on materialised layers.

    Args:
        r: the rank of each update.
        alpha: LoRA's alpha; the update is scaled by alpha / r. Default 2 r.
        targets: ``'all-linear'`` (every attention and MLP matrix) or module names / dotted
            suffixes such as ``['q_proj', 'v_proj']`` or ``['attn.c_proj']``.
        model: optional; an odeified or a stock model to resolve and check the targets on.
        kwargs: other ``LoraConfig`` fields. ``lora_dropout``, ``use_dora`` and ``lora_bias``
            are refused by peft for parameter targets (continuous LoRA).

    Example:
        >>> from peft import get_peft_model
        >>> model = get_peft_model(odeify(base, progress=False), odeify.lora_config(r=8))
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad)   # the LoRA factors
        16384
        >>> odeify.lora_config(r=4, targets=["q_proj", "v_proj"]).target_parameters
        ['basis.self_attn.q_proj.weight', 'basis.self_attn.v_proj.weight']
    """
    from peft import LoraConfig

    alpha = 2 * r if alpha is None else alpha
    if model is None:
        # The shapes are unknown here: no check of r against them (given a model, there is).
        unknown = {name: (r, r) for name in _ANY_FAMILY_LINEARS} if isinstance(r, int) else {}
        chosen = _resolve(unknown, targets, r, "any supported family's blocks")
        # Paths through the block's basis: they match odeified models only, so peft refuses
        # such an adapter on a stock model instead of loading it as a no-op.
        return LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=[],
            target_parameters=[f"basis.{name}.weight" for name in sorted(chosen)],
            **kwargs,
        )
    if is_odeified(model):
        chosen = _resolve(_block_matrices(model), targets, r, "the ODE block")
        return LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=[],
            target_parameters=[f"basis.{name}.weight" for name in chosen],
            **kwargs,
        )
    chosen = _resolve(_stock_linears(model), targets, r, f"{type(model).__name__}'s layers")
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(chosen), **kwargs)


def _read_adapter(path: Path) -> tuple[dict, Path]:
    """A peft adapter folder's saved config and the path of its weights file."""
    config_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.exists() or not weights.exists():
        raise FileNotFoundError(
            f"{path} is not a peft adapter folder (it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    return json.loads(config_file.read_text()), weights


def load_adapter(model: nn.Module, path: str | os.PathLike, **kwargs):
    """``PeftModel.from_pretrained`` with a clear error when the adapter belongs to another base.

    Checks, before peft loads anything, that a continuous adapter goes onto an odeified model and
    a per-layer one onto a stock model, and that every saved LoRA tensor has the shape this
    model's module needs (hidden sizes, depth, the number K of basis tensors, the rank).

    Example:
        >>> from peft import get_peft_model
        >>> _ = odeify.save_pretrained(model, "gpt2-ode")
        >>> get_peft_model(model, odeify.lora_config(r=4)).save_pretrained("run/adapter")
        >>> model = load_adapter(odeify.from_pretrained("gpt2-ode"), "run/adapter")
        >>> type(model).__name__
        'PeftModel'
    """
    from peft import PeftModel
    from safetensors import safe_open

    path = Path(path)
    saved, weights = _read_adapter(path)
    continuous = bool(saved.get("target_parameters"))
    if continuous != is_odeified(model):
        kind = (
            "a continuous adapter (on ODE basis tensors)" if continuous else "a per-layer adapter"
        )
        needs = (
            "an odeified model (odeify.from_pretrained or odeify(model))"
            if continuous
            else "the stock transformers model it was trained on (or materialise first)"
        )
        raise ValueError(
            f"{path} holds {kind}; load it onto {needs}, not onto this {type(model).__name__}"
        )
    r = saved.get("r")
    ranked = not saved.get("rank_pattern")  # a per-module rank pattern: check the other sizes
    wrong = []
    with safe_open(weights, "pt") as f:
        keys = sorted(f.keys())
        for key in keys:
            shape = tuple(f.get_slice(key).get_shape())
            want = _expected_shape(model, key, r if ranked else None)
            if (
                want is None
                or len(want) != len(shape)
                or any(w is not None and w != s for w, s in zip(want, shape, strict=True))
            ):
                wrong.append((key, shape, want))
    if wrong:
        key, shape, want = wrong[0]
        base = saved.get("base_model_name_or_path") or "an unnamed model"
        here = "absent here" if want is None else f"{[w or '*' for w in want]} here"
        raise ValueError(
            f"{path} was saved for another base model ({base}): {len(wrong)} of its {len(keys)} "
            f"tensors do not fit this {type(model).__name__}, e.g. {key} is {list(shape)} in the "
            f"adapter but {here}. An adapter fits only the architecture, depth and (for a "
            "continuous adapter) the number of basis tensors K it was trained on."
        )
    return PeftModel.from_pretrained(model, path, **kwargs)


def _expected_shape(model: nn.Module, key: str, r: int | None) -> tuple[int | None, ...] | None:
    """The shape this model needs for a saved LoRA tensor (None where any size fits), or None
    when the model has no module for it."""
    module_path, _, leaf = key.removeprefix("base_model.model.").rpartition(".lora_")
    try:
        module = model.get_submodule(module_path.replace(".base_layer", ""))
    except AttributeError:
        return None
    module = getattr(module, "base_layer", module)
    if isinstance(module, _ParamTree):
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 3:
            return None
        k, rows, cols = weight.shape
        rank = None if r is None else r * k
    else:
        from transformers.pytorch_utils import Conv1D

        if isinstance(module, nn.Linear):
            rows, cols = module.out_features, module.in_features
        elif isinstance(module, Conv1D):
            rows, cols = module.nf, module.weight.shape[0]
        else:
            return None
        rank = r
    if leaf.startswith("A."):
        return (rank, cols)
    if leaf.startswith("B."):
        return (rows, rank)
    return None


def upgrade_adapter(path: str | os.PathLike) -> list[str]:
    """Rewrite a continuous adapter saved with leaf targets (``q_proj.weight``, written by odeify
    before targets ran through the basis) to target ``basis.<path>.weight``, in place.

    A leaf target also matches the stock model's ``q_proj.weight``, so peft would load the
    adapter onto a stock model as a silent no-op; a basis path it refuses. The targets are read
    off the saved tensors' names, so the adapter loads onto its odeified base exactly as before.
    Returns the new targets (unchanged when the adapter is already current).

    Example:
        >>> from peft import get_peft_model
        >>> config = odeify.lora_config(r=2, targets=["c_attn"], model=model)
        >>> get_peft_model(model, config).save_pretrained("adapter")
        >>> upgrade_adapter("adapter")   # already current; or: odeify upgrade adapter
        ['basis.attn.c_attn.weight']
    """
    from safetensors import safe_open

    from .atomic import write_text

    path = Path(path)
    saved, weights = _read_adapter(path)
    targets = saved.get("target_parameters") or []
    if not targets:
        raise ValueError(
            f"{path} is a per-layer adapter (target_modules, no target_parameters): it belongs to "
            "a stock model and needs no upgrade"
        )
    if all(t.startswith("basis.") for t in targets):
        return list(targets)
    with safe_open(weights, "pt") as f:
        keys = list(f.keys())
    # base_model.model.model.layers.0.basis.self_attn.q_proj.lora_A.weight -> self_attn.q_proj
    paths = {k.partition(".basis.")[2].rpartition(".lora_")[0] for k in keys if ".basis." in k}
    paths.discard("")
    if not paths:
        raise ValueError(
            f"{path}: none of its {len(keys)} tensors lies under an ODE block's basis "
            "(…layers.0.basis.<path>.lora_A.weight), so it is not an odeify adapter"
        )
    upgraded = sorted(f"basis.{p}.weight" for p in paths)
    saved["target_parameters"] = upgraded
    write_text(path / ADAPTER_CONFIG, json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return upgraded
