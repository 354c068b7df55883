"""Low-rank corrections and the hypersolver (issue 14): calibrate's rank-r correction is the
truncated SVD of the closed-form fit and trains as I + U V^T; ``correction_rank`` None or 0 is
the full correction; the recipe's ``train_weights: false`` trains only the per-step-count
schedules, so N = L stays the original bit for bit with no anchor; bad options fail before any
work."""

import copy
import json

import pytest
import torch
from test_adapt_depth import _config, _run, assets  # noqa: F401  (assets: a fixture)

import odeify
from odeify import Schedule
from odeify.calibrate import fit_linear_correction, spread_windows

IDS = torch.tensor([[5, 17, 42, 8, 61, 3, 9, 33], [1, 2, 3, 4, 5, 6, 7, 8]])
D = 32  # hidden size of the conftest models and of the recipe's tiny Llama


def _truncated(t: torch.Tensor, rank: int) -> torch.Tensor:
    """I + the rank-r SVD truncation of T - I, per matrix (the independent reference)."""
    eye = torch.eye(t.shape[-1], dtype=torch.float64)
    out = []
    for m in t.to(torch.float64):
        u, s, vh = torch.linalg.svd(m - eye)
        out.append(eye + u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank])
    return torch.stack(out)


def _logits(model, **kw):
    with torch.no_grad():
        return model(IDS, use_cache=False, **kw).logits


@pytest.fixture
def llama(make_llama):
    return odeify.odeify(make_llama(num_hidden_layers=6), progress=False)


DATA = torch.randint(1, 97, (600,), generator=torch.Generator().manual_seed(0))
FIT = dict(batch_size=2, seq_len=24, progress=False, correction="linear", correction_tokens=240)


def test_a_rank_r_correction_starts_at_the_truncated_svd_of_the_full_fit(llama, tmp_path):
    teacher = odeify.calibrate(
        llama, [3], DATA, iters=0, forcing="teacher", correction_rank=3, **FIT
    )
    fit = teacher[3]
    windows = spread_windows(DATA, 240, 24)
    full, residuals = fit_linear_correction(
        llama, Schedule.from_layers(fit.layers, 6), windows, forcing="teacher"
    )
    expected = _truncated(full.correction, 3).float()
    torch.testing.assert_close(fit.schedule.correction, expected, rtol=0, atol=1e-5)
    delta = fit.schedule.correction.double() - torch.eye(D, dtype=torch.float64)
    ranks = [int(torch.linalg.matrix_rank(m, atol=1e-5)) for m in delta]
    # A step that stands for one layer fits T = I under teacher forcing (rank 0); the others 3.
    jumps = [b - a > 1 for a, b in zip(fit.layers, [*fit.layers[1:], 6], strict=True)]
    assert ranks == [3 if jump else 0 for jump in jumps] and any(jumps)
    # The residuals: T = I, the full T (as without a rank), and the rank-r T (no better).
    flat = lambda pairs: [value for pair in pairs for value in pair]  # noqa: E731
    assert flat(r[:2] for r in fit.residuals) == pytest.approx(flat(residuals), abs=1e-9)
    assert all(len(r) == 3 and r[2] >= r[1] - 1e-9 for r in fit.residuals)
    # Student forcing: step 0 starts at x_0 either way, so it is the same truncation there.
    student = odeify.calibrate(llama, [3], DATA, iters=0, correction_rank=3, **FIT)[3]
    torch.testing.assert_close(student.schedule.correction[0], expected[0], rtol=0, atol=1e-5)
    # Rank d is the full fit.
    whole = odeify.calibrate(llama, [3], DATA, iters=0, forcing="teacher", correction_rank=D, **FIT)
    torch.testing.assert_close(whole[3].schedule.correction, full.correction, rtol=0, atol=1e-5)
    # Adam refines U and V: T moves and T - I keeps rank 3; the model keeps the dense T, which
    # saves, reloads and materialises as a full correction does.
    refined = odeify.calibrate(
        llama, [3], DATA, iters=4, learn_times=False, correction_lr=1e-3, correction_rank=3, **FIT
    )[3]
    moved = refined.schedule.correction.double() - torch.eye(D, dtype=torch.float64)
    assert not torch.allclose(refined.schedule.correction, student.schedule.correction, atol=1e-5)
    assert max(int(torch.linalg.matrix_rank(m, atol=1e-5)) for m in moved) == 3
    mine = _logits(llama, ode_steps=3)
    torch.testing.assert_close(
        mine, _logits(llama, ode_steps=3, ode_schedule=refined.schedule), rtol=0, atol=0
    )
    odeify.save_pretrained(llama, tmp_path / "m")
    loaded = odeify.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(_logits(loaded, ode_steps=3), mine)
    stock = odeify.materialize(loaded, steps=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(IDS, use_cache=False).logits, mine, rtol=0, atol=1e-5)


def test_no_rank_is_the_full_correction_bit_for_bit(make_llama):
    stock = make_llama(num_hidden_layers=6)
    fits = []
    for rank in ({}, {"correction_rank": None}, {"correction_rank": 0}):
        model = odeify.odeify(copy.deepcopy(stock), progress=False)
        fits.append(odeify.calibrate(model, [3], DATA, iters=2, correction_lr=1e-3, **FIT, **rank))
    for other in fits[1:]:
        assert torch.equal(other[3].schedule.correction, fits[0][3].schedule.correction)
        assert other[3].schedule.to_dict() == fits[0][3].schedule.to_dict()
        assert other[3].residuals == fits[0][3].residuals and len(other[3].residuals[0]) == 2


@pytest.mark.parametrize(
    "rank,correction,match",
    [
        (D + 1, "linear", "integer from 1 to the hidden size d = 32"),
        (-1, "linear", "integer from 1"),
        (2.5, "linear", "integer from 1"),
        (True, "linear", "integer from 1"),
        (4, None, "set correction='linear' too"),
    ],
)
def test_a_bad_rank_is_refused_before_any_work(llama, rank, correction, match):
    options = dict(FIT, correction=correction)
    with pytest.raises(ValueError, match=match):
        odeify.calibrate(llama, [3], DATA, correction_rank=rank, **options)
    assert odeify.get_block(llama).ode.schedules == {}


# ---------------------------------------------------------------------------- the recipe
def _hyper(assets, out, **overrides):  # noqa: F811
    settings = dict(
        schedules="calibrate",
        choices=[2, 3],
        every_batch=True,
        full_every=0,
        train_weights=False,
        calibrate={
            "iters": 2,
            "lr": 0.05,
            "correction": "linear",
            "correction_tokens": 256,
            "correction_rank": 2,
        },
        schedule_lr=0.05,
        correction_lr=1e-3,
        hidden=0.0,
        lm=0.0,
        eval_steps=[2, 3, 4],
        curve_steps=[2],
        eval_every=0,
    )
    return _config(assets, out, **(settings | overrides))


@pytest.fixture(scope="module")
def hyper(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("hyper") / "run"
    return _run(_hyper(assets, out)), out


def test_the_hypersolver_trains_the_schedules_alone_and_keeps_n_equal_l_exact(assets, hyper):  # noqa: F811
    from transformers import LlamaForCausalLM

    results, out = hyper
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [[p["steps"] for p in r["parts"]] for r in records if "parts" in r] == [[2, 3]] * 4
    # With no weight trained, the logged gradient norm is the schedules' (not 0).
    assert all(r["grad_norm"] > 0 for r in records if "parts" in r)
    assert results["trainable_parameters"] == 0 and not results["train_weights"]
    # Rank 2 of d = 32: U and V of every step (5 steps over N = 2 and 3), plus gains and times.
    assert 5 * 2 * D * 2 < results["schedule_parameters"] < 5 * 2 * D * 2 + 20
    assert "hypersolver (calibrated (dp) schedules, trained; weights frozen" in results["label"]
    # N = L is the original exactly: the weights are those of the conversion, bit for bit.
    stock = LlamaForCausalLM.from_pretrained(assets / "plain")
    fresh = odeify.odeify(copy.deepcopy(stock), progress=False).eval()
    model = odeify.from_pretrained(out / "model").eval()
    for name, value in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert torch.equal(_logits(model, ode_steps=4), _logits(fresh, ode_steps=4))
    assert results["after"]["4"] == results["before"]["4"]
    # The targets moved: the correction changed from its rank-2 start, the held-out KL fell.
    saved = odeify.get_block(model).corrections.n2
    fitted = odeify.calibrate(
        fresh,
        [2],
        _tokens(assets, results),
        iters=2,
        lr=0.05,
        seq_len=32,
        correction="linear",
        correction_tokens=256,
        correction_rank=2,
        progress=False,
    )[2]
    assert results["calibration"]["2"]["schedule"] == fitted.schedule.to_dict()
    residuals = [[round(v, 6) for v in step] for step in fitted.residuals]
    assert results["calibration"]["2"]["residuals"] == residuals and len(residuals[0]) == 3
    assert not torch.allclose(saved, fitted.schedule.correction, atol=1e-5)
    for n in ("2", "3"):
        assert results["after"][n]["kl"] < results["before"][n]["kl"]
    assert results["materialize_check"]["max_abs_logit_diff"] < 1e-4
    # FLOPs: per step the teacher's forward and, per target, forward + backward to the
    # activations (2 forwards: no weight gradients); no N = L anchor.
    cost = results["cost_model"]
    assert cost["train_factor"] == 2.0
    forward = lambda n: 2.0 * 64 * (n * cost["layer_params"] + cost["head_params"])  # noqa: E731
    per_step = forward(4) + 2 * (forward(2) + forward(3))
    assert results["train_flops"] - results["setup_flops"] == pytest.approx(4 * per_step)


def _tokens(assets, results):  # noqa: F811
    from test_adapt_schedules import _train_tokens_and_windows

    tokens, _ = _train_tokens_and_windows(assets, _hyper(assets, "unused"))
    return tokens


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(full_every=1), "set full_every: 0"),
        (dict(schedules="uniform", calibrate={}), "needs mode: ode with schedules: calibrate"),
        (dict(train="lora"), "leave train at full"),
        (dict(train_schedules=False), "trains nothing"),
        (dict(train_weights="no"), "train_weights must be true or false"),
        (dict(calibrate={"correction_rank": 2}), "add correction: linear"),
        (dict(calibrate={"correction": "linear", "correction_rank": -2}), "correction_rank must"),
        (dict(choices=[2, 4]), "drop them from choices"),
    ],
)
def test_bad_hypersolver_configs_fail_before_any_work(assets, tmp_path, overrides, match):  # noqa: F811
    with pytest.raises(ValueError, match=match):
        _run(_hyper(assets, tmp_path / "run", **overrides))
    assert not (tmp_path / "run" / "model").exists()
