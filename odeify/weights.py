"""Block parameters at one time, with the few functional ops adapters run on them.

Two implementations of one interface (``linear``, ``layer_norm``, ``rms_norm``, ``in``):
:class:`Weights` holds W(t) shared by the whole batch; :class:`PerSampleWeights` gives every
sample its own time. Adapter code is written once against that interface.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor


class Weights:
    """The parameters W(t) of one block at one time, shared by the whole batch.

    Adapters call ``w.linear("attn.c_attn", x)`` rather than reading tensors, so the same adapter
    code can later run on per-sample weights.

    Example:
        >>> w = Weights({"fc.weight": torch.eye(2), "fc.bias": torch.ones(2)})
        >>> w.linear("fc", torch.zeros(1, 2))
        tensor([[1., 1.]])
    """

    __slots__ = ("tensors", "transposed", "lora")

    def __init__(
        self,
        tensors: dict[str, Tensor],
        transposed: frozenset[str] = frozenset(),
        lora: dict[str, list[tuple[Tensor, Tensor]]] | None = None,
    ):
        self.tensors = tensors
        # Weights stored as [in, out] (GPT-2's Conv1D layout): addmm on that layout is what the
        # original model runs, and on CPU its matrix-vector product is faster at decode time.
        self.transposed = transposed
        # Low-rank updates (A [R, in], B [out, R]) of a weight: W + B A, applied as B (A x).
        self.lora = lora or {}

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def linear(self, prefix: str, x: Tensor) -> Tensor:
        name = prefix + ".weight"
        weight, bias = self.tensors[name], self.tensors.get(prefix + ".bias")
        if name not in self.transposed:
            out = F.linear(x, weight, bias)
        else:
            flat = x.reshape(-1, x.shape[-1])
            out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
            out = out.view(*x.shape[:-1], weight.shape[-1])
        for a, b in self.lora.get(name, ()):
            out = out + F.linear(F.linear(x, a), b)
        return out

    def layer_norm(self, prefix: str, x: Tensor, eps: float) -> Tensor:
        weight, bias = self.tensors[prefix + ".weight"], self.tensors.get(prefix + ".bias")
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    def rms_norm(self, prefix: str, x: Tensor, eps: float) -> Tensor:
        # The same operations, in the same order, as LlamaRMSNorm: bit-exact at N = L.
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return self.tensors[prefix + ".weight"] * h.to(dtype)


def vectors_in_own_dtype(basis: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off while a vector parameter (a norm's scale or shift, a bias: basis [K, d]) is
    combined: under CPU autocast it would come out in bf16, and CPU layer_norm refuses a bf16
    weight with an fp32 input; a norm gains nothing from bf16. Matrices keep autocast."""
    if basis.dim() == 2 and torch.is_autocast_enabled(basis.device.type):
        return torch.autocast(basis.device.type, enabled=False)
    return contextlib.nullcontext()


class PerSampleWeights:
    """W_b(t_b) for every sample b of a batch, each at its own time, never materialised as a
    whole: linear layers run through :func:`odeify.time_linear.time_linear`, which combines the
    basis in the kernel; norm vectors are small and are combined here.

    ``coeffs`` maps each weight group to c(t_b) of shape [B, K]; ``basis`` looks up a basis
    tensor [K, *shape] by parameter name; ``group`` maps parameter names to weight groups.
    """

    __slots__ = ("coeffs", "basis", "group")

    def __init__(self, coeffs: dict[str, Tensor], basis, group: dict[str, str]):
        self.coeffs, self.basis, self.group = coeffs, basis, group

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def _coeffs(self, name: str, like: Tensor) -> Tensor:
        return self.coeffs[self.group[name]].to(like.dtype)

    def _vector(self, name: str, x: Tensor) -> Tensor:
        """The per-sample parameter, shaped to broadcast against x: [B, 1, ..., d]."""
        basis = self.basis(name)
        with vectors_in_own_dtype(basis):
            value = self._coeffs(name, basis) @ basis
        return value.view(value.shape[0], *[1] * (x.dim() - 2), value.shape[-1])

    def linear(self, prefix: str, x: Tensor) -> Tensor:
        from .time_linear import time_linear

        weight = self.basis(prefix + ".weight")
        bias = self.basis(prefix + ".bias") if prefix + ".bias" in self.group else None
        coeffs = self._coeffs(prefix + ".weight", weight)
        if torch.is_autocast_enabled(x.device.type):
            # time_linear is not on autocast's lists: cast as autocast casts F.linear's inputs.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, coeffs, weight = x.to(dtype), coeffs.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return time_linear(x.contiguous(), coeffs, weight, bias)

    def layer_norm(self, prefix: str, x: Tensor, eps: float) -> Tensor:
        h = F.layer_norm(x, x.shape[-1:], None, None, eps) * self._vector(prefix + ".weight", x)
        return h + self._vector(prefix + ".bias", x) if prefix + ".bias" in self.group else h

    def rms_norm(self, prefix: str, x: Tensor, eps: float) -> Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return self._vector(prefix + ".weight", x) * h.to(dtype)
