"""Per-head spectra of the attention weights over depth time t: QK and OV eigenvalues.

Conventions. Hidden states are row vectors x in R^d, as in the paper. Head h's projections are
the d x hd matrices W_Q^h, W_K^h, W_V^h (q^h = x W_Q^h) and the hd x d matrix W_O^h (the head's
slice of the output projection), so

    QK^h = W_Q^h (W_K^h)^T  (d x d: the bilinear form of the attention logits, x_i QK^h x_j^T)
    OV^h = W_V^h W_O^h      (d x d: what the head writes to the residual stream, x -> x OV^h)

In odeify's nn.Linear layout a weight is stored [out, in], so head h's stored rows are
Q_h = (W_Q^h)^T (hd x d) and O_h = (W_O^h)^T (d x hd); the column-vector maps are the transposes
of the products above and have the same eigenvalues. Both products have rank <= hd; their nonzero
eigenvalues are those of the small hd x hd products (eig(AB) = eig(BA) away from zero):

    eig(QK^h) = eig(K_h Q_h^T)  and  eig(OV^h) = eig(V_h O_h),  plus d - hd zeros, dropped.

The weights are the raw projections: norm gains, biases, RoPE rotations and GPT-2's
1 / sqrt(hd) logit scale are not folded in (as in the paper). With GQA, query head h reads
key/value head h // (H / KV).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor, nn
from tqdm.auto import tqdm

from .heads import HeadShape, describe, head_weights, resolve_times

KINDS = ("qk", "ov")


def head_products(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, shape: HeadShape
) -> dict[str, Tensor]:
    """The hd x hd products whose eigenvalues are the nonzero ones of QK^h and OV^h.

    Takes weights in ``[out, in]`` layout with a leading time axis (q: [n, H * hd, d], k and v:
    [n, KV * hd, d], o: [n, d, H * hd]) and returns {"qk": K_h Q_h^T, "ov": V_h O_h}, each
    [n, H, hd, hd].

    Example:
        >>> s = HeadShape(num_heads=2, num_kv_heads=1, head_dim=3)
        >>> q, o = torch.randn(1, 6, 8), torch.randn(1, 8, 6)
        >>> k, v = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
        >>> head_products(q, k, v, o, s)["qk"].shape
        torch.Size([1, 2, 3, 3])
    """
    hd, group = shape.head_dim, shape.num_heads // shape.num_kv_heads
    rows = "n (h e) d -> n h e d"  # head h's hd rows of a stored [out, in] projection
    q_h = rearrange(q, rows, e=hd)
    # Query head h uses kv head h // group, as transformers' repeat_kv does.
    k_h, v_h = (repeat(w, "n (h e) d -> n (h g) e d", e=hd, g=group) for w in (k, v))
    o_h = rearrange(o, "n d (h e) -> n h d e", e=hd)  # head h's hd columns of the output
    return {"qk": k_h @ q_h.mT, "ov": v_h @ o_h}


@dataclass
class Spectra:
    """Eigenvalues of QK^h and OV^h per time and head (complex, sorted by decreasing modulus).

    ``qk`` and ``ov`` are complex128 tensors [n_times, H, hd]; see the module docstring for the
    conventions. ``summary(kind)`` gives the curves over t.
    """

    times: Tensor
    qk: Tensor
    ov: Tensor
    shape: HeadShape
    source: str

    def eigenvalues(self, kind: str) -> Tensor:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return getattr(self, kind)

    def radius(self, kind: str) -> Tensor:
        """Spectral radius per time and head, [n_times, H]."""
        return self.eigenvalues(kind).abs().amax(-1)

    def summary(self, kind: str) -> dict[str, Tensor]:
        """Curves over t, pooled over heads: the spectral radius (max |lambda|), the mean
        |lambda| and the fraction of eigenvalues with positive real part, each [n_times].

        Example:
            >>> s = spectra(model, times=16, progress=False)
            >>> {name: curve.shape for name, curve in s.summary("qk").items()}
            {'radius': torch.Size([16]), 'mean_abs': torch.Size([16]),
             'positive_real_fraction': torch.Size([16])}
        """
        lam = self.eigenvalues(kind).flatten(1)
        return {
            "radius": lam.abs().amax(-1),
            "mean_abs": lam.abs().mean(-1),
            "positive_real_fraction": (lam.real > 0).double().mean(-1),
        }

    def to_dict(self) -> dict:
        """The times, per-head spectral radii and summary curves as plain lists (for JSON)."""
        out = {
            "times": self.times.tolist(),
            "source": self.source,
            "num_heads": self.shape.num_heads,
            "num_kv_heads": self.shape.num_kv_heads,
            "head_dim": self.shape.head_dim,
        }
        for kind in KINDS:
            curves = {name: c.tolist() for name, c in self.summary(kind).items()}
            out[kind] = {"radius_per_head": self.radius(kind).tolist(), **curves}
        return out


def spectra(
    model: nn.Module,
    times: int | Sequence[float] | None = None,
    *,
    chunk: int = 16,
    progress: bool = True,
) -> Spectra:
    """Per head, the eigenvalues of QK^h = W_Q^h (W_K^h)^T and OV^h = W_V^h W_O^h over t.

    Works on an odeified model (any basis: W(t) from its basis tensors) and on an original
    discrete transformers model (layer l at t = l / L). The eigenvalues are the hd nonzero ones,
    complex, from one batched ``torch.linalg.eigvals`` per chunk of times (float64).

    Args:
        model: an odeified or original GPT-2 / Llama-family model.
        times: an int n (the uniform grid i / n on [0, 1)) or a list of times in [0, 1].
            None: 64 times for an odeified model, every layer for a discrete one; a discrete
            model only accepts its layer times.
        chunk: times per batch (bounds memory: one chunk holds 4 weight matrices per time).

    Example:
        >>> s = spectra(model, times=8)   # an odeified GPT-2 with 2 heads of 16 dimensions
        >>> s.qk.shape                    # [times, heads, head_dim]
        torch.Size([8, 2, 16])
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    grid = resolve_times(model, times)
    eigenvalues: dict[str, list[Tensor]] = {kind: [] for kind in KINDS}
    shape = HeadShape.of(model.config)
    starts = range(0, len(grid), chunk)
    with torch.no_grad():
        for start in tqdm(starts, desc="spectra", unit="chunk", disable=not progress, leave=False):
            w = head_weights(model, grid[start : start + chunk])
            q, k, v, o = (m.double() for m in (w.q, w.k, w.v, w.o))
            for kind, product in head_products(q, k, v, o, shape).items():
                lam = torch.linalg.eigvals(product)
                order = lam.abs().argsort(dim=-1, descending=True)
                eigenvalues[kind].append(lam.gather(-1, order).cpu())
    return Spectra(
        times=torch.tensor(grid, dtype=torch.float64),
        qk=torch.cat(eigenvalues["qk"]),
        ov=torch.cat(eigenvalues["ov"]),
        shape=shape,
        source=describe(model),
    )
