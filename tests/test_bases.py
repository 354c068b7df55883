"""Time bases: exactness at the layer nodes, polynomial identities, the learned Fourier unit."""

import numpy as np
import pytest
import torch

from odeify.bases import BASES, ChebyshevBasis, FourierUnit, HatBasis, LegendreBasis, make_basis


@pytest.mark.parametrize("num_layers", [1, 2, 7, 30])
def test_hat_basis_is_the_identity_at_layer_times(num_layers):
    basis = make_basis("hat", num_layers, num_layers)
    c = basis(torch.arange(num_layers, dtype=torch.float64) / num_layers)
    assert torch.equal(c, torch.eye(num_layers))


def test_hat_basis_is_a_partition_of_unity_and_blends_neighbours():
    basis = HatBasis(5, 0.0, 0.8)
    t = torch.rand(100, dtype=torch.float64)
    c = basis(t)
    torch.testing.assert_close(c.sum(1), torch.ones(100))
    assert ((c > 0).sum(1) <= 2).all()
    torch.testing.assert_close(basis(torch.tensor([0.1]))[0, :2], torch.tensor([0.5, 0.5]))


def test_times_outside_the_layer_range_are_clamped():
    basis = HatBasis(4, 0.0, 0.75)
    torch.testing.assert_close(basis(torch.tensor([0.9, 1.0])), basis(torch.tensor([0.75, 0.75])))
    torch.testing.assert_close(basis(torch.tensor([-0.2])), basis(torch.tensor([0.0])))


@pytest.mark.parametrize(
    "cls,numpy_basis",
    [(ChebyshevBasis, np.polynomial.chebyshev), (LegendreBasis, np.polynomial.legendre)],
)
def test_polynomial_bases_match_numpy(cls, numpy_basis):
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    ours = cls(6, 0.0, 1.0)(t).double()
    x = 2 * t.numpy() - 1
    theirs = np.stack(
        [
            numpy_basis.Chebyshev.basis(k)(x)
            if cls is ChebyshevBasis
            else numpy_basis.Legendre.basis(k)(x)
            for k in range(6)
        ],
        1,
    )
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-6)


def test_bases_return_float32_on_the_device_of_t():
    for name in BASES:
        c = make_basis(name, 4, 6)(torch.tensor([0.0, 0.5], dtype=torch.float64))
        assert c.dtype == torch.float32 and c.shape == (2, 4)


def test_fourier_unit_features_and_constant_term():
    unit = FourierUnit(num_basis=5, features=8, hidden=16)
    t = torch.tensor([0.0, 0.3, 0.9])
    phi = unit.features(t)
    assert phi.shape == (3, 17)
    torch.testing.assert_close(phi[:, 0], t)
    torch.testing.assert_close(phi[1, 1], torch.sin(torch.tensor(300.0)))  # w_0 = 1
    c = unit(t)
    torch.testing.assert_close(c[:, 0], torch.ones(3))
    assert c.requires_grad


@pytest.mark.parametrize(
    "name,k,error", [("spline", 3, "unknown basis"), ("fourier", 1, "num_basis >= 2")]
)
def test_bad_basis_choices(name, k, error):
    with pytest.raises(ValueError, match=error):
        make_basis(name, k, 4)


def test_fixed_bases_take_no_options():
    with pytest.raises(ValueError, match="takes no options"):
        make_basis("hat", 3, 3, features=4)
