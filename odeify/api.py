"""The public verbs: odeify a model, retarget its steps, materialise it back to a stock model."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from .adapters import family_for
from .bases import default_num_basis, make_basis
from .block import ODEBlock
from .config import ODEConfig, ODESettings
from .diffeqformer import random_init
from .family import Family
from .schemes import check_steps, resolve_solver, spans, stage_times
from .weight_function import WeightFunction, _get

_INITS = ("fit", "random", "none")


def _stack_of(model: nn.Module, family: Family) -> tuple[nn.Module, nn.ModuleList]:
    base = getattr(model, "base_model", model)
    stack = getattr(base, family.stack, None)
    if not isinstance(stack, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no block stack at .{family.stack}; odeify expects a "
            f"transformers {family.name} model (e.g. a *ForCausalLM or the base *Model)"
        )
    return base, stack


def get_block(model: nn.Module) -> ODEBlock:
    """The ODE block of an odeified model (raises if the model was not odeified).

    Example:
        >>> block = odeify.get_block(odeify.odeify(model))   # doctest: +SKIP
        >>> block.ode.num_layers                              # doctest: +SKIP
        12
    """
    for module in model.modules():
        if isinstance(module, ODEBlock):
            return module
    raise ValueError(f"{type(model).__name__} is not odeified: call odeify(model) first")


def _layer_samples(
    family: Family, stack: nn.ModuleList
) -> tuple[dict[str, torch.Size], dict[str, torch.Tensor]]:
    """Every block parameter stacked over layers as [L, *shape], linear weights as [out, in]."""
    reference = dict(stack[0].named_parameters())
    for layer, block in enumerate(stack):
        params = dict(block.named_parameters())
        if params.keys() != reference.keys() or any(
            p.shape != reference[n].shape for n, p in params.items()
        ):
            raise ValueError(
                f"block {layer} has different parameters than block 0; odeify needs identical blocks"
            )
    for name in reference:
        family.group_of(name)  # every parameter must belong to a declared weight group
        if (
            family.is_transposed(name)
            and _get(stack[0], name[: -len(".weight")]).__class__.__name__ != "Conv1D"
        ):
            raise ValueError(
                f"{family.name} adapter declares {name} transposed but it is not a Conv1D weight"
            )

    def sample(block: nn.Module, name: str) -> torch.Tensor:
        p = _get(block, name).detach()
        return p.t() if family.is_transposed(name) else p

    samples = {name: torch.stack([sample(b, name) for b in stack]) for name in reference}
    return {name: s.shape[1:] for name, s in samples.items()}, samples


def odeify(
    model: nn.Module,
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

    Args:
        model: a transformers GPT-2 or Llama-family model (``*ForCausalLM`` or the base model).
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
    family = family_for(model)
    if any(isinstance(m, ODEBlock) for m in model.modules()):
        raise ValueError("this model is already odeified; use odeify.steps(...) to retarget it")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if scheme is None:
        scheme = "euler" if init == "random" else "sequential"
    family.check_config(model.config)
    base, stack = _stack_of(model, family)
    num_layers = options.pop("num_layers", len(stack))
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
        check_steps(steps)
    probe = make_basis(ode.basis, ode.num_basis, ode.num_layers, **ode.basis_kwargs)
    if init == "random" and not probe.learned:
        raise ValueError(
            f"init='random' builds DiffEqFormer's learned time units: use basis='fourier'. With "
            f"the fixed basis {ode.basis!r}, init='fit' on a freshly built model fits its random layers"
        )

    first = next(stack[0].parameters())
    if init in ("fit", "random"):
        shapes, samples = _layer_samples(family, stack)
    else:
        shapes, samples = _layer_samples(family, stack[:1])[0], None
    block = ODEBlock(family, model.config, ode, shapes, first.dtype, first.device)
    if init == "fit":
        block.fit(samples, progress=progress)
    elif init == "random":
        random_init(block, samples)
    block.train(model.training)
    setattr(base, family.stack, nn.ModuleList([block]))  # its settings are model.config.odeify
    return model


def _set(model: nn.Module, steps, scheme: str | None) -> tuple:
    ode = get_block(model).ode
    before = (ode.steps, ode.scheme)
    changes = {"steps": steps, "scheme": scheme}
    ode.update(**{key: value for key, value in changes.items() if value is not None})
    return before


def set_steps(model: nn.Module, steps: int | None = None, scheme: str | None = None) -> nn.Module:
    """Change the default step count and/or scheme of an odeified model (saved with it).

    Example:
        >>> odeify.set_steps(model, 24, scheme="rk4")   # doctest: +SKIP
    """
    if isinstance(steps, (torch.Tensor, list, tuple)):
        raise TypeError(
            "set_steps saves one step count; use odeify.steps(...) for per-sample counts"
        )
    _set(model, steps, scheme)
    return model


@contextlib.contextmanager
def steps(model: nn.Module, steps, scheme: str | None = None) -> Iterator[nn.Module]:
    """Run an odeified model at another step count (and scheme) inside a ``with`` block.

    ``steps`` is an int, or one count per sample ([B] integer tensor): each sample is then
    integrated on its own grid, as if it ran alone (padded steps leave finished samples as they
    are). That is how per-request depth reaches ``generate()``; a single forward can also take
    ``ode_steps=`` directly.

    Example:
        >>> with odeify.steps(model, 6):       # doctest: +SKIP
        ...     logits = model(ids).logits     # half the compute of a 12-layer model
        >>> with odeify.steps(model, torch.tensor([8, 30, 12])):   # doctest: +SKIP
        ...     out = model.generate(ids, max_new_tokens=20)
    """
    before = _set(model, steps, scheme)
    try:
        yield model
    finally:
        get_block(model).ode.update(steps=before[0], scheme=before[1])


@torch.no_grad()
def materialize(model: nn.Module, steps: int) -> nn.Module:
    """A stock transformers model with ``steps`` layers equal to the ODE model at that many
    ``sequential`` steps: layer i holds W(t_i), output projections scaled by the layers step i
    spans (t_i = i / steps and L / steps, or the grid of ``discrete_ends``).

    Example:
        >>> plain = odeify.materialize(model, steps=18)   # doctest: +SKIP
        >>> plain.config.num_hidden_layers                # doctest: +SKIP
        18
    """
    weight_fn: WeightFunction = get_block(model)
    ode, family = ODESettings(model.config), family_for(model)
    count = check_steps(steps)
    num_layers = ode.num_layers
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False) and count != num_layers:
        raise ValueError(
            "scale_attn_by_inverse_layer_idx scales layer l by 1 / (l + 1), which a stock model "
            f"with {count} layers cannot express for an ODE of depth {num_layers}; materialise at "
            f"steps={num_layers} or use a config without it"
        )
    config = copy.deepcopy(model.config)
    del config.odeify
    config.num_hidden_layers = count
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * count
    plain = type(model)(config).to(
        device=weight_fn.basis_tensor(weight_fn.names[0]).device, dtype=model.dtype
    )
    _, stack = _stack_of(model, family)
    prefix = next(name for name, module in model.named_modules() if module is stack) + "."
    outer = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    missing, unexpected = plain.load_state_dict(outer, strict=False)
    if unexpected or any(not k.startswith(prefix) for k in missing):
        raise RuntimeError(
            f"materialize: state mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    ends = ode.discrete_ends
    times, _ = stage_times(resolve_solver("sequential").native, count, num_layers, ends)
    weights = weight_fn.weights_at(times)
    scales = spans(count, num_layers, ends)
    for i, layer in enumerate(_stack_of(plain, family)[1]):
        for name in weight_fn.names:
            w = weights[name][i]
            if name.rsplit(".", 1)[0] in family.output_projections and scales[i] != 1.0:
                w = w * scales[i]
            _get(layer, name).copy_(w.t() if family.is_transposed(name) else w)
    return plain.train(model.training)
