"""Measurements of issue 7 on SmolLM2-135M converted (hat basis): the QK/OV spectra over t, and
the time and peak memory of ``lyapunov`` at 64 and 256 tokens of Hamlet.

    python benchmarks/measure_analysis.py [--out benchmarks/figures] [--check-refine 6]

Peak memory is the growth of the process's peak resident set during the call (Linux: the peak
is reset through /proc/self/clear_refs before each measurement).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(fn):
    """(result, seconds, peak resident-set growth in MiB) of fn()."""
    # Hand freed heap back to the OS first, so earlier work's retained memory does not hide
    # this call's peak; then reset VmHWM to the current RSS.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, (_rss_kib("VmHWM") - before) / 1024


def trend(times: torch.Tensor, values: torch.Tensor) -> dict:
    """Least-squares slope against t, Spearman rank correlation, and last-third / first-third."""
    third = len(values) // 3
    ranks = lambda v: v.argsort().argsort().double()
    rt, rv = ranks(times), ranks(values)
    spearman = float(torch.corrcoef(torch.stack([rt, rv]))[0, 1])
    slope = float(
        torch.linalg.lstsq(
            torch.stack([times, torch.ones_like(times)], 1), values[:, None]
        ).solution[0]
    )
    return {
        "first": float(values[0]),
        "last": float(values[-1]),
        "max": float(values.max()),
        "argmax_t": float(times[values.argmax()]),
        "slope_per_unit_t": slope,
        "spearman": spearman,
        "last_third_over_first_third": float(values[-third:].mean() / values[:third].mean()),
    }


def _norm_folded(model) -> dict[str, torch.Tensor]:
    """QK and OV eigenvalues per layer with the input RMSNorm gain folded into W_Q, W_K and W_V
    (the maps the attention actually applies to the normalised states), each [L, H, hd]."""
    from odeify.analysis.heads import head_weights
    from odeify.analysis.spectra import head_products

    w = head_weights(model)
    gains = torch.stack([layer.input_layernorm.weight.detach() for layer in model.model.layers])
    q, k, v = (m.double() * gains.double()[:, None, :] for m in (w.q, w.k, w.v))
    products = head_products(q, k, v, w.o.double(), w.shape)
    return {kind: torch.linalg.eigvals(product) for kind, product in products.items()}


def _lyapunov_entry(model, tokenizer, ids, count: int, out: Path, check_refine: int) -> dict:
    """Time, memory and exponents of ``lyapunov`` on the first ``count`` tokens; at 64 tokens also
    the heat map and the error against a more refined run."""
    from odeify.analysis import lyapunov
    from odeify.analysis.report import plot_tokens

    lam, seconds, peak = measure(lambda: lyapunov(model, ids[:count]))
    entry = {
        "tokens": count,
        "steps": lam.steps,
        "scheme": lam.scheme,
        "k": lam.exponents.shape[1],
        "refine": lam.refine,
        "seconds": round(seconds, 1),
        "peak_rss_growth_mib": round(peak),
        "largest_mean": float(lam.largest.mean()),
        "largest_max": float(lam.largest.max()),
        "largest_min": float(lam.largest.min()),
        "residual_max": float(lam.residual.max()),
    }
    if count == 64:
        tokens = [tokenizer.decode([i]) for i in ids[:count].tolist()]
        plot_tokens(lam, tokens, out / "smollm2_tokens64.png", "SmolLM2-135M, 64 tokens of Hamlet")
        reference = lyapunov(model, ids[:count], refine=check_refine, progress=False)
        entry[f"largest_error_vs_refine_{check_refine}"] = float(
            (lam.largest - reference.largest).abs().max()
        )
        entry[f"top_k_error_vs_refine_{check_refine}"] = float(
            (lam.exponents - reference.exponents).abs().max()
        )
        plain = lyapunov(model, ids[:count], refine=0, progress=False)
        entry["largest_mean_refine_0"] = float(plain.largest.mean())
    return entry


def _spectra_trends(layers, folded: dict) -> dict:
    """Trends over depth of the original layers' QK/OV spectra, raw and with the norm gain folded."""
    results = {}
    for kind in ("qk", "ov"):
        curves = layers.summary(kind)
        results[kind] = {name: trend(layers.times, curves[name]) for name in ("radius", "mean_abs")}
        results[kind]["positive_real_fraction"] = trend(
            layers.times, curves["positive_real_fraction"]
        )
        results[kind]["per_layer_mean_abs"] = [round(v, 4) for v in curves["mean_abs"].tolist()]
        results[kind]["per_layer_radius"] = [round(v, 4) for v in curves["radius"].tolist()]
    for kind, lam in folded.items():
        results[f"{kind}_rmsnorm_gain_folded"] = {
            "mean_abs": trend(layers.times, lam.abs().flatten(1).mean(-1)),
            "radius": trend(layers.times, lam.abs().flatten(1).amax(-1)),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/figures")
    parser.add_argument("--check-refine", type=int, default=6, help="reference refine count")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from odeify import odeify
    from odeify.analysis import lyapunov, spectra
    from odeify.analysis.report import plot_spectra
    from odeify.assets import load_smollm2, play_text

    model, tokenizer = load_smollm2()
    results: dict = {"threads": torch.get_num_threads(), "lyapunov": {}}
    layers = spectra(model)
    folded = _norm_folded(model)
    odeify(model, progress=False)
    ids = tokenizer(play_text("hamlet")[2000:40000], return_tensors="pt").input_ids[0]
    lyapunov(model, ids[:8], k=1, refine=0, progress=False)  # warm-up (first-call overheads)
    for count in (64, 256):
        entry = _lyapunov_entry(model, tokenizer, ids, count, out, args.check_refine)
        results["lyapunov"][count] = entry
        print(json.dumps(entry))
    s = spectra(model, times=64)
    plot_spectra(s, out / "smollm2_spectra.png", "SmolLM2-135M converted (hat basis)", layers)
    results["spectra"] = _spectra_trends(layers, folded)
    (out / "smollm2_analysis.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results["spectra"], indent=1))


if __name__ == "__main__":
    main()
