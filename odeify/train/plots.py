"""Plots of perplexity: against solver steps (or any x), and the before/after and budget plots of
depth-adaptation runs."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_file
from ..extras import figure, require
from .metrics import Metrics


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
        >>> curves = {"hat basis": {15: 3.5e6, 30: 24.6}}
        >>> plot_sweep(curves, "ppl.png", "SmolLM2", {"original": 24.6})
        PosixPath('ppl.png')
    """
    ticker = require("matplotlib.ticker", "plotting perplexity")
    entries = len(curves) + len(reference or {})
    crowded = entries > 4 or max(map(len, [*curves, *(reference or {})]), default=0) > 40
    # A long legend goes under the axes, where it cannot hide the curves.
    height = 4.2 + (0.22 * entries if crowded else 0.0)
    fig = figure(figsize=(6.4, height), dpi=120)
    ax = fig.subplots()
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
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
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
    with atomic_file(path, "wb") as f:  # a legend under the axes may be wider than them
        fig.savefig(f, format=path.suffix[1:] or "png", bbox_inches="tight")
    return path


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "x", "D", "v")


def _curves(runs: list[dict], x: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """(curves, styles): one color per run, solid (or dashed) after training, dotted before."""
    curves, styles = {}, {}
    for i, r in enumerate(runs):
        cost = r["cost_model"]
        for when in ("before", "after"):
            if r["mode"] == "drop" and when == "before":
                continue
            points = {}
            for n, value in r[when].items():
                key = (
                    int(n)
                    if x == "steps"
                    else 2 * (int(n) * cost["layer_params"] + cost["head_params"]) / 1e9
                )
                points[key] = value["perplexity"]
            name = f"{r['label']}: {when}"
            curves[name] = points
            # Ten colors, then dashed lines; the baselines' points are squares.
            styles[name] = {
                "color": f"C{i % 10}",
                "linestyle": (("-", "--")[i // 10 % 2]) if when == "after" else ":",
                "marker": "x" if when == "before" else "s" if r["mode"] == "drop" else "o",
            }
    return curves, styles


def plot_runs(runs: list[dict], out: Path) -> list[Path]:
    """``perplexity.png`` (against solver steps, before and after) and ``perplexity_flops.png``
    (against inference GFLOPs per token) of finished runs, and ``perplexity_after.png``: after
    training only, on an axis cut to 0.8x-4x the original's perplexity (the range the targets
    are in), with the original and 1.5x it as reference lines.

    Example:
        >>> run = {  # what results.json of a finished run holds, in short
        ...     "model": "SmolLM2", "layers": 30, "heldout": ["hamlet"], "label": "C",
        ...     "mode": "adapt", "original_perplexity": 24.6,
        ...     "cost_model": {"layer_params": 3.5e6, "head_params": 2.8e7},
        ...     "before": {"15": {"perplexity": 3.5e6}, "30": {"perplexity": 24.6}},
        ...     "after": {"15": {"perplexity": 33.0}, "30": {"perplexity": 25.1}},
        ... }
        >>> [p.name for p in plot_runs([run], Path("runs/adapt"))]
        ['perplexity.png', 'perplexity_flops.png', 'perplexity_after.png']
    """
    original = runs[0]["original_perplexity"]
    reference = {f"original (N = {runs[0]['layers']})": original}
    title = f"{Path(str(runs[0]['model'])).name}, held-out {', '.join(runs[0]['heldout'])}"
    by_steps, styles = _curves(runs, "steps")
    by_flops, _ = _curves(runs, "flops")
    after = {k.removesuffix(": after"): v for k, v in by_steps.items() if k.endswith(": after")}
    after_styles = {
        k.removesuffix(": after"): v for k, v in styles.items() if k.endswith(": after")
    }
    return [
        plot_sweep(by_steps, out / "perplexity.png", title, reference, styles=styles),
        plot_sweep(
            by_flops,
            out / "perplexity_flops.png",
            title,
            reference,
            xlabel="inference GFLOPs per token",
            styles=styles,
        ),
        plot_sweep(
            after,
            out / "perplexity_after.png",
            f"{title}: after training",
            {**reference, "1.5x the original": 1.5 * original},
            styles=after_styles,
            ylim=(0.8 * original, 4 * original),
        ),
    ]


def plot_budget(run_dirs: list[Path], out: Path, labels: list[str]) -> Path | None:
    """``perplexity_budget.png``: held-out perplexity against training PFLOPs from the curves
    the runs logged (``eval_every``), one line per (run, step count): one color per step count,
    one line style and marker per run. ``labels`` name the runs, one per folder.

    Example:
        >>> metrics = Metrics("runs/adapt/metrics.jsonl")
        >>> for flops, ppl in ((1e15, 40.0), (2e15, 30.0)):   # what eval_every logs
        ...     metrics.log(event="curve", original=24.6, flops=flops,
        ...                 steps={"15": {"perplexity": ppl}})
        >>> plot_budget([Path("runs/adapt"), Path("runs/drop15")], Path("cmp"), ["C", "(a)"])
        PosixPath('cmp/perplexity_budget.png')
        >>> plot_budget([Path("runs/drop15")], Path("cmp"), ["(a)"]) is None   # no curves logged
        True
    """
    curves: dict[str, dict] = {}
    styles: dict[str, dict] = {}
    colors: dict[int, str] = {}
    reference = None
    for i, (folder, run_label) in enumerate(zip(run_dirs, labels, strict=True)):
        for record in Metrics(folder / "metrics.jsonl").read():
            if record.get("event") != "curve":
                continue
            reference = reference or {"original": record["original"]}
            for n, value in record["steps"].items():
                name = f"{run_label}: N = {n}"
                curves.setdefault(name, {})[record["flops"] / 1e15] = value["perplexity"]
                styles[name] = {
                    "color": colors.setdefault(int(n), f"C{len(colors)}"),
                    "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
                    "marker": _MARKERS[i % len(_MARKERS)],
                }
    if not curves:
        return None
    return plot_sweep(
        curves,
        out / "perplexity_budget.png",
        "perplexity during training (curve windows)",
        reference,
        xlabel="training PFLOPs",
        styles=styles,
    )
