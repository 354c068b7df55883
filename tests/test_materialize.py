"""materialize: a stock transformers model with M layers that equals the ODE model at M steps."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

from odeify import materialize, odeify, steps

IDS = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


@pytest.fixture(params=["gpt2", "llama", "qwen3"])
def model(request, make_gpt2, make_llama):
    raw = make_gpt2() if request.param == "gpt2" else make_llama(request.param, num_hidden_layers=4)
    return odeify(raw, progress=False)


@pytest.mark.parametrize("m", [1, 2, 4, 7, 9])
def test_materialized_model_equals_the_ode_at_m_steps(model, m):
    plain = materialize(model, steps=m)
    assert (
        type(plain) in (GPT2LMHeadModel, LlamaForCausalLM) or "ForCausalLM" in type(plain).__name__
    )
    assert plain.config.num_hidden_layers == m and "odeify" not in plain.config.to_dict()
    with steps(model, m, "sequential"):
        torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=1e-5)


def test_materialized_model_loads_with_plain_transformers(model, tmp_path):
    plain = materialize(model, steps=6)
    plain.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(again), _logits(plain), rtol=0, atol=0)


def test_tied_embeddings_stay_tied(make_llama):
    model = odeify(make_llama(tie_word_embeddings=True), progress=False)
    plain = materialize(model, steps=5)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight


def test_layer_dependent_attention_scale_only_at_l(make_gpt2):
    model = odeify(make_gpt2(scale_attn_by_inverse_layer_idx=True), progress=False)
    torch.testing.assert_close(
        _logits(materialize(model, steps=4)), _logits(model), rtol=0, atol=1e-5
    )
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        materialize(model, steps=3)


def test_requires_an_odeified_model(make_gpt2):
    with pytest.raises(ValueError, match="not odeified"):
        materialize(make_gpt2(), steps=3)
