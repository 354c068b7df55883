"""Time bases: exactness at the layer nodes, polynomial identities, the learned Fourier unit."""

import math

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


def test_fourier_unit_is_its_documented_formula():
    """c(t) = [1, Lin2(SiLU(Lin1(phi(t))))], phi(t) = [t, sin(1000 t w_j), cos(1000 t w_j)],
    w_j = exp(-ln(1e4) j / S), computed here in float64 from the unit's own weights."""
    unit = FourierUnit(num_basis=3, features=4, hidden=5)
    with torch.no_grad():  # biases away from 0, so a dropped bias shows
        unit.lin1.bias.normal_()
        unit.lin2.bias.normal_()
    t = torch.tensor([0.0, 0.1, 0.37, 0.9])
    w = torch.exp(-math.log(1e4) * torch.arange(4, dtype=torch.float64) / 4)
    angles = 1000 * t.double()[:, None] * w[None, :]
    phi = torch.cat([t.double()[:, None], angles.sin(), angles.cos()], dim=1)
    h = torch.nn.functional.silu(phi @ unit.lin1.weight.double().T + unit.lin1.bias.double())
    g = h @ unit.lin2.weight.double().T + unit.lin2.bias.double()
    expected = torch.cat([torch.ones(4, 1, dtype=torch.float64), g], dim=1)
    # float32 evaluation of angles up to 1000: sin/cos of them carry ~1e-4 absolute error.
    torch.testing.assert_close(unit(t).double(), expected, rtol=0, atol=1e-3)
    torch.testing.assert_close(unit.features(t).double(), phi, rtol=0, atol=1e-4)


def test_fourier_unit_frequencies_are_not_saved_and_two_directions_are_the_minimum():
    # The frequencies are a function of `features`: a checkpoint holds only the two linears.
    assert sorted(FourierUnit(num_basis=2).state_dict()) == [
        "lin1.bias",
        "lin1.weight",
        "lin2.bias",
        "lin2.weight",
    ]
    with pytest.raises(ValueError, match="num_basis >= 2"):
        FourierUnit(num_basis=1)


def test_hat_gradient_at_a_node_is_the_unsnapped_formulas():
    """Snapping at the nodes keeps u's gradient, so a calibrated time at a node moves off it as
    the plain formula c_k = max(0, 1 - |u - k|) says (t = 0.5 is node 1 of 3 exactly, so the
    plain formula needs no snap there; torch's subgradients of |.| and max at the kinks)."""
    t = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    c = HatBasis(3, 0.0, 1.0)(t)
    grads = [torch.autograd.grad(c[0, k], t, retain_graph=True)[0].item() for k in range(3)]
    u = t * 2
    plain = (1 - (u - torch.arange(3.0, dtype=torch.float64)).abs()).clamp_min(0)
    expected = [torch.autograd.grad(plain[k], t, retain_graph=True)[0].item() for k in range(3)]
    assert c.detach().tolist() == [[0.0, 1.0, 0.0]]
    assert grads == expected == [-2.0, 0.0, 2.0]
    with pytest.raises(ValueError, match=r"unknown basis 'x'; choose one of hat, chebyshev"):
        make_basis("x", 2, 2)
