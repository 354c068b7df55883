"""time_linear: the Triton kernels against the PyTorch reference and float64, the dispatcher, and
every input error.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is set by
conftest.py); with TRITON_INTERPRET=0 on a GPU machine the same tests run on CUDA. Every tensor
torch.empty returns is NaN-filled here, so a tile a kernel forgets to write fails the comparison.
"""

import pytest
import torch
from torch.testing import assert_close

from odeify import _triton_time_linear as ttl
from odeify.time_linear import time_linear, time_linear_backend

if ttl.INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

# (B, T, d_in, d_out, K). With the 16-wide test blocks each has ragged row, column and reduction
# tails and several tiles per dimension; "aligned" has none, to catch masks that are off by one.
SHAPES = [
    pytest.param((2, 5, 24, 40, 3), id="B2-T5-in24-out40-K3"),
    pytest.param((3, 19, 33, 17, 1), id="B3-T19-in33-out17-K1"),
    pytest.param((2, 1, 16, 32, 2), id="aligned-T1-in16-out32-K2"),
]
INPUTS = ("x", "coeffs", "basis", "bias_basis")


@pytest.fixture(autouse=True)
def _poison_empty():
    # With deterministic algorithms on, torch.empty fills floating tensors with NaN. warn_only,
    # because on CUDA cuBLAS would otherwise refuse to run without CUBLAS_WORKSPACE_CONFIG.
    state = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])


@pytest.fixture(params=["heuristic", "blocks16"])
def blocks(request, monkeypatch):
    """The shipped block sizes (one ragged tile at these shapes) or 16-wide ones (many tiles)."""
    if request.param == "blocks16":
        small = ttl._Blocks(16, 16, 16, 4, 1)
        monkeypatch.setattr(ttl, "_matmul_blocks", lambda m, n, dtype: small)
        monkeypatch.setattr(ttl, "_weight_grad_blocks", lambda dtype: small)
    return request.param


def make_inputs(shape, shared, bias, dtype=torch.float32):
    b, t, d_in, d_out, k = shape
    x = torch.randn(b, t, d_in, device=DEVICE)
    coeffs = torch.randn(k if shared else (b, k), device=DEVICE)
    basis = torch.randn(k, d_out, d_in, device=DEVICE) / d_in**0.5
    bias_basis = torch.randn(k, d_out, device=DEVICE) if bias else None
    return tuple(None if v is None else v.to(dtype) for v in (x, coeffs, basis, bias_basis))


def with_grad(inputs, names=INPUTS):
    return tuple(
        None if v is None else v.detach().clone().requires_grad_(n in names)
        for n, v in zip(INPUTS, inputs, strict=True)
    )


def run(inputs, backend, grad_y=None):
    """Output, and with grad_y the gradients of every input that requires one (None otherwise)."""
    y = time_linear(*inputs, backend=backend)
    if grad_y is None:
        return y
    wanted = [v for v in inputs if v is not None and v.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, grad_y))
    return y, [next(grads) if v is not None and v.requires_grad else None for v in inputs]


def float64(inputs):
    return tuple(None if v is None else v.detach().double().requires_grad_(True) for v in inputs)


def test_poison_is_active():
    assert torch.empty(4).isnan().all()


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference_and_float64(shape, shared, bias, blocks):
    inputs = make_inputs(shape, shared, bias)
    y = run(inputs, "triton")
    assert y.shape == (shape[0], shape[1], shape[3])
    assert_close(y, run(inputs, "reference"), rtol=1e-5, atol=1e-5)
    assert_close(y.double(), run(float64(inputs), "reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference_and_float64(shape, shared, bias, blocks):
    inputs = with_grad(make_inputs(shape, shared, bias))
    grad_y = torch.randn(shape[0], shape[1], shape[3], device=DEVICE)
    _, grads = run(inputs, "triton", grad_y)
    _, ref = run(inputs, "reference", grad_y)
    _, exact = run(float64(inputs), "reference", grad_y.double())
    for name, g, r, e in zip(INPUTS, grads, ref, exact, strict=True):
        if e is None:
            assert not bias and name == "bias_basis"
            continue
        assert g.shape == r.shape, name
        assert_close(g, r, rtol=1e-5, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        assert_close(g.double(), e, rtol=1e-5, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
@pytest.mark.parametrize("needs", INPUTS)
def test_backward_computes_only_the_gradients_asked_for(needs, shared, blocks):
    # Each input alone switches its own kernel branch on (G stored only for basis, the basis
    # contraction only for coeffs); the others' gradients must stay None.
    shape = (2, 7, 20, 18, 2)
    inputs = with_grad(make_inputs(shape, shared, bias=True), names=(needs,))
    grad_y = torch.randn(shape[0], shape[1], shape[3], device=DEVICE)
    _, grads = run(inputs, "triton", grad_y)
    _, exact = run(with_grad(float64(inputs), names=(needs,)), "reference", grad_y.double())
    for name, g, e in zip(INPUTS, grads, exact, strict=True):
        if name == needs:
            assert_close(g.double(), e, rtol=1e-5, atol=1e-4)
        else:
            assert g is None and e is None


def test_backward_splits_the_batch_when_g_exceeds_its_budget(monkeypatch):
    shape = (3, 6, 20, 18, 2)
    # Room for the G of one sample: three chunks, each adding into grad_basis.
    monkeypatch.setattr(ttl, "_G_BUDGET_BYTES", 4 * 18 * 20)
    inputs = with_grad(make_inputs(shape, shared=False, bias=True))
    grad_y = torch.randn(shape[0], shape[1], shape[3], device=DEVICE)
    _, grads = run(inputs, "triton", grad_y)
    _, exact = run(float64(inputs), "reference", grad_y.double())
    for g, e in zip(grads, exact, strict=True):
        assert_close(g.double(), e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_forward_and_backward(dtype):
    shape = (2, 9, 40, 24, 3)
    inputs = with_grad(make_inputs(shape, shared=False, bias=True, dtype=dtype))
    grad_y = torch.randn(shape[0], shape[1], shape[3], device=DEVICE, dtype=dtype)
    y, grads = run(inputs, "triton", grad_y)
    y64, exact = run(float64(inputs), "reference", grad_y.double())
    assert y.dtype == dtype
    assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)
    for g, e, v in zip(grads, exact, inputs, strict=True):
        assert g.dtype == dtype
        # Sums of many rounded terms: tolerance relative to the gradient's own scale.
        assert_close(g.double(), e, rtol=2e-2, atol=2e-2 * e.abs().max().item())
        assert g.shape == v.shape


def test_empty_sequence():
    inputs = with_grad(make_inputs((2, 0, 8, 5, 2), shared=False, bias=True))
    y, grads = run(inputs, "triton", torch.randn(2, 0, 5, device=DEVICE))
    assert y.shape == (2, 0, 5)
    assert grads[0].shape == (2, 0, 8)
    for g in grads[1:]:
        assert torch.equal(g, torch.zeros_like(g))


def test_auto_runs_the_reference_on_cpu(monkeypatch):
    def fail(*args):
        raise AssertionError("auto must not pick Triton for CPU tensors")

    monkeypatch.setattr(ttl, "time_linear_triton", fail)
    inputs = make_inputs((2, 3, 4, 5, 2), shared=False, bias=True)
    cpu = tuple(v.cpu() for v in inputs)
    assert_close(time_linear(*cpu), run(cpu, "reference"))


def test_backend_context_manager_and_argument(monkeypatch):
    calls = []
    monkeypatch.setattr(ttl, "time_linear_triton", lambda *args: calls.append(args) or "triton")
    inputs = make_inputs((2, 3, 4, 5, 2), shared=True, bias=False)
    with time_linear_backend("triton"):
        assert time_linear(*inputs) == "triton"
        # An explicit argument wins over the context.
        assert isinstance(time_linear(*inputs, backend="reference"), torch.Tensor)
        with time_linear_backend("reference"):
            assert isinstance(time_linear(*inputs), torch.Tensor)
        assert time_linear(*inputs) == "triton"
    assert len(calls) == 2
    # Outside the context "auto" is back: Triton only for CUDA tensors.
    assert isinstance(time_linear(*inputs), str) == (DEVICE == "cuda")


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(ttl, "INTERPRETED", False)
    cpu = tuple(v.cpu() for v in make_inputs((1, 2, 3, 4, 1), shared=False, bias=False)[:3])
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        time_linear(*cpu, backend="triton")


def test_triton_backend_refuses_float64():
    inputs = make_inputs((1, 2, 3, 4, 1), shared=False, bias=False, dtype=torch.float64)
    with pytest.raises(TypeError, match="supports fp32, fp16 and bf16"):
        time_linear(*inputs, backend="triton")
    assert time_linear(*inputs).dtype == torch.float64


def _noncontiguous(v):
    return v.transpose(0, -1).contiguous().transpose(0, -1)


BAD_INPUTS = [
    ("x-rank", lambda x, c, p, b: (x[0], c, p, b), ValueError, r"x must be \[B, T, d_in\]"),
    ("basis-rank", lambda x, c, p, b: (x, c, p[0], b), ValueError, r"basis must be \[K, d_out"),
    ("coeffs-rank", lambda x, c, p, b: (x, c[None], p, b), ValueError, r"coeffs must be \[B, K\]"),
    ("K=0", lambda x, c, p, b: (x, c[:, :0], p[:0], b[:0]), ValueError, r"K = 0"),
    ("coeffs-K", lambda x, c, p, b: (x, c[:, :1], p, b), ValueError, r"1 coefficients .* K = 2"),
    ("coeffs-B", lambda x, c, p, b: (x, c[:1], p, b), ValueError, r"1 rows but x has B = 3"),
    ("d_in", lambda x, c, p, b: (x, c, p.transpose(1, 2), b), ValueError, r"nn.Linear layout"),
    ("bias-shape", lambda x, c, p, b: (x, c, p, b[:, :3]), ValueError, r"bias_basis must be"),
    ("dtype", lambda x, c, p, b: (x, c.double(), p, b), TypeError, r"coeffs torch.float64"),
    ("int-dtype", lambda x, c, p, b: (x.int(), c, p, b), TypeError, r"supported are fp32"),
    ("device", lambda x, c, p, b: (x, c, p.to("meta"), b), ValueError, r"basis meta"),
    ("not-tensor", lambda x, c, p, b: (x.tolist(), c, p, b), TypeError, r"x must be a torch"),
] + [
    (
        f"{name}-noncontiguous",
        lambda *args, i=i: tuple(_noncontiguous(v) if j == i else v for j, v in enumerate(args)),
        ValueError,
        rf"{name} is not contiguous",
    )
    for i, name in enumerate(INPUTS)
]


@pytest.mark.parametrize(
    ("corrupt", "error", "match"), [v[1:] for v in BAD_INPUTS], ids=[v[0] for v in BAD_INPUTS]
)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_input_is_rejected_with_a_clear_error(corrupt, error, match, backend):
    x, c, p, b = make_inputs((3, 4, 6, 5, 2), shared=False, bias=True)
    with pytest.raises(error, match=match):
        time_linear(*corrupt(x, c, p, b), backend=backend)


def test_unknown_backend_is_rejected():
    inputs = make_inputs((1, 2, 3, 4, 1), shared=False, bias=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        time_linear(*inputs, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"), time_linear_backend("cuda"):
        pass
