"""Integration schemes: native loops against torchdiffeq, order of accuracy, retargeting, dtypes."""

import copy
import re

import pytest
import torch

from odeify import get_block, odeify, set_steps, steps
from odeify.schemes import (
    MAX_STEPS,
    SCHEMES,
    TORCHDIFFEQ_METHODS,
    check_sample_steps,
    check_steps,
    resolve_solver,
    stage_times,
)

IDS = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model, **kw):
    with torch.no_grad():
        return model(IDS, use_cache=False, **kw).logits


@pytest.fixture(params=["gpt2", "llama"])
def model(request, make_gpt2, make_llama):
    raw = make_gpt2() if request.param == "gpt2" else make_llama(num_hidden_layers=4)
    return odeify(raw, progress=False)


@pytest.mark.parametrize(
    "native,reference",
    [("euler", "euler"), ("midpoint", "midpoint"), ("heun", "heun2"), ("rk4", "rk4")],
)
@pytest.mark.parametrize("n", [1, 3, 5])
def test_native_scheme_matches_torchdiffeq(model, native, reference, n):
    ours = _logits(model, ode_scheme=native, ode_steps=n)
    theirs = _logits(model, ode_scheme=f"torchdiffeq:{reference}", ode_steps=n)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


def test_higher_order_schemes_converge_faster(make_llama):
    model = odeify(make_llama(num_hidden_layers=4), basis="chebyshev", progress=False)
    exact = _logits(model, ode_scheme="rk4", ode_steps=64)
    errors = {
        s: (_logits(model, ode_scheme=s, ode_steps=8) - exact).abs().max().item()
        for s in ("euler", "midpoint", "rk4")
    }
    assert errors["rk4"] < errors["midpoint"] < errors["euler"]
    # First order: halving h halves Euler's error (within a loose factor).
    half = (_logits(model, ode_scheme="euler", ode_steps=16) - exact).abs().max().item()
    assert 1.4 < errors["euler"] / half < 2.8


def test_adaptive_solver_agrees_with_fine_fixed_grid(make_gpt2):
    model = odeify(make_gpt2(), basis="chebyshev", progress=False, rtol=1e-7, atol=1e-8)
    fine = _logits(model, ode_scheme="rk4", ode_steps=64)
    torch.testing.assert_close(_logits(model, ode_scheme="dopri5"), fine, rtol=0, atol=1e-4)


def test_adjoint_gradients_match_converged_backprop(make_gpt2):
    raw = make_gpt2(
        n_layer=2, n_embd=16, n_head=2, resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0
    ).double()
    grads = []
    for options in (
        {"scheme": "rk4", "steps": 48},
        {"scheme": "dopri5", "rtol": 1e-8, "atol": 1e-9, "adjoint": True},
    ):
        model = odeify(copy.deepcopy(raw), basis="chebyshev", progress=False, **options).train()
        model(IDS, labels=IDS, use_cache=False).loss.backward()
        grads.append(get_block(model).basis_tensor("mlp.c_fc.weight").grad)
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-5


def test_steps_and_scheme_change_between_calls_without_rebuilding(model):
    block = get_block(model)
    base = _logits(model)
    with steps(model, 2, "heun"):
        assert (block.ode.steps, block.ode.scheme) == (2, "heun")
        inside = _logits(model)
    assert (block.ode.steps, block.ode.scheme) == (None, "sequential")
    torch.testing.assert_close(
        inside, _logits(model, ode_steps=2, ode_scheme="heun"), rtol=0, atol=0
    )
    torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    assert not torch.allclose(inside, base)


def test_set_steps_is_saved_in_the_config(model):
    set_steps(model, 7, scheme="midpoint")
    assert model.config.odeify["steps"] == 7 and model.config.odeify["scheme"] == "midpoint"
    torch.testing.assert_close(
        _logits(model), _logits(model, ode_steps=7, ode_scheme="midpoint"), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "bad,error",
    [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError)],
)
def test_bad_step_counts_are_refused(model, bad, error):
    with pytest.raises(error, match="steps must be"), steps(model, bad):
        pass
    with pytest.raises(error, match="steps must be"):
        _logits(model, ode_steps=bad)


def test_unknown_scheme_names_the_choices(model):
    with pytest.raises(ValueError, match="unknown scheme 'rk5'.*sequential.*dopri5"):
        _logits(model, ode_scheme="rk5")


def test_stage_grid_shares_times_between_steps():
    times, index = stage_times(SCHEMES["rk4"], 3)
    assert len(index) == 12 and len(times) == 10  # the end of step i is the start of step i + 1
    assert times[0] == 0.0 and times[-1] == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_run_and_match_their_original(make_gpt2, dtype):
    stock = make_gpt2()
    raw = copy.deepcopy(stock).to(dtype)
    with torch.no_grad():
        before = raw(IDS).logits
    model = odeify(raw, progress=False)
    after = _logits(model)
    assert after.dtype == dtype and get_block(model).basis_tensor("ln_1.weight").dtype == dtype
    # Exact in float32; in half precision GPT-2's Conv1D layout ([in, out]) and ours ([out, in])
    # take different CPU kernels, so the last bits may differ.
    torch.testing.assert_close(after.float(), before.float(), rtol=1e-2, atol=1e-2)
    # Off the layer grid, RK4 in half precision follows the float32 model's RK4 (within 7e-3
    # for bf16 and 1e-3 for fp16 here, logits of size 1; RK4 and Euler differ by 0.8).
    full = _logits(odeify(stock, progress=False), ode_steps=3, ode_scheme="rk4")
    half = _logits(model, ode_steps=3, ode_scheme="rk4")
    torch.testing.assert_close(half.float(), full, rtol=0, atol=2e-2)


def test_model_to_another_dtype_after_conversion(make_llama):
    model = odeify(make_llama(), progress=False)
    full = _logits(model)
    model.to(torch.bfloat16)
    half = _logits(model)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adaptive_solvers_refuse_half_precision_naming_the_dtype(make_gpt2, dtype):
    model = odeify(make_gpt2(), progress=False).to(dtype)
    ids = torch.randint(1, 97, (1, 4))
    with pytest.raises(ValueError, match=f"dopri5.*{dtype}.*model.float\\(\\)"):
        model(ids, ode_steps=4, ode_scheme="dopri5", use_cache=False)


def test_per_sample_step_counts_are_checked():
    # One sample is a batch too; an empty list, booleans and floats are not step counts.
    assert check_sample_steps([1, 4]).tolist() == [1, 4]  # one step is a grid
    one = check_sample_steps([3])
    assert torch.equal(one, torch.tensor([3])) and one.dtype == torch.int64
    assert torch.equal(
        check_sample_steps(torch.tensor([2, 5], dtype=torch.int32)), torch.tensor([2, 5])
    )
    with pytest.raises(ValueError, match="one count per sample, got shape \\(0,\\)"):
        check_sample_steps([])
    with pytest.raises(TypeError, match="must be integers, got dtype torch.bool"):
        check_sample_steps(torch.tensor([True, True]))
    assert check_sample_steps([MAX_STEPS]).tolist() == [100_000]
    with pytest.raises(ValueError, match="at most 100,000, got \\[2, 100001\\]"):
        check_sample_steps([2, MAX_STEPS + 1])


def test_step_counts_are_checked_up_to_max_steps():
    assert check_steps(MAX_STEPS) == 100_000 and check_steps(1) == 1
    assert type(check_steps(torch.tensor(3).numpy()[()])) is int  # a numpy integer is a count
    with pytest.raises(TypeError, match=r"got 2.5 \(float\)"):
        check_steps(2.5)
    with pytest.raises(ValueError, match="at most 100,000 \\(one weight set each\\), got 100,001"):
        check_steps(MAX_STEPS + 1)


def test_scheme_names_are_resolved_or_refused_in_full():
    assert resolve_solver("torchdiffeq:rk4").method == "rk4"
    assert resolve_solver("rk4").native is SCHEMES["rk4"]
    with pytest.raises(TypeError, match="^scheme must be a string, got int$"):
        resolve_solver(3)
    listed = r"Native fixed-grid schemes: sequential, euler, midpoint, heun, rk4; torchdiffeq "
    methods = re.escape(", ".join(TORCHDIFFEQ_METHODS))  # every method, as the user types it
    with pytest.raises(ValueError, match=rf"^unknown scheme 'rk5'\. {listed}methods: {methods} "):
        resolve_solver("rk5")
    with pytest.raises(ValueError, match=r"\(prefix 'torchdiffeq:' to force one\)$"):
        resolve_solver("torchdiffeq:sequential")
