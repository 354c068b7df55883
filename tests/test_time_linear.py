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


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_reference_is_each_samples_own_linear(shared, bias):
    # Independent of the reference's einsum/bmm: sample b's weight summed term by term, then
    # torch's own linear; float64, so only the summation order differs.
    x, c, p, b = make_inputs((3, 4, 6, 5, 2), shared=shared, bias=bias, dtype=torch.float64)
    x, c, p = x.cpu(), c.cpu(), p.cpu()
    b = None if b is None else b.cpu()
    y = time_linear(x, c, p, b, backend="reference")
    for i in range(3):
        ci = c if shared else c[i]
        weight = sum(ci[k] * p[k] for k in range(2))
        bias_i = None if b is None else sum(ci[k] * b[k] for k in range(2))
        assert_close(y[i], torch.nn.functional.linear(x[i], weight, bias_i), rtol=1e-14, atol=1e-14)


def test_input_errors_in_full(monkeypatch):
    # The checks are shared by both backends; a partial match lets a mangled message pass.
    x, c, p, b = (v.cpu() for v in make_inputs((3, 4, 6, 5, 2), shared=False, bias=True))
    cases = [
        (
            (x[0], c, p, b),
            ValueError,
            "x must be [B, T, d_in], got shape (4, 6); add a batch or "
            "sequence axis with unsqueeze, or flatten extra ones into T",
        ),
        ((x, c, p[0], b), ValueError, "basis must be [K, d_out, d_in], got shape (5, 6)"),
        (
            (x, c[None], p, b),
            ValueError,
            "coeffs must be [B, K] (per sample) or [K] (shared), got shape (1, 3, 2)",
        ),
        (
            (x, c[:, :0], p[:0], b[:0]),
            ValueError,
            "K = 0: basis [K, d_out, d_in] holds no matrices",
        ),
        (
            (x, c[:, :1], p, b),
            ValueError,
            "coeffs has 1 coefficients per sample but basis has K = 2 matrices; they must match",
        ),
        (  # shared coefficients: their count is the last (only) axis
            (x, c[0, :1], p, b),
            ValueError,
            "coeffs has 1 coefficients per sample but basis has K = 2 matrices; they must match",
        ),
        (
            (x, c[:1], p, b),
            ValueError,
            "coeffs has 1 rows but x has B = 3 samples; pass one row "
            "per sample, or a [K] tensor to share it",
        ),
        (
            (x, c, p.transpose(1, 2), b),
            ValueError,
            "x has d_in = 6 but basis [K, d_out, d_in] has "
            "d_in = 5; basis matrices are in nn.Linear layout [out, in] (transpose a [K, in, out] "
            "basis)",
        ),
        (
            (x, c, p, b[:, :3]),
            ValueError,
            "bias_basis must be [K, d_out] = (2, 5), got shape (2, 3)",
        ),
        (
            (x, c.double(), p, b),
            TypeError,
            "all inputs must share one dtype, got x torch.float32, "
            "coeffs torch.float64, basis torch.float32, bias_basis torch.float32; cast them with .to()",
        ),
        (
            (x, c.double(), p, None),
            TypeError,
            "all inputs must share one dtype, got x "
            "torch.float32, coeffs torch.float64, basis torch.float32; cast them with .to()",
        ),
        (
            (x.int(), c, p, b),
            TypeError,
            "x has dtype torch.int32; supported are fp32, fp16, bf16 "
            "and (reference backend only) fp64",
        ),
        (
            (x, c, p.to("meta"), b),
            ValueError,
            "all inputs must be on one device, got x cpu, "
            "coeffs cpu, basis meta, bias_basis cpu; move them with .to()",
        ),
        ((x.tolist(), c, p, b), TypeError, "x must be a torch.Tensor, got list"),
        ((x, c, p, 3.0), TypeError, "bias_basis must be a torch.Tensor, got float"),
        (
            (x, c, _noncontiguous(p), b),
            ValueError,
            "basis is not contiguous (shape (2, 5, 6), "
            "strides (1, 2, 10)); call .contiguous() on it: the kernels read rows as unit-stride "
            "tiles and a silent copy would hide its cost",
        ),
        (
            (x, c, p, b),
            ValueError,
            "backend must be one of ('auto', 'triton', 'reference'), got 'cuda'",
        ),
    ]
    for args, error, message in cases:
        backend = "cuda" if "'cuda'" in message else "reference"
        with pytest.raises(error) as raised:
            time_linear(*args, backend=backend)
        assert str(raised.value) == "time_linear: " + message
    with pytest.raises(TypeError) as raised:
        time_linear(x.double(), c.double(), p.double(), b.double(), backend="triton")
    assert str(raised.value) == (
        "time_linear: the Triton backend supports fp32, fp16 and bf16, got torch.float64; "
        'use backend="reference" (or "auto") for it'
    )
    monkeypatch.setattr(ttl, "INTERPRETED", False)
    with pytest.raises(RuntimeError) as raised:
        time_linear(x, c, p, b, backend="triton")
    assert str(raised.value) == (
        "time_linear: the Triton backend needs CUDA tensors, got cpu ones; move them to a GPU, "
        'use backend="reference", or set TRITON_INTERPRET=1 before odeify\'s kernels are '
        "imported to run the kernels on the CPU (slow; for tests)"
    )
    import odeify.time_linear as tl

    monkeypatch.setattr(tl, "_TRITON_INSTALLED", False)
    with pytest.raises(RuntimeError) as raised:
        time_linear(x, c, p, b, backend="triton")
    assert str(raised.value) == (
        "time_linear: the Triton backend needs the triton package, which is not installed (it "
        'ships wheels for Linux x86_64); use backend="reference" (or "auto")'
    )


@pytest.mark.parametrize(
    "m,n,dtype,expected",
    [
        (1, 40, torch.bfloat16, ttl._Blocks(16, 64, 64, 4, 3)),  # decode: narrow column tiles
        (17, 40, torch.float32, ttl._Blocks(32, 64, 32, 4, 3)),
        (33, 40, torch.float16, ttl._Blocks(64, 128, 64, 4, 3)),
        (64, 40, torch.float32, ttl._Blocks(64, 128, 32, 4, 3)),
        (100, 40, torch.float32, ttl._Blocks(128, 128, 32, 8, 3)),  # 128 x 128: eight warps
        (5000, 40, torch.bfloat16, ttl._Blocks(128, 128, 64, 8, 3)),
    ],
)
def test_tile_sizes_by_rows_and_dtype(m, n, dtype, expected):
    # The heuristic tiles of the module docstring (the kernels are correct at any tile size,
    # blocks16 above; these are what ships).
    assert ttl._matmul_blocks(m, n, dtype) == expected


def test_weight_grad_tiles_by_dtype():
    assert ttl._weight_grad_blocks(torch.float32) == ttl._Blocks(64, 64, 32, 4, 3)
    assert ttl._weight_grad_blocks(torch.bfloat16) == ttl._Blocks(64, 64, 64, 4, 3)


def test_dot_options_interpreted_and_compiled(monkeypatch):
    monkeypatch.setattr(ttl, "INTERPRETED", True)
    assert ttl._dot_options(torch.float32) == {"UPCAST_DOT": False, "INPUT_PRECISION": "ieee"}
    assert ttl._dot_options(torch.bfloat16) == {"UPCAST_DOT": True, "INPUT_PRECISION": "ieee"}
    monkeypatch.setattr(ttl, "INTERPRETED", False)
    assert ttl._dot_options(torch.float16) == {"UPCAST_DOT": False, "INPUT_PRECISION": None}
    precision = torch.get_float32_matmul_precision()
    try:
        for setting, expected in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert ttl._dot_options(torch.float32) == {
                "UPCAST_DOT": False,
                "INPUT_PRECISION": expected,
            }
    finally:
        torch.set_float32_matmul_precision(precision)


class _Launches:
    """A kernel stand-in that records each launch's grid and sample count, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.grids.append((grid[0], args[6]))  # programs, samples in this launch
            return launch(*args, **kwargs)

        return run


@pytest.mark.parametrize("budget,samples", [(1, [1, 1, 1]), (2, [2, 1]), (3, [3]), (99, [3])])
def test_g_chunks_hold_as_many_samples_as_the_budget_allows(monkeypatch, budget, samples):
    shape = (3, 6, 20, 18, 2)  # G of one sample: 18 x 20 fp32
    monkeypatch.setattr(ttl, "_G_BUDGET_BYTES", budget * 4 * 18 * 20)
    launches = _Launches(ttl._weight_grad_kernel)
    monkeypatch.setattr(ttl, "_weight_grad_kernel", launches)
    inputs = with_grad(make_inputs(shape, shared=False, bias=False))
    grad_y = torch.randn(shape[0], shape[1], shape[3], device=DEVICE)
    _, grads = run(inputs, "triton", grad_y)
    # one tile of 64 x 64 covers 18 x 20: a program per sample
    assert launches.grids == [(n, n) for n in samples]
    _, exact = run(float64(inputs), "reference", grad_y.double())
    for g, e in zip(grads[:3], exact[:3], strict=True):
        assert_close(g.double(), e, rtol=1e-5, atol=1e-4)


def test_float64_default_dtype_leaves_the_fp32_buffers(monkeypatch):
    shape = (2, 5, 24, 40, 3)
    inputs = with_grad(make_inputs(shape, shared=False, bias=True))
    grad_y = torch.randn(shape[0], shape[1], shape[3], device=DEVICE)
    _, exact = run(float64(inputs), "reference", grad_y.double())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        y, grads = run(inputs, "triton", grad_y)
    finally:
        torch.set_default_dtype(default)
    assert y.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    for g, e in zip(grads, exact, strict=True):
        assert_close(g.double(), e, rtol=1e-5, atol=1e-4)
