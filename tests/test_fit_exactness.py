"""Least-squares fits are deterministic and exact where K >= L promises it, and say so when not."""

import warnings

import pytest
import torch

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
