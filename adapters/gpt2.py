"""GPT-2 (``GPT2Model``, ``GPT2LMHeadModel`` and other GPT-2 heads).

Conv1D stores weights as [in, out]; odeify keeps every weight as [out, in] (nn.Linear's layout),
so these are transposed on conversion and on materialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

from odeify.family import AttentionLayout, Family, Projection, Stage
from odeify.weights import Weights


def _check_config(config) -> None:
    if config.add_cross_attention:
        raise ValueError(
            "GPT-2 with add_cross_attention=True is not supported: the cross-attention sublayer "
            "has no continuous-depth form in odeify. Convert a decoder-only GPT-2."
        )


def _scaling(config, step: Stage) -> float:
    head_dim = config.hidden_size // config.num_attention_heads
    scaling = head_dim**-0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        # Layer l scales by 1 / (l + 1); at time t the layer index is t * L.
        scaling /= step.t * step.num_layers + 1.0
    return scaling


def _upcast_attention(q, k, v, mask, scaling, dropout, training):
    """GPT-2's reorder_and_upcast_attn path: scores and softmax in float32."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores + mask
    probs = F.dropout(scores.softmax(dim=-1).type(v.dtype), p=dropout, training=training)
    return torch.matmul(probs, v).transpose(1, 2), probs


def _attention(x: Tensor, w: Weights, step: Stage) -> Tensor:
    config = step.module.config
    d, n_head = config.hidden_size, config.num_attention_heads
    h = w.layer_norm("ln_1", x, config.layer_norm_epsilon)
    q, k, v = w.linear("attn.c_attn", h).split(d, dim=2)
    shape = (*x.shape[:-1], n_head, d // n_head)
    q, k, v = (s.view(shape).transpose(1, 2) for s in (q, k, v))
    if step.cache is not None:
        k, v = step.cache.update(k, v, step.slot)
    dropout = config.attn_pdrop if step.module.training else 0.0
    scaling = _scaling(config, step)
    if config._attn_implementation == "eager" and config.reorder_and_upcast_attn:
        out, weights = _upcast_attention(q, k, v, step.mask, scaling, dropout, step.module.training)
    else:
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            config._attn_implementation, eager_attention_forward
        )
        out, weights = attend(
            step.module, q, k, v, step.mask, dropout=dropout, scaling=scaling, **step.extra
        )
    step.record_attention(weights)
    out = out.reshape(*out.shape[:-2], -1).contiguous()
    out = w.linear("attn.c_proj", out)
    return F.dropout(out, p=config.resid_pdrop, training=step.module.training)


def _mlp(x: Tensor, w: Weights, step: Stage) -> Tensor:
    config = step.module.config
    h = w.layer_norm("ln_2", x, config.layer_norm_epsilon)
    h = w.linear("mlp.c_proj", ACT2FN[config.activation_function](w.linear("mlp.c_fc", h)))
    return F.dropout(h, p=config.resid_pdrop, training=step.module.training)


def _attention_attrs(config) -> dict:
    # A named function, not a lambda: a model holding the family must pickle (torch.save).
    return {"is_causal": True, "num_key_value_groups": 1}


FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    stack="h",
    call_signature=(
        "hidden_states",
        "past_key_values",
        "attention_mask",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "use_cache",
    ),
    # The paper's weight groups: qkv jointly, attention out, fc, mlp out; one per norm.
    groups={
        "ln_1": "ln_1",
        "attn.c_attn": "qkv",
        "attn.c_proj": "attn_out",
        "ln_2": "ln_2",
        "mlp.c_fc": "fc",
        "mlp.c_proj": "mlp_out",
    },
    norms=("ln_1", "ln_2"),
    linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    output_projections=("attn.c_proj", "mlp.c_proj"),
    transposed=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    # c_attn, transposed to [3d, d]: its rows are q, k, v stacked.
    attention_layout=AttentionLayout(
        q=Projection("attn.c_attn.weight", 0, 3),
        k=Projection("attn.c_attn.weight", 1, 3),
        v=Projection("attn.c_attn.weight", 2, 3),
        o=Projection("attn.c_proj.weight"),
    ),
    attention=_attention,
    mlp=_mlp,
    check_config=_check_config,
    attention_attrs=_attention_attrs,
)
