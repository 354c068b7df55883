"""discrete_ends: the first and last d layers stay discrete at every step count (the grid of
odeify.schemes.spans), exact at N = L, materialised exactly, refused where it cannot hold."""

import copy

import pytest
import torch

import odeify
from odeify.schemes import SCHEMES, layer_bounds, spans, stage_times
from odeify.train.distill import matching, recording


def _stock_states(model, ids):
    """The original's hidden state after each of its layers."""
    with torch.no_grad():
        return model(ids, use_cache=False, output_hidden_states=True).hidden_states[1:]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("ends", [1, 2])
def test_end_steps_are_the_end_layers_at_every_step_count(family, ends, make_gpt2, make_llama):
    stock = make_gpt2(n_layer=6) if family == "gpt2" else make_llama(num_hidden_layers=6)
    ids = torch.randint(1, 97, (2, 9))
    states = _stock_states(stock, ids)
    model = odeify.odeify(copy.deepcopy(stock), discrete_ends=ends, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, use_cache=False).logits, stock(ids, use_cache=False).logits, rtol=0, atol=0
        )
    for n in (2 * ends + 1, 5, 6, 12):
        with torch.no_grad(), recording(model) as mine:
            model(ids, use_cache=False, ode_steps=n)
        assert len(mine) == n
        for j in range(ends):  # the state after step j + 1 is the original's after layer j + 1
            torch.testing.assert_close(mine[j], states[j], rtol=0, atol=1e-6)


@pytest.mark.parametrize("m", [3, 4, 7, 12])
def test_materialize_keeps_the_end_layers_and_equals_the_ode(make_llama, m):
    stock = make_llama(num_hidden_layers=6)
    model = odeify.odeify(copy.deepcopy(stock), discrete_ends=1, progress=False)
    plain = odeify.materialize(model, steps=m).eval()
    assert plain.config.num_hidden_layers == m
    for mine, theirs in (
        (plain.model.layers[0], stock.model.layers[0]),
        (plain.model.layers[-1], stock.model.layers[-1]),
    ):
        for (name, a), (_, b) in zip(
            mine.named_parameters(), theirs.named_parameters(), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(ids, use_cache=False).logits,
            model(ids, use_cache=False, ode_steps=m).logits,
            rtol=0,
            atol=1e-5,
        )


def test_grid_spans_sum_to_the_depth_and_meet_the_layers():
    for n in range(5, 70):
        assert sum(spans(n, 30, 2)) == pytest.approx(30)
        times, _ = stage_times(SCHEMES["sequential"], n, 30, 2)
        assert times[:2] == [0.0, 1 / 30] and times[-2:] == [28 / 30, 29 / 30]
        bounds = [*times, 1.0]
        for j, layer in matching(n, 30, ends=2):
            assert bounds[j] * 30 == pytest.approx(layer, abs=1e-9)
    assert stage_times(SCHEMES["sequential"], 30, 30, 2)[0] == [layer / 30 for layer in range(30)]


def test_multi_stage_grids_with_discrete_ends_put_the_stages_inside_each_step():
    # N = 4 on L = 6 with one discrete layer at each end: steps [0, 1], [1, 3], [3, 5], [5, 6].
    assert layer_bounds(4, 6, ends=1) == [0.0, 1.0, 3.0, 5.0, 6.0]
    assert layer_bounds(4, 6) == [0.0, 1.5, 3.0, 4.5, 6.0]  # no discrete ends: uniform
    assert spans(4, 6) == [1.5] * 4 and spans(4, 6, ends=1) == [1, 2.0, 2.0, 1]
    times, index = stage_times(SCHEMES["heun"], 4, num_layers=6, ends=1)
    assert times == [0.0, 1 / 6, 3 / 6, 5 / 6, 1.0] and index == [0, 1, 1, 2, 2, 3, 3, 4]
    times, index = stage_times(SCHEMES["midpoint"], 4, num_layers=6, ends=1)
    assert times == pytest.approx(
        [0, 0.5 / 6, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 5.5 / 6], abs=1e-15
    )
    assert index == list(range(8))
    with pytest.raises(ValueError, match="needs more than 2 steps"):
        layer_bounds(2, 6, ends=1)


@pytest.mark.parametrize("scheme", ["euler", "heun", "rk4"])
def test_parallel_schemes_step_by_the_discrete_ends_spans(make_llama, scheme):
    # N = 4 on L = 6, one discrete layer at each end: steps of 1, 2, 2 and 1 layers, so step
    # sizes 1/6, 2/6, 2/6, 1/6 from 0, 1/6, 3/6, 5/6 (a parallel scheme has one gain a step).
    model = odeify.odeify(make_llama(num_hidden_layers=6), discrete_ends=1, progress=False)
    spans_given = odeify.Schedule(
        [0.0, 1 / 6, 3 / 6, 5 / 6], [1 / 6, 2 / 6, 2 / 6, 1 / 6], 6, scheme
    )
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, use_cache=False, ode_steps=4, ode_scheme=scheme).logits,
            model(
                ids, use_cache=False, ode_steps=4, ode_scheme=scheme, ode_schedule=spans_given
            ).logits,
            rtol=0,
            atol=0,
        )


def test_saved_with_the_model_and_kv_cache_generation_matches(make_gpt2, tmp_path):
    model = odeify.odeify(make_gpt2(n_layer=6), discrete_ends=1, progress=False)
    odeify.save_pretrained(model, tmp_path / "m")
    loaded = odeify.from_pretrained(tmp_path / "m").eval()
    assert odeify.get_block(loaded).ode.discrete_ends == 1
    ids = torch.randint(1, 97, (1, 5))
    with odeify.steps(loaded, 4), torch.no_grad():
        cached = loaded.generate(ids, max_new_tokens=6, do_sample=False)
        plain = loaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_bad_input_is_refused_with_what_to_do(make_llama):
    with pytest.raises(ValueError, match="discrete_ends must be an integer d >= 0 with 2d < L"):
        odeify.odeify(make_llama(num_hidden_layers=4), discrete_ends=2, progress=False)
    with pytest.raises(ValueError, match="discrete_ends must be"):
        odeify.odeify(make_llama(num_hidden_layers=4), discrete_ends=-1, progress=False)
    model = odeify.odeify(make_llama(num_hidden_layers=6), discrete_ends=2, progress=False)
    ids = torch.randint(1, 97, (2, 5))
    with pytest.raises(ValueError, match="needs more than 4 steps"):
        model(ids, ode_steps=4)
    with pytest.raises(ValueError, match="needs more than 4 steps"):
        odeify.set_steps(model, 3)
    with pytest.raises(ValueError, match="native scheme.*'dopri5'"):
        model(ids, ode_steps=6, ode_scheme="dopri5")
    with pytest.raises(ValueError, match="one step count for the batch"):
        model(ids, ode_steps=torch.tensor([5, 7]))
