"""The public verbs: odeify a model, retarget its steps, materialise it back to a stock model."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
from torch import nn

from .adapters import family_for
from .bases import default_num_basis, make_basis
from .block import ODEBlock
from .config import ODEConfig
from .diffeqformer import random_init
from .family import Family
from .models import adopt
from .schemes import check_steps, resolve_solver, spans
from .surgery import (
    block_stack,
    find_block,
    is_odeified,
    layer_samples,
    layer_shapes,
    replace_stack,
    stock_model,
)
from .versions import check_transformers

_INITS = ("fit", "random", "none")


def get_block(model: nn.Module) -> ODEBlock:
    """The ODE block of an odeified model (raises if the model was not odeified).

    Example:
        >>> block = odeify.get_block(odeify(base, progress=False))
        >>> block.ode.num_layers
        4
    """
    block = find_block(model)
    if block is not None:
        return block
    raise ValueError(f"{type(model).__name__} is not odeified: call odeify(model) first")


def odeify(
    model: nn.Module | str | os.PathLike,
    *,
    basis: str = "hat",
    num_basis: int | None = None,
    scheme: str | None = None,
    steps: int | None = None,
    basis_kwargs: dict | None = None,
    init: str = "fit",
    progress: bool = True,
    **options,
) -> nn.Module:
    """Replace a GPT-2 or Llama-family model's block stack with one continuous-depth ODE block.

    Every block parameter p becomes p(t) = sum_k c_k(t) P_k, fitted by least squares to the
    pretrained layers at t = l / L. With the default hat basis and K = L the fit is exact and,
    at steps = L with the ``sequential`` scheme, the model computes what it computed before.
    The model is modified in place and returned; ``get_block(model).fit_residuals`` holds each
    parameter's relative fit residual.

    ``init="random"`` with ``basis="fourier"`` builds a DiffEqFormer to pretrain instead (see
    :func:`odeify.diffeqformer.random_init`): the paper's parallel field with Euler steps,
    one learned time unit per weight group, norms starting at the identity, biases at zero and
    matrices at the scale of the model's own init. Give it a freshly built model; only its
    parameter shapes and init scale are used.

    ``model`` may also be a stock checkpoint folder or hub id (safetensors): it is then converted
    by streaming it from disk layer by layer (:func:`odeify.streaming.convert`, which also takes
    ``dtype=`` and ``device=``), without the stock model in memory.

    Args:
        model: a transformers GPT-2 or Llama-family model (``*ForCausalLM`` or the base model),
            or the folder / hub id of one.
        basis: 'hat' (exact at K = L), 'chebyshev', 'legendre', or 'fourier' (the paper's learned unit).
        num_basis: K. Default L for fixed bases, 21 (E = 20) for 'fourier'. K < L compresses.
        scheme: 'sequential', 'euler', 'midpoint', 'heun', 'rk4', or a torchdiffeq method.
            Default: 'euler' (the paper's parallel field) with init='random', else 'sequential'.
        steps: default solver steps N (None: L).
        init: 'fit' (least squares on the layers), 'random' (DiffEqFormer from scratch; needs
            basis='fourier') or 'none' (leave the basis unset, to load weights).
        options: other :class:`ODEConfig` fields (discrete_ends, rtol, atol, adjoint,
            cache_weights, checkpoint_steps).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = odeify(GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2)), progress=False)
        >>> type(get_block(model)).__name__
        'ODEBlock'
        >>> fresh = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2))
        >>> get_block(odeify(fresh, basis="fourier", init="random")).ode.scheme
        'euler'
    """
    if isinstance(model, (str, os.PathLike)):
        from .streaming import convert

        if init != "fit":
            raise ValueError(
                f"init={init!r} builds on a model in memory; a checkpoint path is fitted "
                "(init='fit'): load the model first for the other inits"
            )
        kwargs = dict(basis=basis, num_basis=num_basis, scheme=scheme, steps=steps)
        return convert(model, basis_kwargs=basis_kwargs, progress=progress, **kwargs, **options)
    loading = sorted(set(options) & {"dtype", "device", "device_map", "revision", "cache_dir"})
    if loading:
        raise TypeError(
            f"odeify(model, {loading[0]}=...) applies when odeify is given a checkpoint path; "
            "for a model in memory, move or cast it with model.to(...) first"
        )
    check_transformers()
    family = family_for(model)
    if is_odeified(model):
        raise ValueError("this model is already odeified; use odeify.steps(...) to retarget it")
    ode = _ode_config(model, family, basis, num_basis, scheme, steps, basis_kwargs, init, options)
    block = _new_block(model, family, ode, init, progress)
    block.train(model.training)
    replace_stack(model, nn.ModuleList([block]))  # its settings are model.config.odeify
    return adopt(model)  # the odeify classes: saved, the folder names what it holds


def _ode_config(
    model: nn.Module,
    family: Family,
    basis: str,
    num_basis: int | None,
    scheme: str | None,
    steps: int | None,
    basis_kwargs: dict | None,
    init: str,
    options: dict,
) -> ODEConfig:
    """The checked ODE settings of an odeify call (defaults filled in from the model)."""
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if scheme is None:
        scheme = "euler" if init == "random" else "sequential"
    family.check_config(model.config)
    num_layers = options.pop("num_layers", len(block_stack(model)))
    if num_basis is None:
        num_basis = default_num_basis(basis, num_layers)
    if isinstance(num_basis, bool) or not isinstance(num_basis, int) or num_basis < 1:
        raise ValueError(f"num_basis (K) must be an integer >= 1, got {num_basis!r}")
    ode = ODEConfig(
        family=family.name,
        num_layers=num_layers,
        basis=basis,
        num_basis=num_basis,
        basis_kwargs=dict(basis_kwargs or {}),
        scheme=scheme,
        steps=steps,
        **options,
    )
    resolve_solver(ode.scheme)
    if steps is not None:
        spans(check_steps(steps), ode.num_layers, ode.discrete_ends)
    probe = make_basis(ode.basis, ode.num_basis, ode.num_layers, **ode.basis_kwargs)
    if init == "random" and not probe.learned:
        raise ValueError(
            f"init='random' builds DiffEqFormer's learned time units: use basis='fourier'. With "
            f"the fixed basis {ode.basis!r}, init='fit' on a freshly built model fits its random layers"
        )
    return ode


def _new_block(
    model: nn.Module, family: Family, ode: ODEConfig, init: str, progress: bool
) -> ODEBlock:
    """The ODE block for the model's stack: fitted to its layers, randomly initialised from
    their shapes and scale, or (init='none') left to be loaded."""
    first = next(block_stack(model)[0].parameters())
    block = ODEBlock(family, model.config, ode, layer_shapes(model), first.dtype, first.device)
    if init == "fit":
        block.fit(layer_samples(model), progress=progress)
    elif init == "random":
        random_init(block, layer_samples(model))
    return block


def _changes(steps, scheme: str | None, schedule: str | None) -> dict:
    changes = {"steps": steps, "scheme": scheme, "schedule": schedule}
    return {key: value for key, value in changes.items() if value is not None}


def set_steps(
    model: nn.Module,
    steps: int | None = None,
    scheme: str | None = None,
    schedule: str | None = None,
) -> nn.Module:
    """Change the default step count, scheme and/or schedule choice ('calibrated' or
    'uniform') of an odeified model (saved with it).

    Example:
        >>> model = odeify.set_steps(model, 24, scheme="rk4")
        >>> odeify.get_block(model).ode.steps, model.config.odeify["scheme"]
        (24, 'rk4')
    """
    if isinstance(steps, (torch.Tensor, list, tuple)):
        raise TypeError(
            "set_steps saves one step count; use odeify.steps(...) for per-sample counts"
        )
    get_block(model).ode.update(**_changes(steps, scheme, schedule))
    return model


@contextlib.contextmanager
def steps(
    model: nn.Module, steps, scheme: str | None = None, schedule: str | None = None
) -> Iterator[nn.Module]:
    """Run an odeified model at another step count (and scheme) inside a ``with`` block.

    ``steps`` is an int, or one count per sample ([B] integer tensor): each sample is then
    integrated on its own grid, as if it ran alone (padded steps leave finished samples as they
    are). That is how per-request depth reaches ``generate()``; a single forward can also take
    ``ode_steps=`` directly. A step count with a calibrated schedule (:func:`odeify.calibrate`)
    runs it; ``schedule="uniform"`` forces the uniform grid t_i = i / N, gains L / N.

    The change holds for the calling thread only, and nothing is saved: other threads running
    the same model keep its own settings (or their own ``with`` blocks), so a server can give each
    request its depth. Blocks nest; leaving one, by an exception too, restores what was before.

    Example:
        >>> with odeify.steps(model, 2):       # half the compute of the 4-layer model
        ...     logits = model(ids).logits
        >>> logits.shape, odeify.get_block(model).ode.resolved_steps   # its own count after
        (torch.Size([2, 16, 97]), 4)
        >>> with odeify.steps(model, 2, schedule="uniform"):   # uniform even if 2 is calibrated
        ...     logits = model(ids).logits
        >>> with odeify.steps(model, torch.tensor([2, 8])):   # one count per sample
        ...     out = model.generate(ids, max_new_tokens=2, do_sample=False)
        >>> out.shape
        torch.Size([2, 18])
    """
    with get_block(model).ode.local(**_changes(steps, scheme, schedule)):
        yield model


@torch.no_grad()
def materialize(model: nn.Module, steps: int, schedule: str | None = None) -> nn.Module:
    """A stock transformers model with ``steps`` layers equal to the ODE model at that many
    ``sequential`` steps of its schedule: layer i holds W(t_i), its attention and MLP output
    projections scaled by the step's two gains (uniform: t_i = i / steps and L / steps; or the
    calibrated schedule of that count, or the grid of ``discrete_ends``). A calibrated
    schedule's linear correction folds into the MLP output projections: layer i's becomes
    T_i^T W (bias b T_i). ``schedule`` forces 'uniform' or 'calibrated' (default: the model's
    setting).

    Example:
        >>> plain = odeify.materialize(model, steps=2)
        >>> type(plain).__name__, plain.config.num_hidden_layers
        ('GPT2LMHeadModel', 2)
        >>> with odeify.steps(model, 2, scheme="sequential"):
        ...     torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)
        True
    """
    _refuse_peft_wrapper(model)
    block = get_block(model)
    count = check_steps(steps)
    num_layers = block.ode.num_layers
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False) and count != num_layers:
        raise ValueError(
            "scale_attn_by_inverse_layer_idx scales layer l by 1 / (l + 1), which a stock model "
            f"with {count} layers cannot express for an ODE of depth {num_layers}; materialise at "
            f"steps={num_layers} or use a config without it"
        )
    sequential = resolve_solver("sequential")
    plan = block.schedule_for(sequential, count, schedule)
    times, _ = plan.stage_times(sequential.native.offsets)
    weights = block.weights_at(times)
    layer = lambda i: {name: w[i] for name, w in weights.items()}
    gains = [plan.step_gains(i) for i in range(count)]
    corrections = [plan.step_correction(i) for i in range(count)]
    return stock_model(model, count, layer, gains, corrections)


def _refuse_peft_wrapper(model: nn.Module) -> None:
    # A PeftModel is not a transformers model class: building "a stock model like it" fails deep
    # inside peft, and its adapter would be dropped. Say what to do instead.
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        raise TypeError(
            "materialize takes the odeified transformers model, not a PeftModel: merge the "
            "adapter into W(t) first (materialize(peft_model.merge_and_unload(), steps)), or "
            "drop it (peft_model.get_base_model())"
        )
