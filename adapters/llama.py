"""The Llama family: Llama, and the look-alikes whose blocks match it (Mistral, Qwen2, Qwen3).

RoPE, grouped-query attention, RMSNorm and SwiGLU; optional attention and MLP biases (Qwen2's
q/k/v biases), per-head q/k RMSNorm (Qwen3), a sliding window when every layer uses the same one.
"""

from __future__ import annotations

from torch import Tensor
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from odeify.family import AttentionLayout, Family, Projection, Stage, stock_model_type
from odeify.weights import Weights


def _layer_type(config) -> str:
    return (getattr(config, "layer_types", None) or ["full_attention"])[0]


def _check_config(config) -> None:
    layer_types = getattr(config, "layer_types", None) or []
    if len(set(layer_types)) > 1:
        raise ValueError(
            f"{config.model_type} with mixed layer types {sorted(set(layer_types))} is not supported: "
            "a continuous-depth block needs every layer to attend the same way. Use a config whose "
            "layers all share one attention type (e.g. use_sliding_window=False)."
        )
    if _layer_type(config) not in ("full_attention", "sliding_attention"):
        raise ValueError(f"{config.model_type} layer type {_layer_type(config)!r} is not supported")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError(
            "pretraining_tp > 1 is not supported; set config.pretraining_tp = 1 (same model)"
        )


def _sliding_window(config) -> int | None:
    if stock_model_type(config) == "mistral":
        return getattr(config, "sliding_window", None)
    return config.sliding_window if _layer_type(config) == "sliding_attention" else None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _attention(x: Tensor, w: Weights, step: Stage) -> Tensor:
    config = step.module.config
    eps, head_dim = config.rms_norm_eps, _head_dim(config)
    h = w.rms_norm("input_layernorm", x, eps)
    shape = (*x.shape[:-1], -1, head_dim)
    q = w.linear("self_attn.q_proj", h).view(shape)
    k = w.linear("self_attn.k_proj", h).view(shape)
    v = w.linear("self_attn.v_proj", h).view(shape).transpose(1, 2)
    if "self_attn.q_norm.weight" in w:  # Qwen3
        q, k = w.rms_norm("self_attn.q_norm", q, eps), w.rms_norm("self_attn.k_norm", k, eps)
    cos, sin = step.position_embeddings
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    if step.cache is not None:
        k, v = step.cache.update(k, v, step.slot)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(
        config._attn_implementation, eager_attention_forward
    )
    out, weights = attend(
        step.module,
        q,
        k,
        v,
        step.mask,
        dropout=config.attention_dropout if step.module.training else 0.0,
        scaling=head_dim**-0.5,
        sliding_window=_sliding_window(config),
        **step.extra,
    )
    step.record_attention(weights)
    return w.linear("self_attn.o_proj", out.reshape(*x.shape[:-1], -1).contiguous())


def _mlp(x: Tensor, w: Weights, step: Stage) -> Tensor:
    config = step.module.config
    h = w.rms_norm("post_attention_layernorm", x, config.rms_norm_eps)
    act = ACT2FN[config.hidden_act]
    return w.linear("mlp.down_proj", act(w.linear("mlp.gate_proj", h)) * w.linear("mlp.up_proj", h))


def _attention_attrs(config) -> dict:
    # A named function, not a lambda: a model holding the family must pickle (torch.save).
    return {
        "is_causal": True,
        "num_key_value_groups": config.num_attention_heads // config.num_key_value_heads,
    }


FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    stack="layers",
    call_signature=(
        "hidden_states",
        "attention_mask",
        "position_ids",
        "past_key_values",
        "use_cache",
        "position_embeddings",
    ),
    # The paper's Llama weight groups: q, k, v, o, gate, up, down; one per norm.
    groups={
        "input_layernorm": "norm_attn",
        "self_attn.q_proj": "q",
        "self_attn.q_norm": "q",
        "self_attn.k_proj": "k",
        "self_attn.k_norm": "k",
        "self_attn.v_proj": "v",
        "self_attn.o_proj": "o",
        "post_attention_layernorm": "norm_mlp",
        "mlp.gate_proj": "gate",
        "mlp.up_proj": "up",
        "mlp.down_proj": "down",
    },
    norms=("input_layernorm", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm"),
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    output_projections=("self_attn.o_proj", "mlp.down_proj"),
    attention_layout=AttentionLayout(
        q=Projection("self_attn.q_proj.weight"),
        k=Projection("self_attn.k_proj.weight"),
        v=Projection("self_attn.v_proj.weight"),
        o=Projection("self_attn.o_proj.weight"),
    ),
    attention=_attention,
    mlp=_mlp,
    check_config=_check_config,
    attention_attrs=_attention_attrs,
)
