"""Step schedules: the uniform one is today's grid exactly, calibrated ones drive every path
(steps, ode_steps, per-sample, generate with a KV cache, materialize, save/load), and calibrate
lowers the KL it fits; bad input fails before any work."""

import copy
import warnings

import pytest
import torch
from transformers import DynamicCache

import odeify
from odeify import Schedule
from odeify.calibrate import initial_layers
from odeify.schemes import SCHEMES, spans, stage_times

IDS = torch.tensor([[5, 17, 42, 8, 61, 3, 9, 33], [1, 2, 3, 4, 5, 6, 7, 8]])


def _model(family, make_gpt2, make_llama, layers=6, **options):
    stock = make_gpt2(n_layer=layers) if family == "gpt2" else make_llama(num_hidden_layers=layers)
    return odeify.odeify(stock, progress=False, **options)


def _logits(model, **kw):
    with torch.no_grad():
        return model(IDS, use_cache=False, **kw).logits


def _store(model, schedule):
    block = odeify.get_block(model)
    block.ode.update(schedules={**block.ode.schedules, str(schedule.steps): schedule.to_dict()})


def _kl(model, ids, schedule):
    with torch.no_grad():
        p = model(ids, use_cache=False, ode_steps=6).logits.log_softmax(-1)
        q = model(ids, use_cache=False, ode_steps=3, ode_schedule=schedule).logits.log_softmax(-1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))


def _odd(num_layers=6):
    # Times off the layer nodes (the hat basis blends neighbours) and unequal gains.
    return Schedule([0.0, 0.21, 0.55, 0.8], [1.0, 0.7, 1.6, 1.2, 0.9, 1.4, 1.1, 0.5], num_layers)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("ends", [0, 1])
def test_uniform_and_discrete_ends_schedules_are_the_old_grid_exactly(scheme, ends):
    # The grid the block ran before schedules: stage_times for the times, h = span / L (the
    # sequential updates scaled by h L); bit-equal times and gains make bit-equal forwards.
    for n in (3, 4, 5, 7, 11, 30):
        old_times, old_index = stage_times(SCHEMES[scheme], n, 6 if ends else None, ends)
        h = [1.0 / n] * n if not ends else [s / 6 for s in spans(n, 6, ends)]
        if ends:
            schedule = Schedule.discrete_ends(n, 6, ends, scheme)
        else:
            schedule = Schedule.uniform(n, 6, scheme)
        times, index = schedule.stage_times(SCHEMES[scheme].offsets)
        assert (times, index) == (old_times, old_index)
        expected = [g for x in h for g in ((x * 6, x * 6) if scheme == "sequential" else (x,))]
        assert list(schedule.gains) == expected


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scheme", ["sequential", "midpoint", "rk4"])
def test_uniform_schedule_given_explicitly_equals_the_default_run(
    family, scheme, make_gpt2, make_llama
):
    model = _model(family, make_gpt2, make_llama)
    for n in (3, 5, 6):
        explicit = Schedule.uniform(n, 6, scheme)
        torch.testing.assert_close(
            _logits(model, ode_steps=n, ode_scheme=scheme, ode_schedule=explicit),
            _logits(model, ode_steps=n, ode_scheme=scheme),
            rtol=0,
            atol=0,
        )


def test_schedules_are_validated_and_round_trip_through_json():
    s = _odd()
    assert Schedule.from_dict(s.to_dict()).key == s.key
    with pytest.raises(ValueError, match="strictly increasing"):
        Schedule([0.0, 0.5, 0.5], [1.0] * 6, 6)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        Schedule([0.0, 1.0], [1.0] * 4, 6)
    with pytest.raises(ValueError, match="needs 4 gains"):
        Schedule([0.0, 0.5], [1.0] * 3, 6)
    with pytest.raises(ValueError, match="native scheme"):
        Schedule([0.0, 0.5], [1.0] * 2, 6, scheme="dopri5")
    with pytest.raises(ValueError, match="keys"):
        Schedule.from_dict({"times": [0.0]})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_calibrated_schedule_drives_steps_ode_steps_and_materialize(
    family, make_gpt2, make_llama, tmp_path
):
    model = _model(family, make_gpt2, make_llama)
    uniform = _logits(model, ode_steps=4)
    _store(model, _odd())
    mine = _logits(model, ode_steps=4)
    assert not torch.allclose(mine, uniform)
    torch.testing.assert_close(_logits(model, ode_steps=4, ode_schedule=_odd()), mine)
    torch.testing.assert_close(_logits(model, ode_steps=4, ode_schedule="uniform"), uniform)
    with odeify.steps(model, 4):
        torch.testing.assert_close(_logits(model), mine)
    with odeify.steps(model, 4, schedule="uniform"):
        torch.testing.assert_close(_logits(model), uniform)
    plain = odeify.materialize(model, steps=4).eval()
    assert plain.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS, use_cache=False).logits, mine, rtol=0, atol=1e-5)
    odeify.save_pretrained(model, tmp_path / "m")
    loaded = odeify.from_pretrained(tmp_path / "m").eval()
    assert odeify.get_block(loaded).ode.schedules == {"4": _odd().to_dict()}
    torch.testing.assert_close(_logits(loaded, ode_steps=4), mine, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_per_sample_counts_and_cached_generation_use_the_calibrated_schedule(
    family, make_gpt2, make_llama
):
    model = _model(family, make_gpt2, make_llama)
    _store(model, _odd())
    both = _logits(model, ode_steps=torch.tensor([4, 6]))
    torch.testing.assert_close(both[:1], _logits(model, ode_steps=4)[:1], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1:], _logits(model, ode_steps=6)[1:], rtol=0, atol=1e-5)
    prompt = IDS[:1, :5]
    with odeify.steps(model, 4), torch.no_grad():
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        cached = model.generate(prompt, **kw)
        assert torch.equal(cached, model.generate(prompt, use_cache=False, **kw))
        cache = DynamicCache()
        model(prompt, past_key_values=cache, use_cache=True)
    with torch.no_grad(), pytest.raises(ValueError, match="another schedule"):
        model(
            IDS[:1, 5:6], past_key_values=cache, use_cache=True, ode_steps=4, ode_schedule="uniform"
        )


def test_a_step_count_without_a_schedule_runs_uniform_and_says_so_once(make_gpt2, make_llama):
    model = _model("llama", make_gpt2, make_llama)
    uniform = _logits(model, ode_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _logits(model, ode_steps=3)  # no calibrated schedules at all: nothing to say
    _store(model, _odd())
    with pytest.warns(UserWarning, match="no calibrated 'sequential' schedule for 3 steps"):
        torch.testing.assert_close(_logits(model, ode_steps=3), uniform, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _logits(model, ode_steps=3)  # once
        _logits(model, ode_steps=6)  # N = L is the original itself


def test_a_schedule_outlives_further_training_and_refuses_another_depth(make_gpt2, make_llama):
    model = _model("gpt2", make_gpt2, make_llama)
    _store(model, _odd())
    with torch.no_grad():
        for p in odeify.get_block(model).parameters():
            p.mul_(1.01)
    # The stored schedule still drives 4 steps (it is times and gains, not weights): the same
    # forward as passing it, and not the uniform grid.
    stored = _logits(model, ode_steps=4)
    torch.testing.assert_close(
        stored, _logits(model, ode_steps=4, ode_schedule=_odd()), rtol=0, atol=0
    )
    assert not torch.allclose(stored, _logits(model, ode_steps=4, ode_schedule="uniform"))
    with pytest.raises(ValueError, match="made for a model of 8 layers"):
        _store(model, Schedule([0.0, 0.5], [1.0] * 4, 8))
    with pytest.raises(ValueError, match="made for a model of 8 layers"):
        _logits(model, ode_steps=2, ode_schedule=Schedule([0.0, 0.5], [1.0] * 4, 8))


def test_initial_layers_of_each_method():
    torch.manual_seed(0)
    states = torch.randn(9, 16, 8).cumsum(0)  # x_0 .. x_8
    for init in ("dp", "bi", "angular"):
        layers = initial_layers(states, 5, init)
        assert (
            len(layers) == 5 and layers == sorted(set(layers)) and 0 <= layers[0] < layers[-1] < 8
        )
        ends = initial_layers(states, 5, init, ends=2)
        assert ends[:2] == [0, 1] and ends[-2:] == [6, 7]
    assert initial_layers(states, 5, "dp")[0] == 0
    # Angular distance removes one contiguous block.
    kept = initial_layers(states, 5, "angular")
    removed = sorted(set(range(8)) - set(kept))
    assert removed == list(range(removed[0], removed[0] + 3))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_calibrate_lowers_its_kl_and_stores_the_schedule(family, make_gpt2, make_llama):
    model = _model(family, make_gpt2, make_llama)
    before = copy.deepcopy(model.state_dict())
    data = torch.randint(1, 97, (24,))  # one window: every Adam step sees the same batch
    fit = dict(batch_size=1, seq_len=24, progress=False)
    start = odeify.calibrate(model, [3], data, learn_gains=False, learn_times=False, **fit)
    result = odeify.calibrate(model, [3], data, iters=25, lr=0.05, **fit)[3]
    ids = data[None]
    assert _kl(model, ids, result.schedule) < 0.9 * _kl(model, ids, start[3].schedule)
    assert result.layers[0] == 0 and result.schedule.steps == 3
    assert odeify.get_block(model).ode.schedules["3"] == result.schedule.to_dict()
    assert result.schedule.starts != [layer / 6 for layer in result.layers]  # times moved
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # weights untouched
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(
        _logits(model, ode_steps=3), _logits(model, ode_steps=3, ode_schedule=result.schedule)
    )


def test_calibrate_refuses_bad_input_before_any_work(make_gpt2, make_llama):
    model = _model("gpt2", make_gpt2, make_llama, discrete_ends=1)
    data = torch.randint(1, 97, (400,))
    with pytest.raises(ValueError, match="shorter than one batch"):
        odeify.calibrate(model, [3], data[:20], seq_len=16)
    with pytest.raises(ValueError, match="more than 2 steps"):
        odeify.calibrate(model, [2], data, seq_len=16)
    with pytest.raises(ValueError, match="fewer steps than the L = 6"):
        odeify.calibrate(model, [6], data, seq_len=16)
    with pytest.raises(ValueError, match="init must be one of"):
        odeify.calibrate(model, [3], data, seq_len=16, init="random")
    with pytest.raises(ValueError, match="1-D sequence of token ids"):
        odeify.calibrate(model, [3], torch.rand(400), seq_len=16)
    assert odeify.get_block(model).ode.schedules == {}
    result = odeify.calibrate(model, [3], data, iters=3, seq_len=16, progress=False)[3]
    assert result.layers[0] == 0 and result.layers[-1] == 5  # the discrete ends are kept
