"""The demo's pipeline (odeify.demo.run_demo, `make demo`) on a tiny Llama instead of SmolLM2:
every number it reports equals the same number computed here, independently of the demo."""

import copy
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import odeify.demo as demo
from odeify import get_block, odeify, steps
from odeify.assets import gpt2_tokenizer
from odeify.train.data import corpus, tokenize, windows

LAYERS = 4


def _tiny_llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,  # the demo evaluates windows of 512 tokens
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a fresh init has near-identical layers: give depth something to do
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "embed" not in name:
                p.normal_(0, 0.6 / p.shape[-1] ** 0.5)
    return model


def _greedy(model, tokenizer):
    ids = tokenizer(demo.PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return out[0, ids.shape[1] :].tolist()


def _loss(model, ids, **kw) -> float:
    with torch.no_grad():
        return model(ids, labels=ids, use_cache=False, **kw).loss.item()


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def _run(tmp_path, monkeypatch, tokenizer, perturb: bool):
    """run_demo on the tiny model; returns (results, the original, the demo's odeified model)."""
    original = _tiny_llama(tokenizer)
    converted = []

    def load():
        return copy.deepcopy(original), tokenizer

    def odeify_and_keep(model):
        odeify(model, progress=False)
        if perturb:  # an ODE that is not the original at N = L: the demo must not say it is
            with torch.no_grad():
                for name in get_block(model).names:
                    basis = get_block(model).basis_tensor(name)
                    basis.add_(torch.randn_like(basis) * 0.2 * basis.std())
        converted.append(model)
        return model

    monkeypatch.setattr(demo, "load_smollm2", load)
    monkeypatch.setattr(demo, "odeify", odeify_and_keep)
    results = demo.run_demo(
        tmp_path, tokens=512, step_counts=[2], calibrated=[2], calibrate_iters=2
    )
    return results, original, converted[0]


def test_the_demo_reports_what_its_models_do(tmp_path, monkeypatch, tokenizer):
    results, original, model = _run(tmp_path, monkeypatch, tokenizer, perturb=False)
    ids = windows(tokenize(corpus("shakespeare:hamlet"), tokenizer), 512, 1)
    assert results["layers"] == LAYERS and results["eval_tokens"] == 512

    # Fidelity at N = L: the hat fit is a copy, the ODE at L steps is the original's forward.
    assert results["max_fit_residual"] == 0.0
    with torch.no_grad():
        diff = (model(ids, use_cache=False).logits - original(ids, use_cache=False).logits).abs()
    assert results["max_abs_logit_diff_at_L"] == pytest.approx(diff.max().item(), abs=1e-6)
    assert results["max_abs_logit_diff_at_L"] < 1e-4
    original_tokens = _greedy(original, tokenizer)
    assert _greedy(model, tokenizer) == original_tokens
    assert results["greedy_tokens_equal_at_L"] is True
    assert results["greedy_original"] == tokenizer.decode(original_tokens, skip_special_tokens=True)

    # Perplexities: exp of the loss transformers computes, at each grid the demo names. The
    # demo sums float32 token losses in double; rel 1e-6 on the loss is float32's rounding.
    def close(ppl, loss):
        assert math.log(ppl) == pytest.approx(loss, rel=1e-6)

    close(results["original_perplexity"], _loss(original, ids))
    curve = results["perplexity_by_steps"]
    assert sorted(curve) == [2, LAYERS]
    close(curve[LAYERS], _loss(model, ids))
    with steps(model, 2, schedule="uniform"):  # the uniform sweep ran before calibration
        close(curve[2], _loss(model, ids))
        assert results["greedy_at_2_steps"] == tokenizer.decode(
            _greedy(model, tokenizer), skip_special_tokens=True
        )
    calibrated = results["calibrated"]["2"]
    assert calibrated["uniform_perplexity"] == curve[2]
    close(calibrated["calibrated_perplexity"], _loss(model, ids, ode_steps=2))
    assert calibrated["schedule"] == get_block(model).ode.schedules["2"]
    assert calibrated["calibrated_perplexity"] != pytest.approx(curve[2], rel=1e-3)

    assert json.loads((tmp_path / "results.json").read_text())["calibrated"]["2"] == calibrated
    assert (tmp_path / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert f"{calibrated['calibrated_perplexity']:,.2f}" in report
    assert "greedy tokens equal: True" in report


def test_the_demo_reports_an_unfaithful_conversion(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(demo, "plot_sweep", lambda *a: tmp_path / "perplexity.png")  # seconds
    results, original, model = _run(tmp_path, monkeypatch, tokenizer, perturb=True)
    assert _greedy(model, tokenizer) != _greedy(original, tokenizer)
    assert results["greedy_tokens_equal_at_L"] is False
    assert results["max_abs_logit_diff_at_L"] > 1e-2
