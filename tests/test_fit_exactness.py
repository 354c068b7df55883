"""Least-squares fits are deterministic and exact where K >= L promises it, and say so when not."""

import warnings
from pathlib import Path

import pytest
import torch
from _stacklevel import record_callers

from odeify.weight_function import WeightFunction


def _fit(basis, num_basis, num_layers):
    samples = {
        "fc.weight": torch.randn(num_layers, 16, 8, generator=torch.Generator().manual_seed(0))
    }
    wf = WeightFunction(
        {"fc.weight": torch.Size([16, 8])}, basis, num_basis, num_layers, {}, lambda name: "mlp"
    )
    return wf.fit(samples, progress=False)["fc.weight"]


@pytest.mark.parametrize("basis", ["chebyshev", "legendre"])
def test_more_basis_tensors_than_layers_fit_exactly_and_the_same_every_time(basis):
    with pytest.warns(UserWarning, match="K = 100 > L = 4"):
        residuals = [_fit(basis, 100, 4) for _ in range(4)]
    assert len(set(residuals)) == 1 and residuals[0] < 1e-6


def test_hat_with_more_nodes_than_layers_warns_and_still_fits_the_layers():
    with pytest.warns(UserWarning, match="do not determine the basis tensors"):
        assert _fit("hat", 8, 4) < 1e-6


def test_an_ill_conditioned_exact_fit_is_reported():
    with pytest.warns(UserWarning, match="not exact although K = 30 >= L = 30"):
        assert _fit("chebyshev", 30, 30) > 1e-4


@pytest.mark.parametrize("basis, k", [("hat", 4), ("chebyshev", 4), ("hat", 3), ("fourier", 21)])
def test_exact_or_compressing_fits_are_quiet(basis, k):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(basis, k, 4)


def _fit_at(basis, num_layers, dtype):
    samples = torch.randn(num_layers, 16, 8, generator=torch.Generator().manual_seed(0))
    wf = WeightFunction(
        {"fc.weight": torch.Size([16, 8])},
        basis,
        num_layers,
        num_layers,
        {},
        lambda name: "mlp",
        dtype=dtype,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float32 at L = 30 warns that the fit is inexact
        residual = wf.fit({"fc.weight": samples.to(dtype)}, progress=False)["fc.weight"]
    return wf, samples, residual


@pytest.mark.parametrize("basis", ["chebyshev", "legendre"])
def test_a_smooth_basis_at_realistic_depth_fits_to_the_rounding_of_its_storage(basis):
    """L = K = 30 (SmolLM2's depth): the float64 least-squares solution is exact; what is left is
    rounding it to the model's dtype, amplified by the basis' conditioning at equispaced times."""
    layers = 30
    # float64 storage: the solve's own error (condition ~1e6 x 1e-16) is far below the float32
    # resolution at which fit() measures residuals, so the fit is exact at that resolution.
    assert _fit_at(basis, layers, torch.float64)[2] < 2**-24
    # float32 storage: each P_k rounds by up to 2^-24 relative, and W(t_l) = sum_k c_k(t_l) P_k
    # adds those errors with weights |c_k(t_l)| ||P_k|| (in quadrature, uniform rounding: 1/sqrt(3)).
    wf, samples, residual = _fit_at(basis, layers, torch.float32)
    c = wf.coefficients([layer / layers for layer in range(layers)])["shared"].double()
    norms = wf.basis_tensor("fc.weight").double().flatten(1).norm(dim=1)
    rounding = ((c**2) @ norms**2).sum().sqrt() * 2**-24 / 3**0.5 / samples.double().norm()
    # Factor 4: the K-term sum evaluated in float32 rounds about as much again (measured: 1.8x
    # and 3.1x the storage estimate). A solve in float32 instead of float64 is ten times over.
    assert residual < 4 * rounding.item()
    assert rounding.item() < 0.02  # the estimate itself is not vacuous at this depth


# fit()'s warnings name its caller (this file), not the frame torch.no_grad() wraps fit in. Only
# "not inside torch" is asserted: mutmut's trampolines add frames of their own.
_TORCH = str(Path(torch.__file__).parent)
# The frame fit's warnings name, counted from warnings.warn: _warn_inexact, fit, the wrapper
# torch.no_grad() puts around fit, then fit's caller.
_FIT_CALLER = 4
_SHAPES = {"fc.weight": torch.Size([3, 2]), "fc.bias": torch.Size([3])}


def test_the_fit_residual_is_the_least_squares_residual_over_the_layers():
    # Hat K = 3 over L = 4 layers compresses: the residual is that of the float64 solve.
    wf = WeightFunction(_SHAPES, "hat", 3, 4, {}, lambda name: "mlp")
    g = torch.Generator().manual_seed(0)
    samples = {name: torch.randn(4, *shape, generator=g) for name, shape in _SHAPES.items()}
    wf.fit(samples, progress=False)
    c = wf.coefficients([layer / 4 for layer in range(4)])["shared"].double()
    for name, p in samples.items():
        flat = p.reshape(4, -1).double()
        fit = c @ torch.linalg.lstsq(c, flat).solution
        want = ((fit - flat).norm() / flat.norm()).item()
        assert wf.fit_residuals[name] == pytest.approx(want, rel=1e-5)
        assert 0.05 < want < 1  # a compressing fit leaves a visible residual
    # Relative: the same for layers a thousand times smaller (norms below 1).
    first = dict(wf.fit_residuals)
    small = {name: p * 1e-3 for name, p in samples.items()}
    assert all(p.norm() < 1 for p in small.values())
    scaled = wf.fit(small, progress=False)
    for name in samples:
        assert scaled[name] == pytest.approx(first[name], rel=1e-5)
        assert scaled[name] > 0.05


def test_a_zero_layer_stack_fits_with_zero_residual():
    wf = WeightFunction(_SHAPES, "chebyshev", 3, 4, {}, lambda name: "mlp")
    zeros = {name: torch.zeros(4, *shape) for name, shape in _SHAPES.items()}
    assert wf.fit(zeros, progress=False) == {"fc.weight": 0.0, "fc.bias": 0.0}


def test_fit_warnings_point_at_the_caller_with_their_full_wording(monkeypatch):
    wf = WeightFunction(_SHAPES, "hat", 8, 4, {}, lambda name: "mlp")
    samples = {name: torch.randn(4, *shape) for name, shape in _SHAPES.items()}
    callers = record_callers(monkeypatch, _FIT_CALLER)
    with pytest.warns(UserWarning) as record:
        wf.fit(samples, progress=False)
    assert [str(w.message) for w in record] == [
        "num_basis K = 8 > L = 4 layers: the layers do not determine the basis tensors; the "
        "minimum-norm fit is exact at the layer times, but W(t) between them is not fitted to "
        "anything (use K <= L)"
    ]
    assert not record[0].filename.startswith(_TORCH)  # stacklevel 3 named no_grad's wrapper
    assert [(w.filename, w.lineno) for w in record] == callers


def test_an_inexact_fit_names_its_worst_parameter(monkeypatch):
    wf = WeightFunction(_SHAPES, "chebyshev", 30, 30, {}, lambda name: "mlp")
    g = torch.Generator().manual_seed(0)
    samples = {name: torch.randn(30, *shape, generator=g) for name, shape in _SHAPES.items()}
    callers = record_callers(monkeypatch, _FIT_CALLER)
    with pytest.warns(UserWarning) as record:
        residuals = wf.fit(samples, progress=False)
    worst = max(residuals, key=residuals.get)
    assert [str(w.message) for w in record] == [
        f"the fit is not exact although K = 30 >= L = 30: relative residual "
        f"{residuals[worst]:.2e} for {worst} (the basis is ill-conditioned at this K in the "
        "model's dtype; the hat basis is exact at K = L)"
    ]
    assert not record[0].filename.startswith(_TORCH)  # stacklevel 3 named no_grad's wrapper
    assert [(w.filename, w.lineno) for w in record] == callers


def test_the_basis_tree_shows_the_original_parameter_names_and_shapes():
    wf = WeightFunction(_SHAPES, "hat", 4, 4, {}, lambda name: "mlp")
    # A linear's tree also says what to use for LoRA: peft quotes it when a LoraConfig targets it.
    leaf = (
        "_ParamTree(weight: [4, 3, 2], bias: [4, 3]; W(t) over 4 basis tensors, not an nn.Linear: "
        "for LoRA use odeify.lora_config(model))"
    )
    assert repr(wf.basis) == f"_ParamTree(\n  (fc): {leaf}\n)"


@pytest.mark.parametrize("as_tensor", [False, True])
def test_layer_times_are_evaluated_in_float64_so_the_hat_is_one_hot_at_every_layer(as_tensor):
    # l / 3 is not a float32 number: rounded to float32, u = 3t misses the node by ~1e-8, more
    # than the 1e-9 the hat basis snaps, and W(l / 3) would blend 1e-8 of the next layer in.
    wf = WeightFunction(_SHAPES, "hat", 3, 3, {}, lambda name: "mlp")
    times = [layer / 3 for layer in range(3)]
    if as_tensor:
        times = torch.tensor(times, dtype=torch.float64)
    c = wf.coefficients(times)["shared"]
    assert c.dtype == torch.float32 and torch.equal(c, torch.eye(3))
    assert wf.fit_residuals == {}  # nothing fitted yet
