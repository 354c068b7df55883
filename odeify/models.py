"""Odeified models as transformers classes of their own, so a saved folder says what it is.

Every stock model type odeify converts (``gpt2``, ``llama``, ``mistral``, ``qwen2``, ``qwen3``)
gets a config class with model type ``odeify-<type>`` (``OdeifyLlamaConfig``) and model classes
named after the stock ones (``OdeifyLlamaForCausalLM``, ``OdeifyLlamaModel``). Each subclasses
its stock class, so ``isinstance(model, LlamaForCausalLM)``, peft's module targeting and every
stock code path keep working; what it adds is the ODE block in place of the layers (built in
``post_init``), ``ode_steps=`` / ``ode_scheme=`` / ``ode_schedule=`` in ``forward``'s signature
(so ``generate`` passes them through) and the re-init of non-persistent buffers after a
meta-device load. ``odeify(model)`` switches a converted model (and its config) to these classes.

One model type per stock type, rather than one ``odeify`` type carrying the family: transformers
maps a model type to one config class, and a Qwen3 config is not a Llama config (other fields,
other defaults, another attention module), so the config class must be the stock type's own.

Importing odeify registers the causal-LM and base-model classes with transformers' Auto classes
through their public ``register`` API (the one change odeify makes to another library's state
on import): ``AutoModelForCausalLM.from_pretrained(folder)`` of a saved odeified model returns
the ODE model. Without odeify, transformers refuses the folder, naming the unknown model type.
Other heads (``GPT2ForSequenceClassification``...) get their class on demand, unregistered.

Example:
    >>> from transformers import AutoModelForCausalLM, GPT2LMHeadModel
    >>> _ = odeify.save_pretrained(model, "gpt2-ode")
    >>> loaded = AutoModelForCausalLM.from_pretrained("gpt2-ode")
    >>> type(loaded).__name__, loaded.config.model_type, isinstance(loaded, GPT2LMHeadModel)
    ('OdeifyGPT2LMHeadModel', 'odeify-gpt2', True)
    >>> torch.equal(loaded(ids).logits, model(ids).logits)
    True
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init

try:  # Private to transformers: the registry by class name that output capturing reads (5.2x).
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
except ImportError:  # releases that read _can_record_outputs off the model itself
    _CAN_RECORD_REGISTRY = {}

from .adapters import FAMILIES
from .bases import FourierUnit, fourier_frequencies
from .block import ODEBlock
from .family import ODEIFY_TYPE_PREFIX
from .surgery import is_odeified
from .weight_function import _ParamTree

_PREFIX = "Odeify"
# The per-call depth keywords the ODE block's bind() takes from the layer call.
DEPTH_KWARGS = ("ode_steps", "ode_scheme", "ode_schedule")
# The module device_map="auto" must keep on one device: the block integrates all of depth.
_NO_SPLIT = ("ODEBlock",)


# ----------------------------------------------------------------------------------- classes
def is_odeify_class(cls: type) -> bool:
    """Whether ``cls`` is one of odeify's config or model classes.

    Example:
        >>> is_odeify_class(type(model)), is_odeify_class(GPT2LMHeadModel)
        (True, False)
    """
    return getattr(cls, "_odeify_stock_class", None) is not None  # subclasses of them too


def stock_class(cls: type) -> type:
    """The stock transformers class an odeify class extends (``cls`` itself if stock).

    Example:
        >>> stock_class(type(model)).__name__
        'GPT2LMHeadModel'
    """
    return cls._odeify_stock_class if is_odeify_class(cls) else cls


def odeify_config_class(stock: type[PretrainedConfig]) -> type[PretrainedConfig]:
    """The odeify config class of a stock config class (of an odeify one: itself): model type
    ``odeify-<stock type>``.

    Example:
        >>> from transformers import LlamaConfig
        >>> odeify_config_class(LlamaConfig).model_type
        'odeify-llama'
        >>> odeify_config_class(odeify_config_class(LlamaConfig)) is odeify_config_class(LlamaConfig)
        True
    """
    # Cached by the stock class: one class per name, or pickle finds another object under it.
    return _config_class(stock_class(stock))


@functools.cache
def _config_class(stock: type[PretrainedConfig]) -> type[PretrainedConfig]:
    name = _PREFIX + stock.__name__
    cls = type(
        name,
        (stock,),
        {
            "model_type": ODEIFY_TYPE_PREFIX + stock.model_type,
            "_odeify_stock_class": stock,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{stock.__name__} of an odeified model; the ODE settings are ``odeify``.",
            "base_model_tp_plan": tp_plan(stock),
        },
    )
    setattr(sys.modules[__name__], name, cls)  # importable by name: pickle finds it
    return cls


def tp_plan(stock: type[PretrainedConfig]) -> dict[str, str] | None:
    """The tensor-parallel plan of an odeified base model: the stock plan's linears as the basis
    tensors that replace them, each sharded along the same dimension of the weight.

    A basis tensor is ``[K, out, in]`` (every linear, GPT-2's Conv1D included) under
    ``<stack>.0.basis.<module>.weight``. transformers' ``colwise`` style shards a parameter's
    second-to-last dimension (``out``) and ``rowwise`` its last (``in``), so the stock styles,
    named on the parameter rather than on a module, shard the basis as they shard the layers; W(t)
    is a sum over K, so each rank's shard of the basis gives its shard of every W(t). Left out,
    so replicated: norms (``replicated_with_grad_allreduce`` hooks a module's forward; a basis
    tensor has none), and linear biases (``[K, out]``, where ``colwise`` would shard K). None when
    the stock model has no plan (GPT-2).

    Example:
        >>> from transformers import LlamaConfig
        >>> tp_plan(LlamaConfig)["layers.*.basis.self_attn.q_proj.weight"]
        'colwise'
        >>> tp_plan(LlamaConfig)["layers.*.basis.mlp.down_proj.weight"]
        'rowwise'
    """
    plan = stock.base_model_tp_plan
    family = next((f for f in FAMILIES.values() if stock.model_type in f.model_types), None)
    if not plan or family is None:
        return None
    layer = f"{family.stack}.*."
    out = {}
    for key, style in plan.items():
        module = key[len(layer) :] if key.startswith(layer) else None
        if module is None:
            out[key] = style  # outside the block stack: the stock module is still there
        elif module in family.linears:
            out[f"{layer}basis.{module}.weight"] = style
    return out


def odeify_class(stock: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """The odeify model class of a stock transformers model class (of an odeify one: itself).

    Example:
        >>> odeify_class(GPT2LMHeadModel).__name__
        'OdeifyGPT2LMHeadModel'
        >>> odeify_class(odeify_class(GPT2LMHeadModel)) is odeify_class(GPT2LMHeadModel)
        True
    """
    return _model_class(stock_class(stock))


@functools.cache
def _model_class(stock: type[PreTrainedModel]) -> type[PreTrainedModel]:
    name = _PREFIX + stock.__name__
    namespace = {
        "config_class": odeify_config_class(stock.config_class),
        "_odeify_stock_class": stock,
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"{stock.__name__} with its block stack odeified (one ODE block).",
        "forward": _forward_with_depth(stock.forward),
        "_no_split_modules": list(_NO_SPLIT),
    }
    cls = type(name, (_OdeifyModel, stock), namespace)
    setattr(sys.modules[__name__], name, cls)
    return cls


def __getattr__(name: str) -> type:
    # Classes are made on first use; unpickling (or a config's `architectures`) names them.
    stock = getattr(transformers, name[len(_PREFIX) :], None) if name.startswith(_PREFIX) else None
    if isinstance(stock, type) and issubclass(stock, PretrainedConfig):
        return odeify_config_class(stock)
    if isinstance(stock, type) and issubclass(stock, PreTrainedModel):
        return odeify_class(stock)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def adopt(model: nn.Module) -> nn.Module:
    """Switch an odeified stock model, its inner base model and their config to the odeify
    classes, in place (no parameter or buffer changes; the classes add no state).

    Example:
        >>> plain = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2))
        >>> converted = odeify(plain, progress=False)   # odeify() adopts; so is it a no-op here
        >>> type(adopt(converted)).__name__, converted.config.model_type
        ('OdeifyGPT2LMHeadModel', 'odeify-gpt2')
    """
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            # device_map="auto" keeps these whole; the stock decoder layers are gone.
            module._no_split_modules = set(_NO_SPLIT)
        if isinstance(module, PreTrainedModel) and not is_odeify_class(type(module)):
            module.__class__ = odeify_class(type(module))
            # What PreTrainedModel.__init__ does for its class: output_hidden_states and
            # output_attentions find the outputs to record by the class's name.
            _CAN_RECORD_REGISTRY[module] = module._can_record_outputs
            config = module.config
            if not is_odeify_class(type(config)):
                set_config_class(config, odeify_config_class(type(config)))
    # The parallel plans were copied from the stock config when the model was built; they name
    # the removed layers. Rebuilt from the odeify config, inner models first (an outer model
    # merges its children's plans).
    inner_first = [m for m in model.modules() if isinstance(m, PreTrainedModel)][::-1]
    for module in inner_first:
        if hasattr(module, "init_parallel_plans"):  # transformers >= 5.2x
            module.init_parallel_plans()
    return model


def set_config_class(config: PretrainedConfig, cls: type[PretrainedConfig]) -> None:
    """Give ``config`` the class ``cls`` (a stock class and its odeify subclass have the same
    fields), and its model type: a config read from a file holds it as an instance attribute.

    Example:
        >>> from transformers import LlamaConfig
        >>> config = LlamaConfig.from_dict({"model_type": "llama", "hidden_size": 64})
        >>> set_config_class(config, odeify_config_class(LlamaConfig))
        >>> type(config).__name__, config.model_type, config.hidden_size
        ('OdeifyLlamaConfig', 'odeify-llama', 64)
    """
    config.__class__ = cls
    if "model_type" in vars(config):
        config.model_type = cls.model_type


# ----------------------------------------------------------------------- what the classes add
class _OdeifyModel:
    """What every odeify model class adds to its stock class (first in its bases)."""

    def post_init(self) -> None:
        """The stock post_init (init, tying), then the stack becomes the ODE block.

        On the meta device (transformers' from_pretrained) the block is left unset, for the
        checkpoint to fill; otherwise it is fitted to the freshly initialised layers, as
        ``odeify(Model(config))`` would be, with the config's ODE settings if it has them.
        """
        super().post_init()
        if is_odeified(self):
            return
        from .api import odeify

        meta = next(self.parameters()).device.type == "meta"
        settings = dict(getattr(self.config, "odeify", None) or {})
        for key in ("family", "version"):
            settings.pop(key, None)
        odeify(self, init="none" if meta else "fit", progress=False, **settings)

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=None, **kw):
        """transformers' switch, and its ``every_n_layers`` for the ODE block's steps: the block
        is one checkpointing layer to transformers, which would count it once."""
        if gradient_checkpointing_func is not None:
            kw["gradient_checkpointing_func"] = gradient_checkpointing_func
        super()._set_gradient_checkpointing(enable, **kw)
        for module in self.modules():
            if isinstance(module, ODEBlock):
                module.stepper.every = max(1, int(kw.get("every_n_layers", 1)))

    @classmethod
    def is_custom_code(cls) -> bool:
        """As the stock class: odeify's classes are stock classes whose init is the stock
        ``_init_weights`` (transformers' init functions, which skip loaded tensors). As "custom
        code" transformers would skip the init of modules without parameters of their own, such
        as GPT-2's attention, which gives its ``c_proj`` the depth-scaled init."""
        return stock_class(cls).is_custom_code()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FourierUnit):
            # Its frequencies are a non-persistent buffer: not in the checkpoint, so after a
            # meta-device load they are recomputed here, as transformers does for RoPE's.
            hf_init.copy_(module.freqs, fourier_frequencies(module.freqs.numel()))
        if isinstance(module, _ParamTree) and module._parameters:
            # transformers inits the modules that hold uninitialised parameters: the basis
            # trees' leaves (the block holds none itself). The first leaf inits the whole basis.
            block = next(
                (
                    m
                    for m in self.modules()
                    if isinstance(m, ODEBlock) and any(t is module for t in m.basis.modules())
                ),
                None,
            )
            if block is not None:
                self._init_block(block)

    @torch.no_grad()
    def _init_block(self, block: ODEBlock) -> None:
        """The basis fitted to freshly initialised stock layers, as ``post_init`` fits it: what a
        meta-device load (``from_pretrained``) gives the basis tensors the checkpoint lacks.

        The layers are drawn as the stock model's init draws them (built without drawing, then
        the stock ``_init_weights`` over each layer's modules in transformers' order), so under
        one seed the result equals ``odeify(Model(config))``. Tensors the load filled (marked
        ``_is_hf_initialized``) are kept; with all of them filled nothing is built.
        """
        params = dict(block.basis.named_parameters())
        loaded = {n for n, p in params.items() if getattr(p, "_is_hf_initialized", False)}
        first = next(iter(params.values()))
        if len(loaded) == len(params) or first.device.type == "meta":
            return
        stock = stock_class(type(self))
        # The stack's layer class: the module the stock model keeps whole under device_map.
        layer_class = getattr(sys.modules[stock.__module__], stock._no_split_modules[0])
        with torch.device("meta"):  # no random draws at construction: init draws them below
            layers = nn.ModuleList(
                layer_class(self.config, layer_idx=i) for i in range(block.ode.num_layers)
            )
        layers.to_empty(device=first.device).to(first.dtype)
        for layer in layers:
            for module in _post_order(layer):  # transformers' smart_apply order and entry point
                self._initialize_weights(module)
        samples = {
            name: torch.stack(
                [
                    p.t() if block.family.is_transposed(name) else p
                    for p in (layer.get_parameter(name) for layer in layers)
                ]
            )
            for name in block.names
        }
        kept = {n: params[n].clone() for n in loaded}
        block.fit(samples, progress=False)
        for name, value in kept.items():
            params[name].copy_(value)
        for p in params.values():
            p._is_hf_initialized = True  # the other leaves find the basis done


def _post_order(module: nn.Module):
    """A module's submodules, children before their parent (the order transformers inits in)."""
    for child in module.children():
        yield from _post_order(child)
    yield module


def _forward_with_depth(stock_forward):
    """``stock_forward`` with the per-call depth keywords in its signature.

    transformers' generate() passes on only the keywords ``forward``'s signature names, so they
    are added to it; they travel down the forward's ``**kwargs`` to the ODE block's layer call,
    which reads them for that call alone (no shared setting changes).
    """

    @functools.wraps(stock_forward)
    def forward(self, *args, ode_steps=None, ode_scheme=None, ode_schedule=None, **kwargs):
        depth = {"ode_steps": ode_steps, "ode_scheme": ode_scheme, "ode_schedule": ode_schedule}
        kwargs.update({k: v for k, v in depth.items() if v is not None})
        return stock_forward(self, *args, **kwargs)

    signature = inspect.signature(stock_forward)
    params = [p for p in signature.parameters.values() if p.name not in DEPTH_KWARGS]
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    extra = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in DEPTH_KWARGS
    ]
    forward.__signature__ = signature.replace(parameters=params[:at] + extra + params[at:])
    return forward


# ------------------------------------------------------------------------------ registration
def register_auto_classes() -> None:
    """Register every converted model type's config, base-model and causal-LM classes with
    transformers' Auto classes (``import odeify`` does; calling it again changes nothing).

    Example:
        >>> register_auto_classes()
        >>> transformers.AutoConfig.for_model("odeify-llama").__class__.__name__
        'OdeifyLlamaConfig'
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_MAPPING,
    )

    for family in FAMILIES.values():
        for model_type in family.model_types:
            stock_config = CONFIG_MAPPING[model_type]
            config = odeify_config_class(stock_config)
            transformers.AutoConfig.register(config.model_type, config, exist_ok=True)
            for auto, mapping in (
                (transformers.AutoModel, MODEL_MAPPING),
                (transformers.AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING),
            ):
                auto.register(config, odeify_class(mapping[stock_config]), exist_ok=True)


__all__ = [
    "adopt",
    "tp_plan",
    "set_config_class",
    "register_auto_classes",
    "is_odeify_class",
    "odeify_class",
    "odeify_config_class",
    "stock_class",
]
