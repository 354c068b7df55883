"""Pictures and pages of an analysis: spectra against t, the token heat map of the largest
Lyapunov exponent (PNG and HTML), and a JSON of the numbers."""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from ..atomic import atomic_file, write_text
from ..extras import figure, require
from .lyapunov import Lyapunov
from .spectra import KINDS, Spectra

_LABELS = {"qk": "QK = W_Q W_K^T", "ov": "OV = W_V W_O"}


def plot_spectra(
    spectra: Spectra, path: str | Path, title: str = "", layers: Spectra | None = None
) -> Path:
    """Per kind (QK, OV) one row: a heat map of each head's spectral radius against t, the
    spectral radius and mean |lambda| against t, the fraction of eigenvalues with positive real
    part, and the eigenvalues in the complex plane coloured by t. ``layers`` (spectra of the
    original discrete model) are drawn as markers on the curves.

    Example:
        >>> from odeify.analysis.spectra import spectra
        >>> plot_spectra(spectra(model, times=8, progress=False), "spectra.png", "GPT-2 converted")
        PosixPath('spectra.png')
    """
    LogNorm = require("matplotlib.colors", "plotting spectra").LogNorm  # noqa: N806 - a class

    t = spectra.times.numpy()
    fig = figure(figsize=(21, 4.4 * len(KINDS)))
    axes = fig.subplots(len(KINDS), 4, squeeze=False)
    for row, kind in zip(axes, KINDS, strict=True):
        radius = spectra.radius(kind).numpy()  # [n, H]
        step = t[1] - t[0] if len(t) > 1 else 1.0
        # Radii span orders of magnitude across depth (one outlier layer would black out the
        # rest on a linear scale).
        positive = radius[radius > 0]
        norm = LogNorm(positive.min(), positive.max()) if len(positive) else None
        image = row[0].imshow(
            radius.T,
            aspect="auto",
            origin="lower",
            cmap="magma",
            norm=norm,
            extent=(t[0] - step / 2, t[-1] + step / 2, -0.5, radius.shape[1] - 0.5),
            interpolation="nearest",
        )
        fig.colorbar(image, ax=row[0], label="spectral radius")
        row[0].set(xlabel="t", ylabel="head", title=f"{_LABELS[kind]}: spectral radius per head")

        curves = spectra.summary(kind)
        row[1].plot(t, curves["radius"].numpy(), label="spectral radius (max over heads)")
        row[1].plot(t, curves["mean_abs"].numpy(), label="mean |lambda|")
        row[2].plot(t, curves["positive_real_fraction"].numpy(), color="C2")
        if layers is not None:
            reference = layers.summary(kind)
            lt = layers.times.numpy()
            row[1].plot(lt, reference["radius"].numpy(), "o", color="C0", ms=3, label="layers")
            row[1].plot(lt, reference["mean_abs"].numpy(), "o", color="C1", ms=3)
            row[2].plot(lt, reference["positive_real_fraction"].numpy(), "o", color="C2", ms=3)
        if (curves["mean_abs"] > 0).all():
            row[1].set_yscale("log")
        row[1].set(xlabel="t", ylabel="|lambda|", title=f"{_LABELS[kind]}: magnitude over t")
        row[1].legend(fontsize=8)
        row[1].grid(alpha=0.3)
        row[2].set(xlabel="t", ylabel="fraction", ylim=(-0.02, 1.02))
        row[2].set_title(f"{_LABELS[kind]}: fraction with Re(lambda) > 0")
        row[2].grid(alpha=0.3)

        lam = spectra.eigenvalues(kind)
        times = spectra.times[:, None, None].expand(lam.shape)
        points = row[3].scatter(
            lam.real.flatten().numpy(),
            lam.imag.flatten().numpy(),
            c=times.flatten().numpy(),
            cmap="viridis",
            s=2,
            alpha=0.5,
            linewidths=0,
        )
        fig.colorbar(points, ax=row[3], label="t")
        row[3].axvline(0, color="0.6", lw=0.8)
        row[3].axhline(0, color="0.6", lw=0.8)
        row[3].set(xlabel="Re lambda", ylabel="Im lambda", title=f"{_LABELS[kind]}: eigenvalues")
    fig.suptitle(
        f"{title}\n{spectra.source}; {spectra.shape.num_heads} heads, "
        f"{spectra.shape.num_kv_heads} KV heads, head_dim {spectra.shape.head_dim}"
    )
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format=path.suffix[1:] or "png", dpi=110)
    return path


def _display(token: str) -> str:
    return token.replace("\n", "\u21b5").replace("\t", "\u2192") or "\u2205"


def _colours(values: torch.Tensor):
    """RGBA per value on a shared colour scale, and the (lo, hi) of that scale."""
    matplotlib = require("matplotlib", "colouring tokens")
    finite = values[torch.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    scaled = ((values - lo) / (hi - lo)).clamp(0, 1).nan_to_num(0.0)
    return matplotlib.colormaps["viridis"](scaled.numpy()), (lo, hi)


def plot_tokens(
    lyapunov: Lyapunov, tokens: list[str], path: str | Path, title: str = "", font: float = 9.5
) -> Path:
    """The text, each token on a box coloured by its largest exponent, and below it all k
    exponents against token position.

    Example:
        >>> from odeify.analysis.lyapunov import lyapunov
        >>> from odeify.train.data import char_tokenizer
        >>> tok = char_tokenizer({"play": "to be, or not to be"})
        >>> ids = tok("to be")["input_ids"]
        >>> lam = lyapunov(model, ids, k=2, refine=0, progress=False)
        >>> plot_tokens(lam, [tok.decode([i]) for i in ids], "tokens.png")
        PosixPath('tokens.png')
    """
    Rectangle = require("matplotlib.patches", "plotting tokens").Rectangle  # noqa: N806 - a class
    colors = require("matplotlib.colors", "plotting tokens")
    cm = require("matplotlib.cm", "plotting tokens")

    if len(tokens) != len(lyapunov.largest):
        raise ValueError(f"{len(tokens)} tokens for {len(lyapunov.largest)} exponents")
    # Layout in inches: one data unit is one monospace character (about 0.6 em wide) and one
    # line, so the boxes fit their text whatever the length of the input.
    fig_width, left, text_width = 16.0, 0.5, 14.2
    line_height = font * 1.9 / 72
    width = int(text_width * 72 / (0.6 * font))
    colours, (lo, hi) = _colours(lyapunov.largest)
    boxes, line, column = [], 0, 0
    for token in tokens:
        shown = _display(token)
        if column + len(shown) > width and column > 0:
            line, column = line + 1, 0
        boxes.append((line, column, shown))
        column += len(shown)
        if "\n" in token:
            line, column = line + 1, 0
    lines = line + 1
    text_height, curves_height = lines * line_height, 2.6
    fig_height = text_height + curves_height + 1.7
    fig = figure(figsize=(fig_width, fig_height))

    def axes(x: float, y: float, w: float, h: float):
        return fig.add_axes((x / fig_width, y / fig_height, w / fig_width, h / fig_height))

    ax = axes(left, curves_height + 1.0, text_width, text_height)
    for (row, col, shown), colour in zip(boxes, colours, strict=True):
        ax.add_patch(Rectangle((col, row), len(shown), 0.92, facecolor=colour, edgecolor="none"))
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = "black" if luminance > 0.5 else "white"
        ax.text(col, row + 0.46, shown, family="monospace", fontsize=font, va="center", color=ink)
    ax.set(xlim=(0, width), ylim=(lines, 0))
    ax.axis("off")
    ax.set_title(title or "largest finite-time Lyapunov exponent per token")
    scale = cm.ScalarMappable(cmap="viridis", norm=colors.Normalize(lo, hi))
    bar = axes(left + text_width + 0.3, curves_height + 1.0, 0.15, max(text_height, 0.8))
    fig.colorbar(scale, cax=bar, label="largest exponent")

    curves = axes(left + 0.4, 0.55, text_width - 0.4, curves_height)
    positions = range(len(tokens))
    for j in range(lyapunov.exponents.shape[1]):
        curves.plot(
            positions,
            lyapunov.exponents[:, j].numpy(),
            lw=1.5 if j == 0 else 0.8,
            label=f"lambda_{j + 1}",
        )
    curves.set(
        xlabel="token position",
        ylabel="exponent (per unit t)",
        title=f"top-{lyapunov.exponents.shape[1]} exponents per token, "
        f"{lyapunov.steps} {lyapunov.scheme} steps",
    )
    curves.legend(fontsize=8, ncol=min(8, lyapunov.exponents.shape[1]))
    curves.grid(alpha=0.3)
    path = Path(path)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format=path.suffix[1:] or "png", dpi=110)
    return path


def tokens_html(
    lyapunov: Lyapunov, tokens: list[str], title: str = "", images: tuple[str, ...] = ()
) -> str:
    """An HTML page: the text with every token's background coloured by its largest exponent
    (hover for its top-k exponents), a colour legend, and the given images.

    Example:
        >>> from odeify.analysis.lyapunov import lyapunov
        >>> from odeify.train.data import char_tokenizer
        >>> tok = char_tokenizer({"play": "to be, or not to be"})
        >>> ids = tok("to be")["input_ids"]
        >>> lam = lyapunov(model, ids, k=2, refine=0, progress=False)
        >>> tokens = [tok.decode([i]) for i in ids]
        >>> _ = Path("index.html").write_text(tokens_html(lam, tokens, "to be"))
        >>> Path("index.html").read_text().count("<span style=")   # one coloured span per token
        5
    """
    colours, (lo, hi) = _colours(lyapunov.largest)
    spans = []
    for i, (token, colour) in enumerate(zip(tokens, colours, strict=True)):
        r, g, b = (round(255 * c) for c in colour[:3])
        ink = "#000" if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 0.5 else "#fff"
        values = ", ".join(f"{v:.3f}" for v in lyapunov.exponents[i].tolist())
        tip = html.escape(f"#{i} {token!r}: {values}", quote=True)
        body = html.escape(token.replace("\n", "\u21b5\n"))
        spans.append(
            f'<span style="background:rgb({r},{g},{b});color:{ink}" title="{tip}">{body}</span>'
        )
    stops = ", ".join(
        f"rgb({round(255 * c[0])},{round(255 * c[1])},{round(255 * c[2])})"
        for c in _colours(torch.linspace(0, 1, 11))[0]
    )
    figures = "".join(
        f'<p><img src="{html.escape(name)}" style="max-width:100%"></p>' for name in images
    )
    heading = html.escape(title or "Lyapunov exponents per token")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{heading}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
.text {{ font-family: monospace; white-space: pre-wrap; line-height: 1.9; font-size: 15px; }}
.text span {{ padding: 2px 0; border-radius: 2px; }}
.legend {{ height: 14px; width: 320px; background: linear-gradient(to right, {stops}); }}
</style></head><body>
<h1>{heading}</h1>
<p>Each token's background is its largest finite-time Lyapunov exponent: log of the largest
singular value of d x_k(1) / d x_k(0), the flow of the token's own state from t = 0 to 1
({lyapunov.steps} {html.escape(lyapunov.scheme)} steps, {lyapunov.refine} refinements).
Hover a token for its top-{lyapunov.exponents.shape[1]} exponents.</p>
<div style="display:flex;gap:8px;align-items:center"><span>{lo:.3f}</span>
<div class="legend"></div><span>{hi:.3f}</span></div>
<div class="text">{"".join(spans)}</div>
{figures}
</body></html>
"""


def write_report(
    out: str | Path,
    *,
    spectra: Spectra | None = None,
    layers: Spectra | None = None,
    lyapunov: Lyapunov | None = None,
    tokens: list[str] | None = None,
    title: str = "",
    meta: dict | None = None,
) -> dict[str, Path]:
    """Write spectra.png, tokens.png, index.html and analysis.json (whichever apply) to ``out``.

    Example:
        >>> from odeify.analysis.lyapunov import lyapunov
        >>> from odeify.train.data import char_tokenizer
        >>> tok = char_tokenizer({"play": "to be, or not to be"})
        >>> ids = tok("to be")["input_ids"]
        >>> lam = lyapunov(model, ids, k=2, refine=0, progress=False)
        >>> from odeify.analysis.spectra import spectra
        >>> s = spectra(model, times=8, progress=False)
        >>> tokens = [tok.decode([i]) for i in ids]
        >>> files = write_report("report", spectra=s, lyapunov=lam, tokens=tokens)
        >>> sorted(files), files["json"]
        (['html', 'json', 'spectra', 'tokens'], PosixPath('report/analysis.json'))
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    numbers: dict = {"title": title, **(meta or {})}
    if spectra is not None:
        written["spectra"] = plot_spectra(spectra, out / "spectra.png", title, layers)
        numbers["spectra"] = spectra.to_dict()
    if layers is not None:
        numbers["spectra_layers"] = layers.to_dict()
    if lyapunov is not None:
        if tokens is None:
            tokens = [str(i) for i in lyapunov.token_ids.tolist()]
        written["tokens"] = plot_tokens(lyapunov, tokens, out / "tokens.png", title)
        images = tuple(p.name for p in (written.get("spectra"), written["tokens"]) if p is not None)
        page = out / "index.html"
        write_text(page, tokens_html(lyapunov, tokens, title, images))
        written["html"] = page
        numbers["lyapunov"] = lyapunov.to_dict(tokens)
    path = out / "analysis.json"
    write_text(path, json.dumps(numbers, indent=1))
    written["json"] = path
    return written
