"""time_linear: a linear layer whose weight is a per-sample combination of K basis matrices.

``y[b] = x[b] @ (sum_k coeffs[b, k] basis[k])^T + sum_k coeffs[b, k] bias_basis[k]``

This is a time-dependent weight ``W(t) = sum_k c_k(t) P_k`` evaluated at a different t for every
sample of a batch (per-sample time grids in training, per-request step counts in serving).
On CUDA tensors a Triton kernel combines the basis tiles in registers, so the B per-sample
weights are never written to memory; on CPU a PyTorch reference materialises them.

Example:
    >>> import torch
    >>> from odeify.time_linear import time_linear
    >>> x = torch.ones(2, 3, 4)                        # [B, T, d_in]
    >>> basis = torch.stack([torch.eye(5, 4), 2 * torch.eye(5, 4)])  # [K=2, d_out, d_in]
    >>> coeffs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # sample 0 gets P_0, sample 1 gets P_1
    >>> time_linear(x, coeffs, basis)[:, 0]
    tensor([[1., 1., 1., 1., 0.],
            [2., 2., 2., 2., 0.]])
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch
from torch import Tensor

Backend = Literal["auto", "triton", "reference"]
_BACKENDS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = (*_TRITON_DTYPES, torch.float64)
# triton is a dependency only where it has wheels (Linux x86_64); elsewhere "auto" never picks it.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

_default_backend: ContextVar[str] = ContextVar("odeify_time_linear_backend", default="auto")


@contextmanager
def time_linear_backend(backend: Backend) -> Iterator[None]:
    """Use ``backend`` for every :func:`time_linear` call in this block that does not name one.

    Meant for tests and comparisons, e.g. to run the Triton kernels on CPU tensors under
    ``TRITON_INTERPRET=1``, or to force the reference on a GPU.

    Example:
        >>> import torch
        >>> x, c, p = torch.ones(1, 1, 2), torch.ones(1, 1), torch.ones(1, 3, 2)
        >>> with time_linear_backend("reference"):
        ...     time_linear(x, c, p)
        tensor([[[2., 2., 2.]]])
    """
    _check_backend(backend)
    token = _default_backend.set(backend)
    try:
        yield
    finally:
        _default_backend.reset(token)


def time_linear(
    x: Tensor,
    coeffs: Tensor,
    basis: Tensor,
    bias_basis: Tensor | None = None,
    *,
    backend: Backend | None = None,
) -> Tensor:
    """Apply a per-sample linear combination of K weight matrices to a batch of sequences.

    Args:
        x: [B, T, d_in] inputs.
        coeffs: [B, K] per-sample coefficients, or [K] shared by every sample.
        basis: [K, d_out, d_in] basis matrices, each in nn.Linear layout ([out, in]).
        bias_basis: [K, d_out] bias basis, or None for no bias.
        backend: "triton" (Triton kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1
            was set before odeify's kernels were imported), "reference" (PyTorch: materialise
            the per-sample weights, then bmm), or "auto": Triton for fp32/fp16/bf16 CUDA tensors
            where triton is installed, the reference otherwise. None takes the backend set by
            :func:`time_linear_backend`, "auto" outside one.

    All tensors must be contiguous, on one device and of one floating dtype (fp32, fp16, bf16;
    fp64 on the reference only). The Triton kernels combine the weights and accumulate the
    matmul in fp32, rounding each per-sample weight to the input dtype before the matmul as the
    reference's materialised weights are; fp32 matmuls use TF32 when
    torch.get_float32_matmul_precision() is not "highest", as torch's own do.

    Returns:
        [B, T, d_out] in x's dtype, differentiable in all four inputs. The Triton backward saves
        x, coeffs and the bases (not the per-sample weights) and recombines the weights.

    Example:
        >>> x = torch.randn(3, 5, 8)
        >>> basis, bias_basis = torch.randn(4, 6, 8), torch.randn(4, 6)
        >>> coeffs = torch.rand(3, 4)
        >>> y = time_linear(x, coeffs, basis, bias_basis)
        >>> w1 = torch.einsum("k,koi->oi", coeffs[1], basis)
        >>> torch.allclose(y[1], x[1] @ w1.T + coeffs[1] @ bias_basis, atol=1e-5)
        True
    """
    _check_inputs(x, coeffs, basis, bias_basis)
    if backend is None:
        backend = _default_backend.get()
    _check_backend(backend)
    if backend == "auto":
        cuda = x.is_cuda and x.dtype in _TRITON_DTYPES
        backend = "triton" if cuda and _TRITON_INSTALLED else "reference"
    if backend == "reference":
        return _reference(x, coeffs, basis, bias_basis)
    if not _TRITON_INSTALLED:
        raise RuntimeError(
            "time_linear: the Triton backend needs the triton package, which is not installed "
            '(it ships wheels for Linux x86_64); use backend="reference" (or "auto")'
        )

    from . import _triton_time_linear

    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"time_linear: the Triton backend supports fp32, fp16 and bf16, got {x.dtype}; "
            'use backend="reference" (or "auto") for it'
        )
    if not x.is_cuda and not _triton_time_linear.INTERPRETED:
        raise RuntimeError(
            f"time_linear: the Triton backend needs CUDA tensors, got {x.device.type} ones; "
            'move them to a GPU, use backend="reference", or set TRITON_INTERPRET=1 before '
            "odeify's kernels are imported to run the kernels on the CPU (slow; for tests)"
        )
    return _triton_time_linear.time_linear_triton(x, coeffs, basis, bias_basis)


def _reference(x: Tensor, coeffs: Tensor, basis: Tensor, bias_basis: Tensor | None) -> Tensor:
    if coeffs.dim() == 1:
        # One weight for the whole batch: materialise it once.
        weight = torch.einsum("k,koi->oi", coeffs, basis)
        bias = None if bias_basis is None else coeffs @ bias_basis
        return torch.nn.functional.linear(x, weight, bias)
    weights = torch.einsum("bk,koi->boi", coeffs, basis)
    y = torch.bmm(x, weights.transpose(1, 2))
    if bias_basis is not None:
        y = y + (coeffs @ bias_basis).unsqueeze(1)
    return y


def _check_backend(backend: object) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"time_linear: backend must be one of {_BACKENDS}, got {backend!r}")


def _check_inputs(x: Tensor, coeffs: Tensor, basis: Tensor, bias_basis: Tensor | None) -> None:
    """Every precondition of both backends, checked once, with what to do about a failure."""
    named = {"x": x, "coeffs": coeffs, "basis": basis, "bias_basis": bias_basis}
    for name, t in named.items():
        if not isinstance(t, Tensor) and not (name == "bias_basis" and t is None):
            raise TypeError(f"time_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(
            f"time_linear: x must be [B, T, d_in], got shape {tuple(x.shape)}; "
            "add a batch or sequence axis with unsqueeze, or flatten extra ones into T"
        )
    if basis.dim() != 3:
        raise ValueError(
            f"time_linear: basis must be [K, d_out, d_in], got shape {tuple(basis.shape)}"
        )
    k, d_out, d_in = basis.shape
    if k == 0:
        raise ValueError("time_linear: K = 0: basis [K, d_out, d_in] holds no matrices")
    if coeffs.dim() not in (1, 2):
        raise ValueError(
            f"time_linear: coeffs must be [B, K] (per sample) or [K] (shared), "
            f"got shape {tuple(coeffs.shape)}"
        )
    if coeffs.shape[-1] != k:
        raise ValueError(
            f"time_linear: coeffs has {coeffs.shape[-1]} coefficients per sample but basis has "
            f"K = {k} matrices; they must match"
        )
    if coeffs.dim() == 2 and coeffs.shape[0] != x.shape[0]:
        raise ValueError(
            f"time_linear: coeffs has {coeffs.shape[0]} rows but x has B = {x.shape[0]} samples; "
            "pass one row per sample, or a [K] tensor to share it"
        )
    if x.shape[2] != d_in:
        raise ValueError(
            f"time_linear: x has d_in = {x.shape[2]} but basis [K, d_out, d_in] has "
            f"d_in = {d_in}; basis matrices are in nn.Linear layout [out, in] "
            "(transpose a [K, in, out] basis)"
        )
    if bias_basis is not None and tuple(bias_basis.shape) != (k, d_out):
        raise ValueError(
            f"time_linear: bias_basis must be [K, d_out] = {(k, d_out)}, "
            f"got shape {tuple(bias_basis.shape)}"
        )
    given = {name: t for name, t in named.items() if t is not None}
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"time_linear: x has dtype {x.dtype}; supported are fp32, fp16, bf16 and "
            "(reference backend only) fp64"
        )
    if any(t.dtype != x.dtype for t in given.values()):
        dtypes = ", ".join(f"{name} {t.dtype}" for name, t in given.items())
        raise TypeError(
            f"time_linear: all inputs must share one dtype, got {dtypes}; cast them with .to()"
        )
    if any(t.device != x.device for t in given.values()):
        devices = ", ".join(f"{name} {t.device}" for name, t in given.items())
        raise ValueError(
            f"time_linear: all inputs must be on one device, got {devices}; move them with .to()"
        )
    for name, t in given.items():
        if not t.is_contiguous():
            raise ValueError(
                f"time_linear: {name} is not contiguous (shape {tuple(t.shape)}, strides "
                f"{t.stride()}); call .contiguous() on it: the kernels read rows as unit-stride "
                "tiles and a silent copy would hide its cost"
            )


__all__ = ["Backend", "time_linear", "time_linear_backend"]
