"""Linear corrections of calibrated schedules (one d x d matrix per step on its MLP update): the
least squares recovers a known matrix, a corrected schedule drives every path (steps, per-sample
counts, materialize, save/load) while N = L stays the original bit for bit, calibrate fits it
and lowers the KL, and bad input fails with a message that says what is wrong."""

import json
import re

import pytest
import torch

import odeify
from odeify import Schedule
from odeify.calibrate import LinearFit, fit_linear_correction

IDS = torch.tensor([[5, 17, 42, 8, 61, 3, 9, 33], [1, 2, 3, 4, 5, 6, 7, 8]])
D = 32  # hidden size of the conftest models


def _model(family, make_gpt2, make_llama, layers=6):
    stock = make_gpt2(n_layer=layers) if family == "gpt2" else make_llama(num_hidden_layers=layers)
    return odeify.odeify(stock, progress=False)


def _logits(model, **kw):
    with torch.no_grad():
        return model(IDS, use_cache=False, **kw).logits


def _corrected(steps=3, layers=(0, 2, 4), seed=0, size=D):
    # Far enough from the identity that a correction not applied (or applied transposed) shows.
    g = torch.Generator().manual_seed(seed)
    t = torch.eye(size) + 0.3 * torch.randn(steps, size, size, generator=g) / size**0.5
    plain = Schedule.from_layers(list(layers), 6, gains=[1.0, 0.8, 1.3, 1.1, 0.9, 1.2])
    return Schedule(plain.times, plain.gains, 6, correction=t)


def _kl(model, ids, schedule):
    with torch.no_grad():
        p = model(ids, use_cache=False, ode_steps=6).logits.log_softmax(-1)
        q = model(ids, use_cache=False, ode_steps=3, ode_schedule=schedule).logits.log_softmax(-1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))


def test_the_least_squares_recovers_a_known_matrix_and_the_ridge_pulls_to_the_identity():
    torch.manual_seed(0)
    # Columns of very different scale, as MLP updates have: the ridge is relative to them.
    x = torch.randn(3000, 16, dtype=torch.float64) * torch.logspace(-2, 1, 16, dtype=torch.float64)
    t = torch.randn(16, 16, dtype=torch.float64)
    y = x @ t + 1e-6 * torch.randn(3000, 16, dtype=torch.float64)
    whole, parts = LinearFit(16), LinearFit(16)
    whole.add(x, y)
    for xs, ys in zip(x.split(700), y.split(700), strict=True):
        parts.add(xs.float().double(), ys)  # batches add up to the whole (float32 rows too)
    assert parts.count == whole.count == 3000
    torch.testing.assert_close(whole.solve(ridge=0.0), t, rtol=0, atol=1e-4)
    assert whole.residual(whole.solve(0.0)) < 1e-10 < 0.5 < whole.residual(torch.eye(16))
    torch.testing.assert_close(parts.solve(0.0), t, rtol=0, atol=1e-2)
    # A huge ridge leaves the step as it was (T = I), not zero; a tiny one barely moves T.
    torch.testing.assert_close(whole.solve(ridge=1e9), torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(whole.solve(ridge=1e-9), t, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="no rows"):
        LinearFit(4).solve(0.0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_corrected_schedule_drives_steps_materialize_and_save_load(
    family, make_gpt2, make_llama, tmp_path
):
    model = _model(family, make_gpt2, make_llama)
    original = _logits(model, ode_steps=6)
    schedule = _corrected()
    plain = Schedule(schedule.times, schedule.gains, 6)
    uncorrected = _logits(model, ode_steps=3, ode_schedule=plain)
    mine = _logits(model, ode_steps=3, ode_schedule=schedule)
    assert not torch.allclose(mine, uncorrected, atol=1e-3)
    # T = I is no correction, bit for bit (x @ I is exact in floating point).
    eye = Schedule(plain.times, plain.gains, 6, correction=torch.eye(D).repeat(3, 1, 1))
    assert torch.equal(_logits(model, ode_steps=3, ode_schedule=eye), uncorrected)
    block = odeify.get_block(model)
    block.store_schedule(schedule)
    assert block.ode.schedules["3"]["correction"] == {"kind": "linear", "hidden_size": D}
    assert torch.equal(block.corrections.n3, schedule.correction)
    with odeify.steps(model, 3):
        assert torch.equal(_logits(model), mine)
    # N = L is the original, bit for bit: no correction is stored (or applied) there.
    assert torch.equal(_logits(model, ode_steps=6), original)
    # One count per sample: each sample as if it ran alone (the other on the original).
    both = _logits(model, ode_steps=torch.tensor([3, 6]))
    torch.testing.assert_close(both[:1], mine[:1], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1:], original[1:], rtol=0, atol=1e-5)
    # Folded into the MLP output projections (GPT-2's Conv1D [in, out] and its bias too): the
    # stock model computes T^T W in float64 where the block computes (x W^T) T in float32, so
    # the two differ by float32 rounding only (1e-5 on logits of size ~1).
    stock = odeify.materialize(model, steps=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(IDS, use_cache=False).logits, mine, rtol=0, atol=1e-5)
    odeify.save_pretrained(model, tmp_path / "m")
    loaded = odeify.from_pretrained(tmp_path / "m").eval()
    assert odeify.get_block(loaded).ode.schedules == block.ode.schedules
    assert torch.equal(odeify.get_block(loaded).corrections.n3, schedule.correction)
    assert torch.equal(_logits(loaded, ode_steps=3), mine)
    assert torch.equal(_logits(loaded, ode_steps=6), original)
    # A schedule stored again without a correction drops the matrices with it.
    block.store_schedule(plain)
    assert "correction" not in block.ode.schedules["3"] and not hasattr(block.corrections, "n3")
    assert torch.equal(_logits(model, ode_steps=3), uncorrected)


def test_per_sample_counts_that_all_have_corrections_each_take_their_own(make_gpt2, make_llama):
    model = _model("llama", make_gpt2, make_llama)
    block = odeify.get_block(model)
    three = _corrected()
    g = torch.Generator().manual_seed(1)
    t = torch.eye(D) + 0.3 * torch.randn(2, D, D, generator=g) / D**0.5
    plain = Schedule.from_layers([0, 3], 6, gains=[1.0, 0.8, 1.3, 1.1])
    for schedule in (three, Schedule(plain.times, plain.gains, 6, correction=t)):
        block.store_schedule(schedule)
    counts = torch.tensor([3, 2])
    both = _logits(model, ode_steps=counts)
    for b, n in enumerate(counts.tolist()):
        with torch.no_grad():
            alone = model(IDS[b : b + 1], use_cache=False, ode_steps=n).logits
        torch.testing.assert_close(both[b : b + 1], alone, rtol=0, atol=1e-5)


def test_a_correction_runs_in_the_models_dtype(make_gpt2, make_llama):
    model = _model("gpt2", make_gpt2, make_llama).double()
    schedule = _corrected()  # float32 matrices
    as64 = Schedule(schedule.times, schedule.gains, 6, correction=schedule.correction.double())
    given = _logits(model, ode_steps=3, ode_schedule=schedule)
    assert given.dtype == torch.float64
    assert torch.equal(given, _logits(model, ode_steps=3, ode_schedule=as64))
    block = odeify.get_block(model)
    block.store_schedule(schedule)
    assert block.corrections.n3.dtype == torch.float64
    assert torch.equal(block.corrections.n3, schedule.correction.double())


def test_settings_with_a_correction_build_its_matrices_where_the_model_is(make_llama):
    # What a load fills: the identity until then, in the stock model's dtype and on its device
    # (the meta device of a skeleton built to be loaded: the basis too), as transformers' loader
    # expects.
    stock = make_llama(num_hidden_layers=6).double()
    model = odeify.odeify(stock, schedules={"3": _corrected().to_dict()}, progress=False)
    n3 = odeify.get_block(model).corrections.n3
    assert n3.dtype == torch.float64
    assert torch.equal(n3, torch.eye(D, dtype=torch.float64).repeat(3, 1, 1))
    with torch.device("meta"):
        skeleton = make_llama(num_hidden_layers=6)
    model = odeify.odeify(skeleton, init="none", schedules={"3": _corrected().to_dict()})
    block = odeify.get_block(model)
    assert {t.device.type for t in [*block.parameters(), *block.buffers()]} == {"meta"}
    assert block.corrections.n3.shape == (3, D, D)


def _wider(what):
    """The refusal of a correction for hidden size D + 8, as a whole-message pattern."""
    refusal = f"{what} hidden size {D + 8}; the model has {D}. Calibrate it again for this model"
    return f"^{re.escape(refusal)} \\(odeify.calibrate\\)$"


def test_bad_corrections_are_refused_with_a_clear_message(make_gpt2, make_llama, tmp_path):
    model = _model("llama", make_gpt2, make_llama)
    block = odeify.get_block(model)
    s = _corrected()
    with pytest.raises(ValueError, match=r"shape \[3, d, d\]"):
        Schedule(s.times, s.gains, 6, correction=torch.eye(D).repeat(4, 1, 1))
    with pytest.raises(ValueError, match="square"):
        Schedule(s.times, s.gains, 6, correction=torch.ones(3, D, D + 1))
    with pytest.raises(ValueError, match="no separate MLP update"):
        Schedule(s.times, [0.5] * 3, 6, scheme="heun", correction=s.correction)
    wide = _corrected(size=D + 8)
    for_this = _wider("this schedule's correction is for")
    with pytest.raises(ValueError, match=for_this):
        _logits(model, ode_steps=3, ode_schedule=wide)
    with pytest.raises(ValueError, match=for_this):
        block.store_schedule(wide)
    with pytest.raises(ValueError, match="matrices are saved with the model"):
        Schedule.from_dict(s.to_dict())
    with pytest.raises(ValueError, match="kind"):
        Schedule.from_dict({**s.to_dict(), "correction": {"kind": "affine", "hidden_size": D}})
    # Settings that describe a correction the model has no matrices for.
    block.ode.update(schedules={"3": s.to_dict()})
    refusal = (
        "the calibrated schedule of 3 steps has a linear correction but the model holds no "
        "matrices for it (the settings were edited, or copied without the weights); calibrate "
        "it again"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(refusal)}$"):
        _logits(model, ode_steps=3)
    block.store_schedule(s)
    odeify.save_pretrained(model, tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    saved = json.loads(config.read_text())
    # Saved for another hidden size: refused before any weight is read.
    saved["odeify"]["schedules"]["3"]["correction"]["hidden_size"] = D + 8
    config.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=_wider("the schedule of 3 steps has a correction for")):
        odeify.from_pretrained(tmp_path / "m")
    # The matrices of another step count (here: the 3-step ones under a 2-step schedule).
    saved["odeify"]["schedules"] = {
        "2": {**Schedule.from_layers([0, 3], 6).to_dict(), "correction": s.to_dict()["correction"]}
    }
    config.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="does not match its config"):
        odeify.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_calibrate_fits_a_correction_that_lowers_the_kl(family, make_gpt2, make_llama):
    model = _model(family, make_gpt2, make_llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.randint(1, 97, (600,), generator=torch.Generator().manual_seed(0))
    fit = dict(batch_size=2, seq_len=24, progress=False, learn_times=False)
    gains = odeify.calibrate(model, [3], data, learn_gains=False, **fit)[3]
    closed = odeify.calibrate(
        model, [3], data, learn_gains=False, correction="linear", iters=0, **fit
    )[3]
    assert closed.layers == gains.layers and closed.schedule.correction.shape == (3, D, D)
    assert not closed.losses  # closed form: no Adam step
    # Every step's least-squares residual drops on its fitting tokens (each step skips a layer).
    assert all(after < before_ for before_, after in closed.residuals)
    ids = data[: 24 * 25].view(25, 24)
    assert _kl(model, ids, closed.schedule) < 0.8 * _kl(model, ids, gains.schedule)
    block = odeify.get_block(model)
    assert torch.equal(block.corrections.n3, closed.schedule.correction)
    torch.testing.assert_close(
        _logits(model, ode_steps=3), _logits(model, ode_steps=3, ode_schedule=closed.schedule)
    )
    # Adam refines the gains and the matrices from there: the KL it fits goes down. One
    # window, for fitting and every Adam step, so the loss is not batch noise; a strong ridge
    # (the fit stays near T = I) leaves something to refine.
    one = dict(batch_size=1, seq_len=24, progress=False, learn_times=False, correction="linear")
    refined = odeify.calibrate(
        model, [3], data[:24], ridge=10.0, iters=15, correction_lr=1e-3, **one
    )[3]
    assert refined.losses[-1] < 0.9 * refined.losses[0]
    assert not torch.equal(refined.schedule.correction, closed.schedule.correction)
    for name, value in model.state_dict().items():
        if name in before:
            assert torch.equal(value, before[name]), name  # weights untouched
    # Teacher forcing fits each step on the original's state: another fit from step 1 on (the
    # student's state there is not the original's), the same at step 0 (both start at x_0).
    teacher, residuals = fit_linear_correction(
        model, gains.schedule, ids, forcing="teacher", ridge=1e-3
    )
    assert len(residuals) == 3 and not torch.allclose(
        teacher.correction[1:], closed.schedule.correction[1:]
    )
    torch.testing.assert_close(teacher.correction[0], closed.schedule.correction[0])


def test_calibrate_refuses_a_correction_it_cannot_fit(make_gpt2, make_llama):
    model = _model("gpt2", make_gpt2, make_llama)
    data = torch.randint(1, 97, (400,))
    with pytest.raises(ValueError, match="correction must be None or one of"):
        odeify.calibrate(model, [3], data, seq_len=16, correction="affine")
    with pytest.raises(ValueError, match="steps start between layers"):
        odeify.calibrate(model, [3], data, seq_len=16, correction="linear", init="uniform")
    with pytest.raises(ValueError, match="forcing must be one of"):
        odeify.calibrate(model, [3], data, seq_len=16, correction="linear", forcing="both")
    with pytest.raises(ValueError, match="ridge must be"):
        odeify.calibrate(model, [3], data, seq_len=16, correction="linear", ridge=-1.0)
    with pytest.raises(ValueError, match="steps start between layers"):
        fit_linear_correction(model, Schedule.uniform(4, 6), data[:64].view(4, 16))
    assert odeify.get_block(model).ode.schedules == {}
