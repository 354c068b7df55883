"""Block parameters at one time t, with the few functional ops adapters run on them."""

from __future__ import annotations

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

    __slots__ = ("tensors", "transposed")

    def __init__(self, tensors: dict[str, Tensor], transposed: frozenset[str] = frozenset()):
        self.tensors = tensors
        # Weights stored as [in, out] (GPT-2's Conv1D layout): addmm on that layout is what the
        # original model runs, and on CPU its matrix-vector product is faster at decode time.
        self.transposed = transposed

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def linear(self, prefix: str, x: Tensor) -> Tensor:
        weight, bias = self.tensors[prefix + ".weight"], self.tensors.get(prefix + ".bias")
        if prefix + ".weight" not in self.transposed:
            return F.linear(x, weight, bias)
        flat = x.reshape(-1, x.shape[-1])
        out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
        return out.view(*x.shape[:-1], weight.shape[-1])

    def layer_norm(self, prefix: str, x: Tensor, eps: float) -> Tensor:
        weight, bias = self.tensors[prefix + ".weight"], self.tensors.get(prefix + ".bias")
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    def rms_norm(self, prefix: str, x: Tensor, eps: float) -> Tensor:
        # The same operations, in the same order, as LlamaRMSNorm: bit-exact at N = L.
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return self.tensors[prefix + ".weight"] * h.to(dtype)
