"""The real model: SmolLM2-135M (Llama family, 30 layers, GQA) from the bundled GGUF file."""

import copy

import pytest
import torch

from odeify import get_block, materialize, odeify, steps
from odeify.assets import load_smollm2
from odeify.evaluate import perplexity
from odeify.train.data import corpus, tokenize, windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models():
    original, tokenizer = load_smollm2()
    ode = odeify(copy.deepcopy(original), progress=False)
    text = windows(tokenize(corpus("shakespeare:hamlet"), tokenizer), 256, max_windows=2)
    return original, ode, tokenizer, text


def test_exact_fit_and_logits_within_1e_4(models):
    original, ode, _, text = models
    assert max(get_block(ode).fit_residuals.values()) == 0.0
    with torch.no_grad():
        diff = (
            (ode(text, use_cache=False).logits - original(text, use_cache=False).logits)
            .abs()
            .max()
            .item()
        )
    assert diff <= 1e-4


def test_perplexity_equal_to_four_significant_digits(models):
    original, ode, _, text = models
    before, after = (
        perplexity(original, text, progress=False),
        perplexity(ode, text, progress=False),
    )
    assert f"{before:.4g}" == f"{after:.4g}"


def test_greedy_generation_equals_the_original(models):
    original, ode, tokenizer, _ = models
    ids = tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        a = original.generate(ids, max_new_tokens=16, do_sample=False)
        b = ode.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(a, b)


def test_materialized_15_layer_model_equals_15_steps(models):
    _, ode, _, text = models
    plain = materialize(ode, steps=15)
    assert plain.config.num_hidden_layers == 15
    with torch.no_grad(), steps(ode, 15):
        torch.testing.assert_close(
            plain(text[:1, :64]).logits, ode(text[:1, :64]).logits, rtol=0, atol=1e-4
        )
