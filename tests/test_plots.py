"""Perplexity plots (odeify.train.plots): what each line, reference, axis and legend of a sweep
plot holds, read back from the matplotlib figure; and the curves, styles and references that
the depth-adaptation plots pass to it, from runs' results and logged curves."""

import io
import re
import struct
import sys
import warnings
from pathlib import Path

import pytest
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import FuncFormatter

from odeify.train import plots
from odeify.train.metrics import Metrics


@pytest.fixture
def figures(monkeypatch):
    """Every figure plot_sweep makes, with the keywords it was made with."""
    made, make = [], plots.figure

    def recorded(**kwargs):
        fig = make(**kwargs)
        made.append((fig, kwargs))
        return fig

    monkeypatch.setattr(plots, "figure", recorded)
    return made


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _tight_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def test_sweep_plot_lines_references_and_axes(tmp_path, figures):
    curves = {"hat": {4: 10.0, 2: 20.0}, "fourier": {8: 6.0, 2: 30.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib has nothing to say about the calls
        path = plots.plot_sweep(curves, tmp_path / "a" / "b" / "ppl.png", "a title", {"orig": 5.0})
    assert path == tmp_path / "a" / "b" / "ppl.png"
    ((fig, kwargs),) = figures
    assert kwargs == {"figsize": (6.4, 4.2), "dpi": 120}
    (ax,) = fig.axes
    hat, fourier, orig = ax.get_lines()
    assert (list(hat.get_xdata()), list(hat.get_ydata())) == ([2, 4], [20.0, 10.0])
    assert (list(fourier.get_xdata()), list(fourier.get_ydata())) == ([2, 8], [30.0, 6.0])
    assert [line.get_label() for line in (hat, fourier, orig)] == ["hat", "fourier", "orig (5.00)"]
    assert hat.get_marker() == fourier.get_marker() == "o"
    assert list(orig.get_ydata()) == [5.0, 5.0]
    assert (orig.get_linestyle(), orig.get_color()) == ("--", "C2")  # after the curves' colors
    assert ax.get_yscale() == "log" and not isinstance(
        ax.yaxis.get_major_formatter(), FuncFormatter
    )
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "solver steps N",
        "perplexity (log scale)",
        "a title",
    )
    for ticks in (
        ax.xaxis.get_major_ticks(),
        ax.yaxis.get_major_ticks(),
        ax.yaxis.get_minor_ticks(),
    ):
        assert ticks[0].gridline.get_visible() and ticks[0].gridline.get_alpha() == 0.3
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["hat", "fourier", "orig (5.00)"]
    assert legend._loc == 0 and legend.get_frame_on()  # "best", framed: inside the axes
    saved = path.read_bytes()
    assert _png_size(saved) == _png_size(_tight_png(fig))  # saved with a tight bounding box
    assert _png_size(saved) != (768, 504)


def test_sweep_plot_styles_ylim_and_a_crowded_legend(tmp_path, figures):
    curves = {f"run {i}": {1: 2.0 + i, 2: 1.5 + i} for i in range(2)}
    styles = {"run 1": {"color": "red", "linestyle": ":", "marker": "x"}}
    reference = {"orig": 2.0, "twice": 4.0, "thrice": 6.0}
    path = plots.plot_sweep(
        curves, tmp_path / "crowded.svg", "t", reference, "GFLOPs", styles, ylim=(1.0, 9.0)
    )
    assert path.read_text().lstrip().startswith("<?xml")  # the format from the suffix
    ((fig, kwargs),) = figures
    assert kwargs["figsize"] == pytest.approx((6.4, 4.2 + 0.22 * 5))  # 5 entries: crowded
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_marker() for line in lines[:2]] == ["o", "x"]
    assert (lines[1].get_color(), lines[1].get_linestyle()) == ("red", ":")
    assert [(line.get_linestyle(), line.get_color()) for line in lines[2:]] == [
        ("--", "k"),
        (":", "k"),
        ("-.", "k"),
    ]
    assert ax.get_xlabel() == "GFLOPs" and ax.get_ylim() == (1.0, 9.0)
    for formatter in (ax.yaxis.get_major_formatter(), ax.yaxis.get_minor_formatter()):
        assert isinstance(formatter, FuncFormatter) and formatter(3.0, 0) == "3"
        assert formatter(2.5, 0) == "2.5"
    legend = ax.get_legend()
    assert legend._loc == 9 and not legend.get_frame_on()  # "upper center", under the axes
    assert tuple(legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted()).bounds[:2]) == (
        pytest.approx((0.5, -0.15))
    )
    small = FontProperties(size="small").get_size_in_points()
    assert legend.get_texts()[0].get_fontsize() == small < FontProperties().get_size_in_points()


def test_a_long_label_alone_crowds_the_legend(tmp_path, figures):
    plots.plot_sweep({"x" * 41: {1: 2.0}}, tmp_path / "long", "t")
    assert _png_size((tmp_path / "long").read_bytes())  # no suffix: PNG
    ((fig, kwargs),) = figures
    assert kwargs["figsize"] == pytest.approx((6.4, 4.2 + 0.22))
    assert fig.axes[0].get_legend()._loc == 9
    figures.clear()
    plots.plot_sweep({"x" * 40: {1: 2.0}}, tmp_path / "short.png", "t")
    assert figures[0][1]["figsize"] == (6.4, 4.2) and figures[0][0].axes[0].get_legend()._loc == 0


@pytest.fixture
def sweeps(monkeypatch):
    """What each call of plot_sweep was given (nothing is drawn)."""
    calls = []

    def plot_sweep(curves, path, title, reference=None, xlabel="solver steps N", **kwargs):
        calls.append(
            dict(
                curves=curves, path=path, title=title, reference=reference, xlabel=xlabel, **kwargs
            )
        )
        return Path(path)

    monkeypatch.setattr(plots, "plot_sweep", plot_sweep)
    return calls


def _run(label, mode, before, after, first=False):
    # The plots take the model, depth, held-out documents and original from the first run.
    return {
        "model": "/models/SmolLM2" if first else "/models/other",
        "layers": 4 if first else 6,
        "heldout": ["hamlet", "macbeth"] if first else ["lear"],
        "label": label,
        "mode": mode,
        "original_perplexity": 20.0 if first else 99.0,
        "cost_model": {"layer_params": 1e9, "head_params": 5e8},
        "before": {str(n): {"perplexity": p} for n, p in before.items()},
        "after": {str(n): {"perplexity": p} for n, p in after.items()},
    }


def test_plot_runs_curves_styles_and_references(tmp_path, sweeps):
    runs = [_run("C", "adapt", {2: 90.0, 4: 20.0}, {2: 30.0, 4: 21.0}, first=True)]
    runs.append(_run("(a)", "drop", {2: 99.0}, {2: 40.0}))
    runs += [_run(f"r{i}", "adapt", {2: 50.0}, {2: 25.0}) for i in range(2, 21)]
    paths = plots.plot_runs(runs, tmp_path)
    assert paths == [
        tmp_path / n for n in ("perplexity.png", "perplexity_flops.png", "perplexity_after.png")
    ]
    steps, flops, after = sweeps
    title = "SmolLM2, held-out hamlet, macbeth"
    reference = {"original (N = 4)": 20.0}
    assert (steps["title"], steps["reference"], steps["xlabel"]) == (
        title,
        reference,
        "solver steps N",
    )
    assert list(steps["curves"])[:4] == ["C: before", "C: after", "(a): after", "r2: before"]
    assert steps["curves"]["C: before"] == {2: 90.0, 4: 20.0}
    assert steps["curves"]["(a): after"] == {2: 40.0}  # a baseline has no before
    styles = steps["styles"]
    assert styles["C: before"] == {"color": "C0", "linestyle": ":", "marker": "x"}
    assert styles["C: after"] == {"color": "C0", "linestyle": "-", "marker": "o"}
    assert styles["(a): after"] == {"color": "C1", "linestyle": "-", "marker": "s"}
    assert styles["r9: after"] == {"color": "C9", "linestyle": "-", "marker": "o"}
    assert styles["r10: after"] == {"color": "C0", "linestyle": "--", "marker": "o"}  # 11th run
    assert styles["r10: before"]["linestyle"] == ":"
    assert styles["r20: after"] == {"color": "C0", "linestyle": "-", "marker": "o"}  # 21st
    # inference GFLOPs per token: 2 (N P_layer + P_head) / 1e9
    assert flops["curves"]["C: after"] == {5.0: 30.0, 9.0: 21.0}
    assert (flops["xlabel"], flops["styles"], flops["title"]) == (
        "inference GFLOPs per token",
        styles,
        title,
    )
    assert flops["reference"] == reference
    assert list(after["curves"]) == ["C", "(a)", *(f"r{i}" for i in range(2, 21))]
    assert after["curves"]["C"] == {2: 30.0, 4: 21.0}
    assert after["styles"]["(a)"] == styles["(a): after"] and len(after["styles"]) == 21
    assert after["title"] == f"{title}: after training"
    assert after["reference"] == {**reference, "1.5x the original": 30.0}
    assert after["ylim"] == (16.0, 80.0)


def test_plot_budget_one_color_per_count_one_style_per_run(tmp_path, sweeps):
    folders = [tmp_path / name for name in ("adapt", "drop", "third")]
    for i, folder in enumerate(folders):
        metrics = Metrics(folder / "metrics.jsonl")
        metrics.log(event="eval", original=1.0, flops=1e15, steps={"9": {"perplexity": 1.0}})
        metrics.log(step=1, loss=3.0)
        for flops, ppl in ((1e15, 40.0 + i), (3e15, 30.0 + i)):
            counts = (
                {"15": {"perplexity": ppl}, "8": {"perplexity": 2 * ppl}}
                if i != 1
                else {"8": {"perplexity": ppl}}
            )
            metrics.log(event="curve", original=24.6 + i, flops=flops, steps=counts)
    out = plots.plot_budget(folders, tmp_path / "cmp", ["C", "(a)", "D"])
    assert out == tmp_path / "cmp" / "perplexity_budget.png"
    ((call,),) = [sweeps]
    assert call["path"] == out and call["title"] == "perplexity during training (curve windows)"
    assert call["xlabel"] == "training PFLOPs" and call["reference"] == {"original": 24.6}
    assert call["curves"] == {
        "C: N = 15": {1.0: 40.0, 3.0: 30.0},
        "C: N = 8": {1.0: 80.0, 3.0: 60.0},
        "(a): N = 8": {1.0: 41.0, 3.0: 31.0},
        "D: N = 15": {1.0: 42.0, 3.0: 32.0},
        "D: N = 8": {1.0: 84.0, 3.0: 64.0},
    }
    assert call["styles"] == {
        "C: N = 15": {"color": "C0", "linestyle": "-", "marker": "o"},
        "C: N = 8": {"color": "C1", "linestyle": "-", "marker": "o"},
        "(a): N = 8": {"color": "C1", "linestyle": "--", "marker": "s"},
        "D: N = 15": {"color": "C0", "linestyle": ":", "marker": "^"},
        "D: N = 8": {"color": "C1", "linestyle": ":", "marker": "^"},
    }
    assert plots.plot_budget([], tmp_path, []) is None
    assert len(sweeps) == 1


def test_plot_budget_without_curves_is_none_and_styles_cycle(tmp_path, sweeps):
    empty = tmp_path / "empty"
    Metrics(empty / "metrics.jsonl").log(step=1, loss=2.0)
    assert plots.plot_budget([empty], tmp_path, ["x"]) is None and sweeps == []
    folders = [tmp_path / f"r{i}" for i in range(7)]
    for folder in folders:
        Metrics(folder / "metrics.jsonl").log(
            event="curve", original=1.0, flops=2e15, steps={"4": {"perplexity": 3.0}}
        )
    plots.plot_budget(folders, tmp_path, [f"r{i}" for i in range(7)])
    styles = sweeps[0]["styles"]
    assert styles["r4: N = 4"]["linestyle"] == "-" and styles["r6: N = 4"]["marker"] == "o"
    assert styles["r5: N = 4"]["marker"] == "v" and styles["r3: N = 4"]["linestyle"] == "-."
    with pytest.raises(ValueError, match=r"^zip\(\) argument 2 is shorter than argument 1$"):
        plots.plot_budget(folders, tmp_path, ["one label"])  # a label per folder


def test_four_entries_fit_inside_and_a_fourth_reference_dashes_again(tmp_path, figures):
    reference = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    plots.plot_sweep({}, tmp_path / "refs.png", "t", reference)
    ((fig, kwargs),) = figures
    (ax,) = fig.axes
    assert kwargs["figsize"] == (6.4, 4.2) and ax.get_legend()._loc == 0  # 4 entries: inside
    styles = [(line.get_linestyle(), line.get_color()) for line in ax.get_lines()]
    assert styles == [("--", "C0"), (":", "C1"), ("-.", "C2"), ("--", "C3")]


def test_an_empty_plot_and_the_missing_matplotlib_message(tmp_path, figures, monkeypatch):
    with pytest.warns(UserWarning, match="^No artists with labels found to put in legend"):
        assert plots.plot_sweep({}, tmp_path / "empty.png", "t").exists()  # drawn, empty
    assert figures[0][1]["figsize"] == (6.4, 4.2) and figures[0][0].axes[0].get_lines() == []
    monkeypatch.setitem(sys.modules, "matplotlib.ticker", None)  # not importable
    message = (
        "plotting perplexity needs the Python package matplotlib, which is not installed: "
        "pip install 'odeify[plots]'"
    )
    with pytest.raises(ImportError, match=f"^{re.escape(message)}$"):
        plots.plot_sweep({}, tmp_path / "none.png", "t")
