"""The QR (Benettin) recursion on flows whose Lyapunov exponents are known, no transformer."""

import pytest
import torch

from odeify.analysis.benettin import (
    benettin,
    finite_time_lyapunov,
    jvp_tangent,
    random_subspace,
    vjp_adjoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(step_matrix):
    tangent = lambda i, x, q: (x, step_matrix @ q)
    adjoint = lambda i, x, u: step_matrix.mT @ u
    return tangent, adjoint


def test_linear_field_exponents_are_real_parts_of_eigenvalues():
    # A non-normal A with a complex pair (real part 0.3), and real eigenvalues -0.5 and -1.2.
    core = torch.tensor(
        [
            [0.3, -2.0, 0.0, 0.0],
            [2.0, 0.3, 0.0, 0.0],
            [0.0, 0.0, -0.5, 0.0],
            [0.0, 0.0, 0.0, -1.2],
        ],
        dtype=torch.float64,
    )
    basis = torch.eye(4, dtype=torch.float64) + 0.4 * torch.randn(4, 4, dtype=torch.float64)
    a = basis @ core @ torch.linalg.inv(basis)
    # The exact step map at any h: a coarse grid keeps the test fast on a long horizon.
    h, duration = 2.0, 200.0
    tangent, _ = _linear(torch.linalg.matrix_exp(a * h))
    q0 = random_subspace((), 4, 4, dtype=torch.float64)
    exponents = benettin(tangent, torch.zeros(4), q0, int(duration / h), duration).exponents
    expected = torch.linalg.eigvals(a).real.sort(descending=True).values
    assert torch.allclose(exponents.sort(descending=True).values, expected, atol=0.02)


def test_diagonal_field_exact_at_finite_time_after_refinement():
    rates = torch.tensor([0.7, -0.2, 1.5, -3.0, 0.1], dtype=torch.float64)
    tangent, adjoint = _linear(torch.diag(torch.exp(rates / 10)))
    q0 = random_subspace((), 5, 3, dtype=torch.float64)
    plain = finite_time_lyapunov(tangent, torch.zeros(5), q0, 10)
    refined = finite_time_lyapunov(tangent, torch.zeros(5), q0, 10, adjoint=adjoint, refine=15)
    top3 = rates.sort(descending=True).values[:3]
    assert torch.allclose(refined.exponents, top3, atol=1e-6)
    assert (refined.residual < 1e-5).all()
    # A random subspace at finite time falls short of the top exponents: refinement is needed.
    assert plain.exponents[0] < top3[0] - 0.05
    assert plain.residual.isnan().all()


def test_independent_systems_in_a_batch():
    rates = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    steps = torch.diag_embed(torch.exp(rates / 4))
    tangent, adjoint = _linear(steps)
    q0 = random_subspace((2,), 2, 2, dtype=torch.float64)
    result = finite_time_lyapunov(tangent, torch.zeros(2, 2), q0, 4, adjoint=adjoint, refine=3)
    assert result.exponents.shape == (2, 2)
    assert torch.allclose(result.exponents, rates.sort(-1, descending=True).values, atol=1e-9)


def _rk4(field, h):
    def step(i, x):
        k1 = field(x)
        k2 = field(x + h / 2 * k1)
        k3 = field(x + h / 2 * k2)
        k4 = field(x + h * k3)
        return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    return step


def test_nonlinear_field_through_jvp_and_vjp():
    # dx/dt = r x + x^2 - x^3 keeps x = 0 fixed with Jacobian diag(r): exponents r, through
    # the automatic tangent and adjoint maps of an RK4 step.
    rates = torch.tensor([0.8, -0.4, 0.3], dtype=torch.float64)
    step = _rk4(lambda x: rates * x + x**2 - x**3, 0.1)
    q0 = random_subspace((), 3, 2, dtype=torch.float64)
    x0 = torch.zeros(3, dtype=torch.float64)
    tangent, adjoint = jvp_tangent(step), vjp_adjoint(step)
    result = finite_time_lyapunov(tangent, x0, q0, 20, 2.0, adjoint=adjoint, refine=5)
    assert torch.allclose(
        result.exponents, torch.tensor([0.8, 0.3], dtype=torch.float64), atol=1e-5
    )


def test_jvp_tangent_advances_the_state_and_pushes_columns():
    step = lambda i, x: x + 0.5 * x**2
    x = torch.tensor([1.0, 2.0])
    x_next, w = jvp_tangent(step)(0, x, torch.eye(2))
    assert torch.allclose(x_next, torch.tensor([1.5, 4.0]))
    assert torch.allclose(w, torch.diag(1 + x))


def test_bad_arguments():
    tangent, _ = _linear(torch.eye(2))
    q0 = torch.eye(2)
    with pytest.raises(ValueError, match="adjoint"):
        finite_time_lyapunov(tangent, torch.zeros(2), q0, 3, refine=1)
    with pytest.raises(ValueError, match="refine"):
        finite_time_lyapunov(tangent, torch.zeros(2), q0, 3, refine=-1)
    with pytest.raises(ValueError, match="duration"):
        finite_time_lyapunov(tangent, torch.zeros(2), q0, 3, duration=0.0)
    with pytest.raises(ValueError, match="between 1 and the dimension 2"):
        random_subspace((), 2, 3)
