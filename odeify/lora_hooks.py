"""How a live peft LoRA adapter reaches the ODE block's weight function during its forward.

peft applies a ``target_parameters`` adapter only while the module that owns the parameter is
being called (it registers a parametrisation around that call). The ODE block never calls its
basis modules; it reads the tensors by attribute. So :func:`attach`, called by the block's
constructor, gives the block a forward pre-hook and post-hook. The pre-hook reads each live
adapter's factors (peft's ``get_delta_factors``: dB_k = s B_k A_k) and puts them into the weight
function's low-rank slot (:meth:`odeify.weight_function.WeightFunction.set_low_rank`), with the
adapter state (active adapters, disabled, merged) that keys the grid cache; the post-hook
empties the slot. Wrappers peft cannot factor (one basis tensor, K = 1) fall back to peft's own
parametrisation for the forward. Nothing is registered globally: the hooks belong to the block,
and ``copy.deepcopy`` of a model copies them with it (each copy's hooks act on that copy).
"""

from __future__ import annotations

import contextlib
import sys

from torch import nn

from . import local
from .weight_function import WeightFunction


def attach(block: WeightFunction) -> None:
    """Give an ODE block the forward hooks that bring live peft adapters into its forward.

    Example:
        >>> wf = WeightFunction({"fc.weight": torch.Size([3, 2])}, "hat", 4, 4, {}, lambda n: "mlp")
        >>> attach(wf)   # the ODEBlock constructor does this for its block
        >>> len(wf._forward_pre_hooks), len(wf._forward_hooks)
        (1, 1)
    """
    hooks = _LiveAdapters()
    block.register_forward_pre_hook(hooks.before, with_kwargs=True)
    block.register_forward_hook(hooks.after, with_kwargs=True, always_call=True)


def _wrappers(block: WeightFunction) -> list[tuple[str, nn.Module]]:
    """(basis module path, wrapper) of every peft ParamWrapper under the block's basis."""
    layer = sys.modules.get("peft.tuners.lora.layer")  # no peft imported: no wrappers to find
    if layer is None:
        return []
    return [
        (name.replace(".base_layer", ""), m)
        for name, m in block.basis.named_modules()
        if isinstance(m, layer.ParamWrapper)
    ]


def _adapter_state(wrappers: list[tuple[str, nn.Module]]) -> tuple:
    # What decides the adapted weights besides parameter values; the weight cache keys on
    # parameter versions, which set_adapter / disable_adapter() / merging leave alone.
    return tuple(
        (id(w), tuple(w.active_adapters), w.disable_adapters, w.merged) for _, w in wrappers
    )


class _LiveAdapters:
    """The pre/post hook pair of one block; holds peft's fallback contexts between the two, for
    the calling thread (the slot itself is per thread too: see :mod:`odeify.local`)."""

    def before(self, block: WeightFunction, args, kwargs) -> None:
        wrappers = _wrappers(block)
        factors: dict[str, list] = {}
        fallback = []
        for path, w in wrappers:
            if w.disable_adapters or w.merged:
                continue
            adapters = [a for a in w.active_adapters if a in w.lora_A]
            if w.num_experts > 1 and w.get_param().dim() == 3:
                # Kept as factors: the block adds sum_k c_k(t) s B_k A_k x per step (cheap) instead
                # of forming W + dW for all K and a full-size weight gradient.
                name = f"{path}.{w.parameter_name}"
                factors.setdefault(name, []).extend(w.get_delta_factors(a) for a in adapters)
            elif adapters:
                fallback.append(w)
        block.set_low_rank(factors, _adapter_state(wrappers))
        opened = None
        if fallback:
            with contextlib.ExitStack() as stack:
                for w in fallback:
                    # The context a ParamWrapper's own forward runs its base layer in (peft 0.21).
                    stack.enter_context(w._activate_lora(w.active_adapters))
                opened = stack.pop_all()
        local.put(self, "fallback", opened)

    def after(self, block: WeightFunction, args, kwargs, output) -> None:
        block.set_low_rank()
        opened = local.get(self, "fallback")
        if opened is not None:
            local.put(self, "fallback", None)
            opened.close()
