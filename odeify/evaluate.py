"""Perplexity of a model on token windows, swept over step counts, and the plot of it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .api import get_block
from .api import steps as at_steps


@torch.no_grad()
def perplexity(
    model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "ppl"
) -> float:
    """exp(mean next-token NLL) over every window of a [n, T] token tensor.

    Example:
        >>> perplexity(model, windows(tokens, 512))   # doctest: +SKIP
        24.64
    """
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in tqdm(
        range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False
    ):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return math.exp(nll / count)


def sweep(
    model, windows: torch.Tensor, step_counts: Sequence[int], scheme: str | None = None, **kwargs
) -> dict[int, float]:
    """Perplexity of an odeified model at each step count: {steps: perplexity}.

    Example:
        >>> sweep(model, windows(tokens, 512), [15, 30, 60])   # doctest: +SKIP
        {15: 3.5e6, 30: 24.64, 60: 4185.0}
    """
    get_block(model)
    results = {}
    for n in tqdm(step_counts, desc="step counts", disable=not kwargs.get("progress", True)):
        with at_steps(model, n, scheme):
            results[n] = perplexity(model, windows, desc=f"ppl @ {n} steps", **kwargs)
    return results


def plot_sweep(
    curves: dict[str, dict[int, float]],
    path: str | Path,
    title: str,
    reference: dict[str, float] | None = None,
    xlabel: str = "solver steps N",
    styles: dict[str, dict] | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Perplexity against steps on a log axis, one line per curve, dashed lines for references.

    ``styles`` maps a curve's label to matplotlib keywords (color, linestyle, marker), so many
    curves can share a color per run and a line style per variant instead of cycling colors.
    ``ylim`` cuts the axis to a range of interest (points outside are off the plot).

    Example:
        >>> plot_sweep({"hat basis": {15: 3.5e6, 30: 24.6}}, "ppl.png", "SmolLM2", {"original": 24.6})   # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = len(curves) + len(reference or {})
    crowded = entries > 4 or max(map(len, [*curves, *(reference or {})]), default=0) > 40
    # A long legend goes under the axes, where it cannot hide the curves.
    height = 4.2 + (0.22 * entries if crowded else 0.0)
    fig, ax = plt.subplots(figsize=(6.4, height), dpi=120)
    for label, curve in curves.items():
        xs = sorted(curve)
        style = {"marker": "o", **(styles or {}).get(label, {})}
        ax.plot(xs, [curve[x] for x in xs], label=label, **style)
    for i, (label, value) in enumerate((reference or {}).items()):
        color = "k" if styles else f"C{i + len(curves)}"
        linestyle = ("--", ":", "-.")[i % 3]
        ax.axhline(value, linestyle=linestyle, color=color, label=f"{label} ({value:.2f})")
    ax.set_yscale("log")
    if ylim:
        # A cut axis spans less than a decade: plain numbers read better than powers of ten.
        ax.set_ylim(*ylim)
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if crowded:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize="small", frameon=False)
    else:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # a legend under the axes may be wider than them
    plt.close(fig)
    return path
