"""Depth adaptation v2 and the pruning baselines (recipes/adapt_depth.py, issue 14) on tiny
models: a run starts from odeify.calibrate's schedules (calibrated at the start or stored in
the input model), trains them with the weights, saves them and materialises with them; the
baselines keep the layers Block Influence and angular distance choose, with learned gains;
bad configs fail before any work."""

import copy
import json

import pytest
import torch
from _launch import interrupted_at
from test_adapt_depth import _compare, _config, _run, assets  # noqa: F401  (assets: a fixture)
from test_adapt_depth import recipe as adapt

import odeify
from odeify.train import data
from odeify.train.distill import frozen_teacher
from odeify.train.evaluate import sweep
from odeify.train.sampler import StepSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def _v2(assets, out, **overrides):  # noqa: F811
    settings = dict(
        schedules="calibrate",
        choices=[2, 3],
        every_batch=True,
        calibrate={"iters": 3, "lr": 0.05},
        schedule_lr=0.05,
        hidden=0.0,
        eval_steps=[2, 3, 4],
        curve_steps=[2],
    )
    return _config(assets, out, **(settings | overrides))


def _train_tokens_and_windows(assets, settings):  # noqa: F811
    cfg = adapt.Config(**settings)
    docs, heldout = data.split(data.corpus(cfg.corpus), cfg.heldout, spec=cfg.corpus)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets / "plain")
    cache = assets / "tokens"
    tokens = torch.from_numpy(data.tokenize(docs, tokenizer, cache).astype("int64"))
    return tokens, adapt.heldout_windows(cfg, heldout, tokenizer, cache)


def _stock(assets):  # noqa: F811
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(assets / "plain")


def _perplexities(model, teacher, windows, counts):
    scores = sweep(model, windows, counts, 4, teacher=teacher, progress=False)
    return {n: float(torch.tensor(scores.loss[n]).exp()) for n in counts}


@pytest.fixture(scope="module")
def v2(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("v2") / "run"
    settings = _v2(assets, out)
    return _run(settings), out, settings


def test_v2_starts_from_the_calibrated_schedules(assets, v2):  # noqa: F811
    results, out, settings = v2
    tokens, windows = _train_tokens_and_windows(assets, settings)
    stock = _stock(assets)
    model = odeify.odeify(copy.deepcopy(stock), progress=False)
    fits = odeify.calibrate(model, [2, 3], tokens, iters=3, lr=0.05, seq_len=32, progress=False)
    for n in (2, 3):
        assert results["calibration"][str(n)]["schedule"] == fits[n].schedule.to_dict()
    expected = _perplexities(model.eval(), frozen_teacher(stock), windows, [2, 3])
    for n in (2, 3):
        assert results["before"][str(n)]["perplexity"] == pytest.approx(expected[n], rel=1e-5)
    # Calibration alone moves the 2-step model: the start is not the uniform grid.
    uniform = odeify.odeify(copy.deepcopy(stock), progress=False).eval()
    plain = _perplexities(uniform, frozen_teacher(stock), windows, [2])
    assert plain[2] != pytest.approx(expected[2], rel=1e-3)
    assert results["setup_flops"] > 0 and results["train_flops"] > results["setup_flops"]


def test_v2_trains_every_target_on_its_schedule_and_saves_it(v2):
    results, out, _ = v2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [[p["steps"] for p in r["parts"]] for r in records if "parts" in r]
    assert steps == [[4, 2, 3]] * 4  # the anchor and every target, every batch
    for n in ("2", "3"):
        start, trained = results["calibration"][n]["schedule"], results["trained_schedules"][n]
        assert trained["gains"] != pytest.approx(start["gains"], abs=1e-4)
    # N = 3's inner times move; N = 2's one free time sits past the last layer's time 3/4,
    # where the hat basis holds W constant (no gradient), so only 3 is asserted.
    start, trained = results["calibration"]["3"]["schedule"], results["trained_schedules"]["3"]
    assert trained["times"] != pytest.approx(start["times"], abs=1e-6)
    model = odeify.from_pretrained(out / "model").eval()
    saved = odeify.get_block(model).ode.schedules
    for n in ("2", "3"):
        assert saved[n]["gains"] == pytest.approx(results["trained_schedules"][n]["gains"])
        assert saved[n]["times"] == pytest.approx(results["trained_schedules"][n]["times"])
    assert "depth adaptation v2 (calibrated (dp) schedules, trained" in results["label"]
    assert "{2, 3} every batch" in results["label"]


def test_v2_materialises_at_a_calibrated_count(v2):
    results, out, _ = v2
    assert results["materialize_check"]["steps"] == 2
    assert results["materialize_check"]["max_abs_logit_diff"] < 1e-4
    model = odeify.from_pretrained(out / "model").eval()
    plain = odeify.materialize(model, steps=3)
    ids = torch.randint(1, 1000, (2, 12))
    with torch.no_grad():
        ode = model(ids, use_cache=False, ode_steps=3).logits
        uniform = model(ids, use_cache=False, ode_steps=3, ode_schedule="uniform").logits
        torch.testing.assert_close(plain(ids, use_cache=False).logits, ode, rtol=0, atol=1e-4)
    assert (ode - uniform).abs().max() > 1e-3  # the trained schedule, not the uniform grid


def test_v2_resume_continues_the_schedules_exactly(assets, v2, tmp_path):  # noqa: F811
    unbroken, _, _ = v2
    settings = _v2(assets, tmp_path / "run")
    with interrupted_at(2):
        _run(settings)
    resumed = _run(settings, resume=True)
    assert resumed["trained_schedules"] == unbroken["trained_schedules"]
    assert resumed["after"] == unbroken["after"]


def test_v2_trains_the_schedules_stored_in_the_input_model(assets, tmp_path):  # noqa: F811
    model = odeify.odeify(_stock(assets), progress=False)
    tokens, windows = _train_tokens_and_windows(assets, _v2(assets, tmp_path / "x"))
    odeify.calibrate(model, [2], tokens, iters=2, seq_len=32, init="bi", progress=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets / "plain")
    odeify.save_pretrained(model, tmp_path / "calibrated", tokenizer=tokenizer)
    stored = odeify.get_block(model).ode.schedules["2"]
    settings = _v2(
        assets,
        tmp_path / "run",
        model=str(tmp_path / "calibrated"),
        schedules="stored",
        calibrate={},
        choices=[2],
        every_batch=False,
        eval_steps=[2, 4],
        max_steps=2,
    )
    results = _run(settings)
    expected = _perplexities(model.eval(), frozen_teacher(model), windows, [2])
    assert results["before"]["2"]["perplexity"] == pytest.approx(expected[2], rel=1e-5)
    assert results["before"]["4"]["kl"] < 1e-10  # the stored model is the original at N = L
    assert results["trained_schedules"]["2"]["gains"] != pytest.approx(stored["gains"], abs=1e-4)
    assert "v2 (stored schedules" in results["label"]
    # Missing a target's schedule: refused before training.
    with pytest.raises(ValueError, match="none for \\[3\\].*set schedules: calibrate"):
        _run(settings | dict(choices=[2, 3], out_dir=str(tmp_path / "bad")))


# ----------------------------------------------------------------------------- baselines
def _toy_states(identity_pairs, layers=6, d=64, tokens=5):
    """States x_0 .. x_L, random except x_b = x_a for each pair (a, b)."""
    torch.manual_seed(0)
    states = torch.randn(layers + 1, tokens, d)
    for a, b in identity_pairs:
        states[b] = states[a]
    return states


def test_block_influence_keeps_the_layers_that_change_the_state():
    # Layers 1 and 4 are identities (x_2 = x_1, x_5 = x_4): Block Influence 0, dropped first.
    states = _toy_states([(1, 2), (4, 5)])
    assert adapt.selected_layers(states, 4, "block_influence") == [0, 2, 3, 5]
    assert adapt.selected_layers(states, 6, "block_influence") == list(range(6))


def test_angular_removes_the_contiguous_block_that_returns_to_its_input():
    # Layers 3 and 4 together return to their input (x_5 = x_3): angular distance 0.
    states = _toy_states([(3, 5)])
    assert adapt.selected_layers(states, 4, "angular") == [0, 1, 2, 5]
    assert adapt.selected_layers(states, 4, "uniform") == [0, 1, 3, 4]


def _with_identity_layers(assets, tmp_path, layers):  # noqa: F811
    """The tiny stock model with the given layers made identities (zero output projections)."""
    from transformers import AutoTokenizer

    stock = _stock(assets)
    with torch.no_grad():
        for i in layers:
            stock.model.layers[i].self_attn.o_proj.weight.zero_()
            stock.model.layers[i].mlp.down_proj.weight.zero_()
    stock.save_pretrained(tmp_path / "holes")
    AutoTokenizer.from_pretrained(assets / "plain").save_pretrained(tmp_path / "holes")
    return str(tmp_path / "holes")


@pytest.mark.parametrize("selection", ["block_influence", "angular"])
def test_baselines_keep_the_measured_layers_with_learned_gains(assets, tmp_path, selection):  # noqa: F811
    model = _with_identity_layers(assets, tmp_path, [1, 2])
    settings = _config(
        assets,
        tmp_path / selection,
        model=model,
        mode="drop",
        keep_layers=2,
        drop_selection=selection,
        drop_gains=True,
        schedule_lr=0.05,
        hidden=0.0,
        eval_steps=None,
        curve_steps=None,
    )
    results = _run(settings)
    assert results["kept_layers"] == [0, 3] and results["drop_selection"] == selection
    gains = results["trained_schedules"]["2"]["gains"]
    assert len(gains) == 4 and gains != pytest.approx([1.0] * 4, abs=1e-4)
    assert results["materialize_check"]["max_abs_logit_diff"] < 1e-4
    saved = odeify.from_pretrained(tmp_path / selection / "model")
    assert odeify.get_block(saved).ode.schedules["2"]["gains"] == pytest.approx(gains)
    assert results["setup_flops"] > 0
    name = {"block_influence": "(a') Block Influence", "angular": "(a'') angular"}[selection]
    assert results["label"].startswith(name) and "learned gains" in results["label"]


def test_compare_tabulates_v2_and_the_baselines(assets, v2, tmp_path):  # noqa: F811
    results, out, _ = v2
    runs = [str(out)]
    for selection in ("uniform", "block_influence"):
        folder = tmp_path / selection
        _run(
            _config(
                assets,
                folder,
                mode="drop",
                keep_layers=2,
                drop_selection=selection,
                hidden=0.0,
                max_steps=2,
                eval_steps=None,
                curve_steps=None,
            )
        )
        runs.append(str(folder))
    table = _compare(runs, str(tmp_path / "cmp"), ["v2", "(a)", "(a')"])
    assert "| v2 | 2 |" in table and "| (a') | 2 |" in table
    assert "- (a'): (a') Block Influence layers to M = 2" in table
    assert (tmp_path / "cmp" / "perplexity_budget.png").exists()


# ---------------------------------------------------------------------------- bad input
def test_every_batch_sampler():
    sampler = StepSampler(num_layers=4, low=2, high=3, choices=(3, 2), every=True, full_every=2)
    assert [sampler.draw(s) for s in range(3)] == [[4, 2, 3], [2, 3], [4, 2, 3]]
    with pytest.raises(ValueError, match="give choices"):
        StepSampler(num_layers=4, low=2, high=3, every=True)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(drop_selection="block_influence"), "with mode: ode use schedules: calibrate"),
        (dict(drop_gains=True), "drop_selection and drop_gains"),
        (dict(mode="drop", keep_layers=2, drop_selection="random"), "drop_selection must be"),
        (dict(mode="drop", keep_layers=2, schedules="calibrate", choices=[2]), "v2 \\(mode: ode"),
        (dict(schedules="calibrate", hidden=0.0), "list the targets in choices"),
        (dict(schedules="calibrate", choices=[2]), "set hidden: 0 with schedules"),
        (dict(schedules="fitted"), "schedules must be one of"),
        (dict(schedules="calibrate", choices=[2], hidden=0.0, calibrate={"iter": 3}), "'iter'"),
        (dict(calibrate={"iters": 3}), "need schedules: calibrate"),
        (
            dict(calibrate={"init": "random"}, schedules="calibrate", choices=[2], hidden=0.0),
            "init",
        ),
        (dict(every_batch=True), "every_batch.*give choices"),
        (dict(schedule_lr=-1.0), "schedule_lr must be"),
        (dict(mode="drop", keep_layers=2, drop_selection="angular"), "angular keeps.*hidden: 0"),
        (dict(schedules="stored", choices=[2], hidden=0.0), "is a stock model"),
    ],
)
def test_bad_schedule_configs_fail_before_any_work(assets, tmp_path, overrides, match):  # noqa: F811
    with pytest.raises(ValueError, match=match):
        _run(_config(assets, tmp_path / "run", **overrides))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_two_gloo_processes_train_the_schedules_as_one(assets, v2, tmp_path):  # noqa: F811
    """The schedule parameters live outside DDP: their gradients are averaged by hand."""
    from _launch import argv, fork, join

    results, _, _ = v2
    join(fork(adapt.main, argv(_v2(assets, tmp_path / "two")), world=2))
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    for n, trained in results["trained_schedules"].items():
        assert two["trained_schedules"][n]["gains"] == pytest.approx(trained["gains"], rel=1e-4)
        assert two["trained_schedules"][n]["times"] == pytest.approx(trained["times"], rel=1e-4)


def test_v2_with_lora_keeps_the_trained_schedules_through_the_merge(assets, tmp_path):  # noqa: F811
    out = tmp_path / "lora"
    settings = _v2(assets, out, train="lora", lora_r=2, choices=[2], eval_steps=[2, 4], max_steps=2)
    results = _run(settings)
    model = odeify.from_pretrained(out / "model").eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    saved = odeify.get_block(model).ode.schedules["2"]
    assert saved["gains"] == pytest.approx(results["trained_schedules"]["2"]["gains"])
    start = results["calibration"]["2"]["schedule"]["gains"]
    assert saved["gains"] != pytest.approx(start, abs=1e-4)
    assert results["materialize_check"]["max_abs_logit_diff"] < 1e-4
