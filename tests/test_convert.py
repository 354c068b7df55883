"""Conversion fidelity: at N = L with the sequential scheme and an exact basis, the odeified model
computes the original's logits, for every supported family and config option."""

import pytest
import torch
from transformers import GPT2Config, GPT2Model, T5Config, T5ForConditionalGeneration

from odeify import get_block, odeify, steps

IDS = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def _max_diff(model, ids=IDS, **convert):
    with torch.no_grad():
        before = model(ids).logits
        odeify(model, progress=False, **convert)
        after = model(ids).logits
    return (before - after).abs().max().item()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_layer": 6, "n_embd": 48, "n_head": 6},
        {"n_inner": 80, "activation_function": "relu"},
        {"activation_function": "gelu"},
        {"scale_attn_weights": False},
        {"scale_attn_by_inverse_layer_idx": True},
        {"reorder_and_upcast_attn": True, "attn_implementation": "eager"},
        {"attn_implementation": "eager"},
        {"n_layer": 1},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_gpt2_exact_at_L(make_gpt2, overrides):
    assert _max_diff(make_gpt2(**overrides)) <= 1e-5


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("llama", {}),
        ("llama", {"num_key_value_heads": 4}),  # MHA
        ("llama", {"num_key_value_heads": 1}),  # MQA
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("llama", {"head_dim": 16}),
        ("llama", {"tie_word_embeddings": True, "num_hidden_layers": 5}),
        ("llama", {"hidden_act": "gelu"}),
        (
            "llama",
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        ),
        ("llama", {"attn_implementation": "eager"}),
        ("mistral", {"sliding_window": 4}),
        ("qwen2", {}),
        ("qwen3", {}),
    ],
    ids=lambda x: (
        x if isinstance(x, str) else (",".join(f"{k}={v}" for k, v in x.items()) or "default")
    ),
)
def test_llama_family_exact_at_L(make_llama, model_type, overrides):
    assert _max_diff(make_llama(model_type, **overrides)) <= 1e-5


def test_base_model_without_head_is_converted(make_gpt2):
    base = make_gpt2().transformer
    with torch.no_grad():
        before = base(IDS).last_hidden_state
        odeify(base, progress=False)
        after = base(IDS).last_hidden_state
    assert isinstance(base, GPT2Model)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_parameter_count_is_unchanged_with_exact_basis(make_llama):
    model = make_llama()
    count = sum(p.numel() for p in model.parameters())
    odeify(model, progress=False)
    assert sum(p.numel() for p in model.parameters()) == count


def test_every_block_parameter_varies_with_t(make_gpt2):
    model = make_gpt2()
    names = {n for n, _ in model.transformer.h[0].named_parameters()}
    block = get_block(odeify(model, progress=False))
    assert set(block.names) == names
    # A parameter that differs across layers must differ across t.
    w = block.weights_at([0.0, 0.25])
    assert all(not torch.equal(w[n][0], w[n][1]) for n in names)


@pytest.mark.parametrize("basis", ["chebyshev", "legendre"])
def test_smooth_basis_with_k_equal_l_fits_the_layers(make_gpt2, basis):
    model = make_gpt2()
    block = get_block(odeify(model, basis=basis, progress=False))
    assert max(block.fit_residuals.values()) < 1e-4


@pytest.mark.parametrize("basis", ["hat", "chebyshev", "fourier"])
def test_compression_reports_each_residual(make_gpt2, basis):
    model = make_gpt2(n_layer=6)
    block = get_block(odeify(model, basis=basis, num_basis=3, progress=False))
    assert set(block.fit_residuals) == set(block.names)
    assert all(0 <= r < 1.5 for r in block.fit_residuals.values())
    # Six independent random layers cannot be fitted by three basis tensors.
    assert max(block.fit_residuals.values()) > 0.1
    assert block.basis_tensor("attn.c_attn.weight").shape[0] == 3


def test_fourier_unit_has_one_time_unit_per_weight_group(make_llama):
    block = get_block(odeify(make_llama(), basis="fourier", num_basis=5, progress=False))
    assert set(block.time_basis) == {
        "norm_attn",
        "q",
        "k",
        "v",
        "o",
        "norm_mlp",
        "gate",
        "up",
        "down",
    }
    assert block.basis_tensor("self_attn.q_proj.weight").shape[0] == 5


def test_refuses_encoder_decoder():
    model = T5ForConditionalGeneration(
        T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50)
    )
    with pytest.raises(ValueError, match="encoder-decoder.*Supported families: gpt2"):
        odeify(model)


def test_refuses_unknown_family():
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(ValueError, match="no adapter for BertModel.*Supported families.*adapters"):
        odeify(model)


def test_refuses_already_odeified(make_gpt2):
    model = odeify(make_gpt2(), progress=False)
    with pytest.raises(ValueError, match="already odeified"):
        odeify(model)


def test_refuses_cross_attention():
    model = GPT2Model(GPT2Config(n_layer=2, n_embd=16, n_head=2, add_cross_attention=True))
    with pytest.raises(ValueError, match="add_cross_attention"):
        odeify(model)


def test_refuses_mixed_layer_types(make_llama):
    model = make_llama(
        "qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2
    )
    with pytest.raises(ValueError, match="mixed layer types"):
        odeify(model)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_basis": 0}, "num_basis"),
        ({"num_basis": 2.5}, "num_basis"),
        ({"basis": "spline"}, "unknown basis"),
        ({"scheme": "rk5"}, "unknown scheme"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"init": "random-ish"}, "init must be"),
        ({"steps": 10**18}, "steps must be at most 100,000"),
        ({"discrete_ends": 1, "steps": 2}, "discrete_ends = 1 a grid needs more than 2 steps"),
    ],
)
def test_bad_arguments_fail_before_any_change(make_gpt2, kwargs, match):
    model = make_gpt2()
    with pytest.raises((ValueError, TypeError), match=match):
        odeify(model, progress=False, **kwargs)
    assert len(model.transformer.h) == 4 and "odeify" not in model.config.to_dict()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_states_and_attentions_are_reported_per_step(make_gpt2, make_llama, family):
    model = (
        make_gpt2(attn_implementation="eager")
        if family == "gpt2"
        else make_llama(attn_implementation="eager")
    )
    with torch.no_grad():
        before = model(IDS, output_hidden_states=True, output_attentions=True)
        odeify(model, progress=False)
        after = model(IDS, output_hidden_states=True, output_attentions=True)
        with steps(model, 6):
            six = model(IDS, output_hidden_states=True, output_attentions=True)
    for name in ("hidden_states", "attentions"):
        assert len(getattr(after, name)) == len(getattr(before, name))
        for a, b in zip(getattr(after, name), getattr(before, name), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert len(six.hidden_states) == 7 and len(six.attentions) == 6
