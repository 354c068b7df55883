"""KV-cached generation through the ODE block: one cache slot per (step, stage)."""

import copy

import pytest
import torch
from transformers import DynamicCache

from odeify import get_block, odeify, steps

PROMPT = torch.tensor([[5, 17, 42, 8, 61, 3]])


def _greedy(model, ids=PROMPT, n=8, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


@pytest.fixture(params=["gpt2", "llama"])
def pair(request, make_gpt2, make_llama):
    raw = make_gpt2() if request.param == "gpt2" else make_llama(num_hidden_layers=4)
    return raw, odeify(copy.deepcopy(raw), progress=False)


def test_greedy_tokens_at_L_equal_the_original(pair):
    original, model = pair
    assert torch.equal(_greedy(model, n=12), _greedy(original, n=12))


@pytest.mark.parametrize(
    "scheme,n", [("sequential", 2), ("sequential", 7), ("euler", 3), ("midpoint", 3), ("rk4", 2)]
)
def test_cached_generation_equals_uncached_at_any_grid(pair, scheme, n):
    _, model = pair
    with steps(model, n, scheme):
        assert torch.equal(_greedy(model), _greedy(model, use_cache=False))


def test_step_count_changes_between_generate_calls(pair):
    _, model = pair
    at_l = _greedy(model)
    with steps(model, 2):
        _greedy(model)
    with steps(model, 9, "heun"):
        _greedy(model)
    assert torch.equal(_greedy(model), at_l)


def test_left_padded_batch_equals_each_prompt_alone(pair):
    _, model = pair
    short, long = [9, 4, 33], [5, 17, 42, 8, 61, 3]
    ids = torch.tensor([[0] * 3 + short, long])
    mask = torch.tensor([[0] * 3 + [1] * 3, [1] * 6])
    with steps(model, 3):
        batch = _greedy(model, ids, attention_mask=mask)
        alone = [_greedy(model, torch.tensor([p])) for p in (short, long)]
    assert torch.equal(batch[0, 3:], alone[0][0])
    assert torch.equal(batch[1], alone[1][0])


def test_a_cache_filled_at_another_step_count_is_refused(pair):
    _, model = pair
    with torch.no_grad(), steps(model, 4):
        cache = model(PROMPT, use_cache=True).past_key_values
    with (
        torch.no_grad(),
        steps(model, 2),
        pytest.raises(ValueError, match="filled at 4 steps.*runs 2 steps"),
    ):
        model(PROMPT[:, :1], past_key_values=cache, use_cache=True)


def test_a_cache_filled_under_another_scheme_is_refused(pair):
    # midpoint and heun: two stages each, so the same number of slots at the same N; only the
    # recorded scheme tells the cache's keys (at midpoint times) from heun's.
    _, model = pair
    with torch.no_grad(), steps(model, 3, "midpoint"):
        cache = model(PROMPT, use_cache=True).past_key_values
    with (
        torch.no_grad(),
        steps(model, 3, "heun"),
        pytest.raises(ValueError, match="filled at 3 steps of 'midpoint'.*3 steps of 'heun'"),
    ):
        model(PROMPT[:, :1], past_key_values=cache, use_cache=True)


def test_an_exception_inside_steps_restores_the_model(pair):
    _, model = pair
    settings, tokens = dict(model.config.odeify), _greedy(model)
    with torch.no_grad():
        at_l = model(PROMPT).logits
        at_2 = model(PROMPT, ode_steps=2, ode_scheme="rk4").logits
    with pytest.raises(RuntimeError, match="inside"), steps(model, 2, "rk4", schedule="uniform"):
        with torch.no_grad():  # in effect inside: 2 steps of rk4
            assert torch.equal(model(PROMPT).logits, at_2)
        raise RuntimeError("inside")
    assert dict(model.config.odeify) == settings
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, at_l)
    assert torch.equal(_greedy(model), tokens)


def test_a_cache_from_the_original_model_is_refused(pair):
    original, model = pair
    with torch.no_grad():
        cache = original(PROMPT, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="odeify did not write"):
            model(PROMPT[:, :1], past_key_values=cache, use_cache=True)


def test_user_supplied_lazy_cache_grows_to_the_grid(pair):
    _, model = pair
    cache = DynamicCache()
    with torch.no_grad(), steps(model, 3, "rk4"):
        model(PROMPT, past_key_values=cache, use_cache=True)
    assert len(cache.layers) == 12 and cache.get_seq_length() == PROMPT.shape[1]


def test_adaptive_solver_generates_without_cache_and_refuses_one(pair):
    _, model = pair
    get_block(model).ode.rtol = get_block(model).ode.atol = 1e-2
    with steps(model, 4, "dopri5"):
        out = _greedy(model, n=2, use_cache=False)
        assert out.shape == (1, PROMPT.shape[1] + 2)
        with pytest.raises(ValueError, match="use_cache=False"):
            _greedy(model, n=2)


def test_static_cache_generation(pair):
    _, model = pair
    with steps(model, 5):
        assert torch.equal(
            _greedy(model, cache_implementation="static"), _greedy(model, use_cache=False)
        )
