"""Triton kernels behind :func:`odeify.time_linear.time_linear`.

The op is ``y[b] = x[b] @ W_b^T + bias_b`` with ``W_b = sum_k c[b, k] P_k`` and
``bias_b = sum_k c[b, k] p_k``. Inputs reach this module already validated (contiguous, one
dtype among fp32/fp16/bf16, one device, consistent shapes); see ``time_linear.py``.

Forward and grad_x share one kernel, :func:`_combined_matmul_kernel`: for every output tile of
sample b it loads the K basis tiles, sums them with ``c[b, :]`` in fp32 registers, rounds the sum
to the input dtype (the rounding a materialised W would have) and feeds ``tl.dot``. Per-sample
weights never exist in global memory. The basis is read in [K, d_out, d_in] layout for the
forward and through swapped strides for ``grad_x = grad_y @ W_b``.

The weight gradients go through ``G_b = grad_y[b]^T @ x[b]`` ([d_out, d_in], fp32), computed
tile by tile in :func:`_weight_grad_kernel`, which contracts each G tile with the K basis tiles
while it is still in registers (``grad_coeffs[b, k] = <G_b, P_k>``, written as per-tile partial
sums so the reduction is deterministic) and, only when the basis needs a gradient, stores G so
that ``grad_basis = coeffs^T @ G.view(B, -1)`` is one GEMM. G is B x the size of one weight, so
samples are processed in chunks that keep it under ``_G_BUDGET_BYTES``. Shared coefficients
([K]) are handled by the caller as one sample of B*T rows, so G is then a single matrix.

Cost model on an H100 (why the combination is the part to watch, none of it measured yet): the
in-register combination costs K fp32 FMAs per weight element per (sample, row tile) on the CUDA
cores (128 FMA/clk/SM) while the tile's MMA costs BLOCK_M MACs per weight element on the tensor
cores (about 2048 bf16 MAC/clk/SM), so the combination stays hidden only while
K / 128 < BLOCK_M / 2048, i.e. K below about BLOCK_M / 16 (8 at BLOCK_M = 128). At larger K the
kernel is bound by the combination, still without the B x weight traffic of materialising W_b.
At decode (T = 1) it is bound by reading the K basis tensors, which the program order below keeps
to about one DRAM pass by letting the programs of all samples that need the same basis tile run
together.

Block sizes are a heuristic picked for H100 without measurement. On a GPU, autotune over
BLOCK_M in {64, 128, 256}, BLOCK_N in {64, 128, 256}, BLOCK_R in {32, 64, 128}, num_warps in
{4, 8}, num_stages in {2, 3, 4}, keyed on (M, N, R, K, dtype); and try a split over the
reduction dimension for decode shapes whose grid has fewer programs than the GPU has SMs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

# Largest fp32 G buffer (B_chunk x d_out x d_in) the backward allocates before it splits the batch.
_G_BUDGET_BYTES = 1 << 28


@triton.jit
def _combined_matmul_kernel(
    a_ptr,
    c_ptr,
    p_ptr,
    bias_ptr,
    out_ptr,
    n_batch,
    M,
    N,
    R,
    K,
    stride_ab,
    stride_am,
    stride_cb,
    stride_pk,
    stride_pn,
    stride_pr,
    stride_ob,
    stride_om,
    HAS_BIAS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[b, m, n] = sum_r a[b, m, r] * W_b[n, r] (+ bias_b[n]), W_b = sum_k c[b, k] P_k.

    P_k's element (n, r) is at p_ptr + k*stride_pk + n*stride_pn + r*stride_pr. The last
    dimension of a and out, and the k dimension of c, are unit-stride.
    """
    # The sample index varies fastest, so the programs that need the same basis tiles run at the
    # same time and the K basis reads of one sample serve the others from L2.
    pid = tl.program_id(0)
    b = (pid % n_batch).to(tl.int64)
    tile = pid // n_batch
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = tile % num_m
    pid_n = tile // num_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    c_row = c_ptr + b * stride_cb

    a_ptrs = a_ptr + b * stride_ab + offs_m[:, None].to(tl.int64) * stride_am + offs_r[None, :]
    p_ptrs = p_ptr + offs_r[:, None].to(tl.int64) * stride_pr + offs_n[None, :] * stride_pn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        mask_r = offs_r < R - r0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        mask_p = mask_r[:, None] & mask_n[None, :]
        w = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        p_k = p_ptrs
        for k in range(K):
            c = tl.load(c_row + k).to(tl.float32)
            w += c * tl.load(p_k, mask=mask_p, other=0.0).to(tl.float32)
            p_k += stride_pk
        # Round W to the input dtype, as a materialised W would be, so the tensor cores run at
        # the input dtype's rate.
        w = w.to(a.dtype)
        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_R
        p_ptrs += BLOCK_R * stride_pr

    if HAS_BIAS:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k in range(K):
            c = tl.load(c_row + k).to(tl.float32)
            bias += c * tl.load(bias_ptr + k * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]

    out_ptrs = out_ptr + b * stride_ob + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _weight_grad_kernel(
    gy_ptr,
    x_ptr,
    c_ptr,
    p_ptr,
    g_ptr,
    gc_ptr,
    n_batch,
    T,
    D_OUT,
    D_IN,
    K,
    stride_gyb,
    stride_gyt,
    stride_xb,
    stride_xt,
    stride_cb,
    stride_pk,
    stride_po,
    stride_gb,
    stride_go,
    stride_gcb,
    STORE_G: tl.constexpr,
    COEFF_GRAD: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """G_b tile = grad_y[b]^T @ x[b]; optionally stores it and/or writes <G_b tile, P_k tile>.

    gc_ptr holds per-tile partial sums [B, n_tiles, K] (contiguous in the tile and k dims).
    """
    pid = tl.program_id(0)
    b = (pid % n_batch).to(tl.int64)
    tile = pid // n_batch
    num_i = tl.cdiv(D_IN, BLOCK_I)
    pid_o = tile // num_i
    pid_i = tile % num_i

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    mask_o = offs_o < D_OUT
    mask_i = offs_i < D_IN

    gy_ptrs = gy_ptr + b * stride_gyb + offs_t[:, None].to(tl.int64) * stride_gyt + offs_o[None, :]
    x_ptrs = x_ptr + b * stride_xb + offs_t[:, None].to(tl.int64) * stride_xt + offs_i[None, :]
    g = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        mask_t = offs_t < T - t0
        gy = tl.load(gy_ptrs, mask=mask_t[:, None] & mask_o[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_t[:, None] & mask_i[None, :], other=0.0)
        if UPCAST_DOT:
            g = tl.dot(
                tl.trans(gy.to(tl.float32)), x.to(tl.float32), g, input_precision=INPUT_PRECISION
            )
        else:
            g = tl.dot(tl.trans(gy), x, g, input_precision=INPUT_PRECISION)
        gy_ptrs += BLOCK_T * stride_gyt
        x_ptrs += BLOCK_T * stride_xt

    mask_oi = mask_o[:, None] & mask_i[None, :]
    if STORE_G:
        g_ptrs = g_ptr + b * stride_gb + offs_o[:, None].to(tl.int64) * stride_go + offs_i[None, :]
        tl.store(g_ptrs, g, mask=mask_oi)
    if COEFF_GRAD:
        p_k = p_ptr + offs_o[:, None].to(tl.int64) * stride_po + offs_i[None, :]
        gc_row = gc_ptr + b * stride_gcb + tile * K
        for k in range(K):
            p = tl.load(p_k, mask=mask_oi, other=0.0).to(tl.float32)
            tl.store(gc_row + k, tl.sum(g * p))
            p_k += stride_pk


# Both kernels are decorated the same way, so either tells whether Triton runs them on the CPU.
INTERPRETED = isinstance(_combined_matmul_kernel, InterpretedFunction)


@dataclass(frozen=True)
class _Blocks:
    m: int
    n: int
    r: int
    num_warps: int
    num_stages: int


def _matmul_blocks(m: int, n: int, dtype: torch.dtype) -> _Blocks:
    """Tile sizes for _combined_matmul_kernel with m rows per sample and n output columns."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    # Few rows (decode) means a bandwidth-bound kernel: narrower column tiles give more programs.
    block_n = 128 if block_m >= 64 else 64
    # The fp32 combination tile [BLOCK_R, BLOCK_N] lives in registers next to the accumulator.
    block_r = 32 if dtype == torch.float32 else 64
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return _Blocks(block_m, block_n, block_r, num_warps, 3)


def _weight_grad_blocks(dtype: torch.dtype) -> _Blocks:
    """Tile sizes for _weight_grad_kernel: m, n tile (d_out, d_in); r tiles the token axis."""
    return _Blocks(64, 64, 32 if dtype == torch.float32 else 64, 4, 3)


def _dot_options(dtype: torch.dtype) -> dict:
    if INTERPRETED:
        # The interpreter's tl.dot on bf16 returns garbage: multiply 16-bit tiles in fp32 there.
        return {"UPCAST_DOT": dtype != torch.float32, "INPUT_PRECISION": "ieee"}
    if dtype != torch.float32:
        # Triton's default: the native 16-bit tensor-core MMA.
        return {"UPCAST_DOT": False, "INPUT_PRECISION": None}
    # fp32 follows torch's own matmul setting: TF32 tensor cores unless it is "highest".
    tf32 = torch.get_float32_matmul_precision() != "highest"
    return {"UPCAST_DOT": False, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def _combined_matmul(
    a: Tensor, coeffs: Tensor, basis: Tensor, bias_basis: Tensor | None, *, transpose: bool
) -> Tensor:
    """a [B, M, R] times W_b^T (or W_b when transpose) plus bias_b, W_b combined in-kernel.

    transpose=False: the forward, R = d_in, out [B, M, d_out].
    transpose=True: grad_x = grad_y @ W_b, R = d_out, out [B, M, d_in].
    """
    n_batch, m, r = a.shape
    k, d_out, d_in = basis.shape
    n = d_in if transpose else d_out
    # Element (n, r) of the per-sample matrix this call multiplies by, inside P_k.
    stride_pn, stride_pr = (1, d_in) if transpose else (d_in, 1)
    out = torch.empty(n_batch, m, n, dtype=a.dtype, device=a.device)
    blocks = _matmul_blocks(m, n, a.dtype)
    grid = n_batch * triton.cdiv(m, blocks.m) * triton.cdiv(n, blocks.n)
    if grid == 0:
        return out
    _combined_matmul_kernel[(grid,)](
        a,
        coeffs,
        basis,
        a if bias_basis is None else bias_basis,
        out,
        n_batch,
        m,
        n,
        r,
        k,
        a.stride(0),
        a.stride(1),
        coeffs.stride(0),
        basis.stride(0),
        stride_pn,
        stride_pr,
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias_basis is not None,
        BLOCK_M=blocks.m,
        BLOCK_N=blocks.n,
        BLOCK_R=blocks.r,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        **_dot_options(a.dtype),
    )
    return out


def _weight_grads(
    grad_y: Tensor, x: Tensor, coeffs: Tensor, basis: Tensor, need_coeffs: bool, need_basis: bool
) -> tuple[Tensor | None, Tensor | None]:
    """fp32 (grad_coeffs [B, K] without the bias term, grad_basis [K, d_out, d_in])."""
    n_batch, t, d_out = grad_y.shape
    d_in = x.shape[2]
    k = basis.shape[0]
    blocks = _weight_grad_blocks(x.dtype)
    n_tiles = triton.cdiv(d_out, blocks.m) * triton.cdiv(d_in, blocks.n)
    chunk = n_batch
    if need_basis:
        chunk = max(1, min(n_batch, _G_BUDGET_BYTES // max(1, 4 * d_out * d_in)))
    device = x.device
    gc_part = None
    if need_coeffs:
        gc_part = torch.empty(n_batch, n_tiles, k, dtype=torch.float32, device=device)
    g = torch.empty(chunk, d_out, d_in, dtype=torch.float32, device=device) if need_basis else None
    # A constexpr-disabled output still needs a pointer argument: pass the other buffer.
    dummy = g if gc_part is None else gc_part
    grad_basis = torch.zeros(k, d_out * d_in, dtype=torch.float32, device=device)
    for lo in range(0, n_batch, chunk):
        hi = min(n_batch, lo + chunk)
        grid = (hi - lo) * n_tiles
        if grid == 0:
            continue
        _weight_grad_kernel[(grid,)](
            grad_y[lo:hi],
            x[lo:hi],
            coeffs[lo:hi],
            basis,
            dummy if g is None else g,
            dummy if gc_part is None else gc_part[lo:hi],
            hi - lo,
            t,
            d_out,
            d_in,
            k,
            grad_y.stride(0),
            grad_y.stride(1),
            x.stride(0),
            x.stride(1),
            coeffs.stride(0),
            basis.stride(0),
            basis.stride(1),
            0 if g is None else g.stride(0),
            0 if g is None else g.stride(1),
            0 if gc_part is None else gc_part.stride(0),
            STORE_G=need_basis,
            COEFF_GRAD=need_coeffs,
            BLOCK_O=blocks.m,
            BLOCK_I=blocks.n,
            BLOCK_T=blocks.r,
            num_warps=blocks.num_warps,
            num_stages=blocks.num_stages,
            **_dot_options(x.dtype),
        )
        if g is not None:
            grad_basis.addmm_(coeffs[lo:hi].float().T, g[: hi - lo].view(hi - lo, -1))
    grad_coeffs = gc_part.sum(1) if need_coeffs else None
    return grad_coeffs, grad_basis.view(k, d_out, d_in) if need_basis else None


class _TimeLinear(torch.autograd.Function):
    """Per-sample coefficients [B, K]; saves the inputs, never W_b, and recombines in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, coeffs: Tensor, basis: Tensor, bias_basis: Tensor | None):
        ctx.save_for_backward(x, coeffs, basis, bias_basis)
        return _combined_matmul(x, coeffs, basis, bias_basis, transpose=False)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, coeffs, basis, bias_basis = ctx.saved_tensors
        need_x, need_coeffs, need_basis, need_bias = ctx.needs_input_grad
        # Autograd hands over expanded or strided gradients (y.sum() gives a stride-0 one).
        grad_y = grad_y.contiguous()
        grad_x = grad_coeffs = grad_basis = grad_bias = None
        if need_x:
            grad_x = _combined_matmul(grad_y, coeffs, basis, None, transpose=True)
        if need_coeffs or need_basis:
            grad_coeffs, grad_basis = _weight_grads(
                grad_y, x, coeffs, basis, need_coeffs, need_basis
            )
        if bias_basis is not None and (need_coeffs or need_bias):
            grad_y_sum = grad_y.sum(1, dtype=torch.float32)
            if need_coeffs:
                grad_coeffs += grad_y_sum @ bias_basis.float().T
            if need_bias:
                grad_bias = (coeffs.float().T @ grad_y_sum).to(bias_basis.dtype)
        if grad_coeffs is not None:
            grad_coeffs = grad_coeffs.to(coeffs.dtype)
        if grad_basis is not None:
            grad_basis = grad_basis.to(basis.dtype)
        return grad_x, grad_coeffs, grad_basis, grad_bias


def time_linear_triton(
    x: Tensor, coeffs: Tensor, basis: Tensor, bias_basis: Tensor | None
) -> Tensor:
    """The Triton path of time_linear, for validated inputs (see time_linear.py)."""
    if coeffs.dim() == 1:
        # One weight for every sample: all B*T rows are one sample, so row tiles span samples
        # and the backward's G is a single [d_out, d_in] matrix.
        n_batch, t, d_in = x.shape
        y = _TimeLinear.apply(x.view(1, n_batch * t, d_in), coeffs.view(1, -1), basis, bias_basis)
        return y.view(n_batch, t, -1)
    return _TimeLinear.apply(x, coeffs, basis, bias_basis)


__all__ = ["INTERPRETED", "time_linear_triton"]
