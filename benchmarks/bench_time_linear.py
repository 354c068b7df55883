"""time_linear: the fused Triton kernel against the PyTorch formulations and the dense bound.

Run on a GPU (see benchmarks/RESULTS.md):

    python -m pytest benchmarks/bench_time_linear.py --benchmark-columns=mean,stddev,rounds

Per group (one pass, device, dtype and shape; per-sample coefficients [B, K], no bias):

- ``fused``: ``time_linear(..., backend="triton")``, CUDA only (skipped elsewhere);
- ``reference``: materialise the B per-sample weights with einsum, then ``bmm``;
- ``kgemm``: the K GEMMs ``x @ P_k^T`` as one GEMM against the stacked basis, then the weighted
  sum over k;
- ``shared_gemm``: one ``F.linear`` with a single weight of the same size, the group's baseline:
  the cost of the layer if every sample sat at the same t, a lower bound for the others.

``extra_info`` holds ``tflops``: the shared-weight GEMM's FLOPs (2*B*T*d_out*d_in forward, three
times that for forward+backward) over the mean time, the same count for every entry so it
compares against the dense-GEMM ceiling; and ``gbps``: the compulsory memory traffic (x, y and the
K basis matrices forward; backward adds reading x, grad_y and the basis and writing grad_x and
grad_basis; K = 1 for ``shared_gemm``) over the mean time, against the copy ceiling. The
``ceiling`` group measures both ceilings on the same device in the same run.

On CUDA the shapes are the issue's (d in {768, 2048}, K in {4, 16, 32}, B x T in {8 x 1,
8 x 512, 64 x 128}, bf16). Without CUDA the PyTorch entries run a reduced set in fp32 so the file
is exercised; their group names say "cpu", and they are CPU timings, not GPU estimates.
``ODEIFY_BENCH_QUICK=1`` keeps only d = 64, K = 2 and B x T in {2 x 1, 2 x 16} (``make test``'s
smoke run, and ``benchmarks/gpu.sh --dry-run``, where ``fused`` runs once in Triton's
interpreter under TRITON_INTERPRET=1: a check that the entry works, not a timing).
"""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from odeify.time_linear import time_linear

QUICK = os.environ.get("ODEIFY_BENCH_QUICK") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
if QUICK:
    DIMS, KS, BATCHES = (64,), (2,), ((2, 1), (2, 16))
elif CUDA:
    DIMS, KS, BATCHES = (768, 2048), (4, 16, 32), ((8, 1), (8, 512), (64, 128))
else:
    DIMS, KS, BATCHES = (768,), (4,), ((8, 1), (8, 64))

IMPLS = ("fused", "reference", "kgemm", "shared_gemm")
PASSES = ("fwd", "fwd+bwd")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _k_gemms(x, coeffs, basis):
    b, t, d_in = x.shape
    k, d_out, _ = basis.shape
    z = (x @ basis.view(k * d_out, d_in).T).view(b, t, k, d_out)
    return torch.einsum("btko,bk->bto", z, coeffs)


def _case(impl: str, d: int, k: int, b: int, t: int, backward: bool):
    """(function of no arguments running the pass, compulsory bytes)."""
    elt = torch.finfo(DTYPE).bits // 8
    x = torch.randn(b, t, d, device=DEVICE, dtype=DTYPE)
    grad_y = torch.randn(b, t, d, device=DEVICE, dtype=DTYPE)
    if impl == "shared_gemm":
        weight = torch.randn(d, d, device=DEVICE, dtype=DTYPE) / d**0.5
        inputs = (x, weight)
        forward = lambda: F.linear(x, weight)
        n_weights = 1
    else:
        coeffs = torch.rand(b, k, device=DEVICE, dtype=DTYPE)
        basis = torch.randn(k, d, d, device=DEVICE, dtype=DTYPE) / d**0.5
        inputs = (x, coeffs, basis)
        forward = {
            "fused": lambda: time_linear(x, coeffs, basis, backend="triton"),
            "reference": lambda: time_linear(x, coeffs, basis, backend="reference"),
            "kgemm": lambda: _k_gemms(x, coeffs, basis),
        }[impl]
        n_weights = k
    activations = b * t * d
    if not backward:
        return forward, elt * (2 * activations + n_weights * d * d)
    for v in inputs:
        v.requires_grad_(True)
    # autograd.grad rather than backward(): accumulating into .grad would add a read and a write
    # of every gradient to each round.
    step = lambda: torch.autograd.grad(forward(), inputs, grad_y)
    return step, elt * (5 * activations + 3 * n_weights * d * d)


@pytest.mark.parametrize("b,t", BATCHES, ids=[f"BxT={b}x{t}" for b, t in BATCHES])
@pytest.mark.parametrize("k", KS, ids=[f"K={k}" for k in KS])
@pytest.mark.parametrize("d", DIMS, ids=[f"d={d}" for d in DIMS])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
def test_time_linear(benchmark, impl, pass_, d, k, b, t):
    if impl == "fused":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("the fused kernel needs triton (not installed)")
        from odeify._triton_time_linear import INTERPRETED

        if INTERPRETED and not QUICK:
            pytest.skip("TRITON_INTERPRET=1 runs the kernel on the CPU; unset it to time it")
        if not CUDA and not INTERPRETED:
            pytest.skip("the fused Triton kernel needs CUDA (or TRITON_INTERPRET=1, quick mode)")
    torch.manual_seed(0)
    fn, n_bytes = _case(impl, d, k, b, t, backward=pass_ == "fwd+bwd")
    flops = 2 * b * t * d * d * (3 if pass_ == "fwd+bwd" else 1)
    benchmark.group = f"time_linear {pass_} {DEVICE} {str(DTYPE)[6:]} d={d} K={k} BxT={b}x{t}"
    benchmark.extra_info["baseline"] = impl == "shared_gemm"
    fn()  # compile / autotune / allocate outside the timed rounds
    _sync()
    benchmark(lambda: (fn(), _sync()))
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    if benchmark.enabled:
        mean = benchmark.stats.stats.mean
        benchmark.extra_info["tflops"] = flops / mean / 1e12
        benchmark.extra_info["gbps"] = n_bytes / mean / 1e9


@pytest.mark.parametrize("kind", ["copy", "dense_gemm"])
def test_ceiling(benchmark, kind):
    """The device's achievable bandwidth and dense-GEMM rate, measured beside the others."""
    benchmark.group = f"ceiling {DEVICE} {str(DTYPE)[6:]}"
    if kind == "copy":
        n = 1 << 16 if QUICK else (1 << 29) if CUDA else (1 << 25)
        src = torch.randn(n, device=DEVICE, dtype=DTYPE)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)
        # Read and written once each.
        n_bytes, flops = 2 * n * src.element_size(), None
    else:
        n = 64 if QUICK else 8192 if CUDA else 1024
        a, w = (torch.randn(n, n, device=DEVICE, dtype=DTYPE) for _ in range(2))
        fn = lambda: a @ w
        n_bytes, flops = None, 2 * n**3
    fn()  # cuBLAS initialisation outside the timed rounds
    _sync()
    benchmark(lambda: (fn(), _sync()))
    if not benchmark.enabled:
        return
    mean = benchmark.stats.stats.mean
    if n_bytes is not None:
        benchmark.extra_info["gbps"] = n_bytes / mean / 1e9
    if flops is not None:
        benchmark.extra_info["tflops"] = flops / mean / 1e12
