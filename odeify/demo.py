"""The main job on the bundled defaults: SmolLM2-135M on Shakespeare.

Convert, check fidelity at N = L, sweep the step count on the uniform grid, calibrate the
schedule of a few step counts (:func:`odeify.calibrate`: step times and gains fitted in a minute
on other plays, weights frozen) and compare, and write a plot and a report. It shows honestly
what holds for a converted pretrained model: it reproduces the original at N = L; uniform
retargeting to fewer steps fails (pretrained layers are not smooth in depth); a calibrated
schedule recovers much of it without touching a weight; depth adaptation
(recipes/adapt_depth.py) trains the weights on top.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .api import get_block, odeify
from .api import steps as at_steps
from .assets import load_smollm2
from .atomic import write_text
from .calibrate import calibrate
from .evaluate import perplexity
from .train.data import corpus, tokenize, windows
from .train.evaluate import sweep
from .train.plots import plot_sweep

PROMPT = "To be, or not to be, that is the question:"
# Calibration text: plays the demo never evaluates on (the evaluated play is left out).
CALIBRATION_PLAYS = ("othello", "king-lear", "romeo-and-juliet", "julius-caesar")


def _greedy(model, tokenizer, n_new: int = 24) -> tuple[list[int], str]:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(
        ids, max_new_tokens=n_new, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    new = out[0, ids.shape[1] :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


@torch.no_grad()
def run_demo(
    out: Path,
    play: str = "hamlet",
    tokens: int = 2048,
    step_counts: list[int] | None = None,
    calibrated: list[int] | None = None,
    calibrate_iters: int = 30,
) -> dict:
    """Run the demo and write ``results.json``, ``perplexity.png`` and ``report.md`` under ``out``.

    ``calibrated``: the step counts whose schedules the demo calibrates (default [20], each
    ``calibrate_iters`` Adam steps of 2 x 128 tokens), compared with the uniform grid.
    """
    out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    print("loading SmolLM2-135M-Instruct (GGUF, dequantised to float32)...")
    model, tokenizer = load_smollm2()
    num_layers = model.config.num_hidden_layers
    targets = sorted(n for n in (calibrated or [20]) if n < num_layers)
    step_counts = sorted(set(step_counts or [num_layers]) | {num_layers} | set(targets))
    ids = windows(tokenize(corpus(f"shakespeare:{play}"), tokenizer), 512, max(1, tokens // 512))
    print(f"evaluating on {ids.numel()} tokens of {play} ({len(ids)} windows of 512)")

    original_ppl = perplexity(model, ids, desc="original")
    original_logits = model(ids[:1], use_cache=False).logits
    original_tokens, original_text = _greedy(model, tokenizer)

    start = time.perf_counter()
    odeify(model)
    convert_seconds = time.perf_counter() - start
    block = get_block(model)
    max_residual = max(block.fit_residuals.values())
    ode_logits = model(ids[:1], use_cache=False).logits
    max_logit_diff = (ode_logits - original_logits).abs().max().item()
    ode_tokens, _ = _greedy(model, tokenizer)

    curve = sweep(model, ids, step_counts, progress=True).perplexity()
    with at_steps(model, min(step_counts)):
        few_tokens, few_text = _greedy(model, tokenizer)

    plays = ",".join(p for p in CALIBRATION_PLAYS if p != play)
    data = torch.from_numpy(tokenize(corpus(f"shakespeare:{plays}"), tokenizer).astype("int64"))
    start = time.perf_counter()
    fits = calibrate(model, targets, data, iters=calibrate_iters, seq_len=128)
    calibrate_seconds = time.perf_counter() - start
    tuned = sweep(model, ids, targets, progress=True).perplexity()
    uniform = {n: curve[n] for n in targets}  # swept before any schedule was calibrated
    with at_steps(model, targets[0]):
        tuned_text = _greedy(model, tokenizer)[1]

    plot = plot_sweep(
        {"uniform grid (t_i = i/N, gains L/N)": curve, "calibrated schedule": tuned},
        out / "perplexity.png",
        f"SmolLM2-135M ({num_layers} layers) on {play}, training-free retargeting",
        {"original": original_ppl},
    )
    results = {
        "model": "SmolLM2-135M-Instruct",
        "layers": num_layers,
        "eval_tokens": ids.numel(),
        "play": play,
        "convert_seconds": round(convert_seconds, 2),
        "max_fit_residual": max_residual,
        "max_abs_logit_diff_at_L": max_logit_diff,
        "original_perplexity": original_ppl,
        "perplexity_by_steps": curve,
        "greedy_tokens_equal_at_L": ode_tokens == original_tokens,
        "greedy_original": original_text,
        f"greedy_at_{min(step_counts)}_steps": few_text,
        "calibrated": {
            str(n): {
                "uniform_perplexity": uniform[n],
                "calibrated_perplexity": tuned[n],
                "initial_layers": fits[n].layers,
                "schedule": fits[n].schedule.to_dict(),
                "kl_first_last": [fits[n].losses[0], fits[n].losses[-1]],
            }
            for n in targets
        },
        "calibrate_seconds": round(calibrate_seconds, 1),
        "calibrate_iters": calibrate_iters,
        f"greedy_at_{targets[0]}_steps_calibrated": tuned_text,
        "calibration_plays": plays,
        "seconds": round(time.perf_counter() - clock, 1),
    }
    write_text(out / "results.json", json.dumps(results, indent=2))
    write_text(out / "report.md", _report(results, curve, original_ppl, min(step_counts)))
    print(_report(results, curve, original_ppl, min(step_counts)))
    print(f"wrote {out / 'results.json'}, {plot}, {out / 'report.md'}")
    return results


def _report(results: dict, curve: dict[int, float], original: float, fewest: int) -> str:
    first = min(results["calibrated"], key=int)
    calibrated = "\n".join(
        ["| steps N | uniform | calibrated | vs original |", "|---|---|---|---|"]
        + [
            f"| {n} | {c['uniform_perplexity']:,.1f} | {c['calibrated_perplexity']:,.2f} | "
            f"{c['calibrated_perplexity'] / original:,.2f}x |"
            for n, c in results["calibrated"].items()
        ]
    )
    rows = "\n".join(
        f"| {n} | {ppl:,.2f} | {ppl / original:,.2f}x |"
        + (" (= L)" if n == results["layers"] else "")
        for n, ppl in curve.items()
    )
    return f"""# odeify demo: {results["model"]} on {results["play"]}

Converted in {results["convert_seconds"]} s (hat basis, K = L = {results["layers"]}, exact fit:
max relative residual {results["max_fit_residual"]:.1e}).

Fidelity at N = L ({results["layers"]} sequential steps): max |logit difference| against the
original = {results["max_abs_logit_diff_at_L"]:.2e}; greedy tokens equal: {results["greedy_tokens_equal_at_L"]}.

| steps N | perplexity | vs original ({original:.2f}) |
|---|---|---|
{rows}

Uniform retargeting degrades: the pretrained layers are not a smooth function of depth, so
W(t) between layers is a blend the model never saw, and L/N times each update overshoots.

## Calibrated schedules (weights untouched)

{calibrated}

Calibrated on {results["calibration_plays"]} (never evaluated here) in
{results["calibrate_seconds"]} s, {results["calibrate_iters"]} Adam steps of 2 x 128 tokens per
step count: the initial nodes come from a one-step jump cost over the original's layers, then
the step times and one gain per attention and MLP update are fitted by KL to the original. No
weight changes; the schedules are saved with the model and used by odeify.steps, generate and
materialize. What calibration cannot fix, depth adaptation trains into the weights:
recipes/adapt_depth.py with `schedules: calibrate` (recipes/configs/adapt-smollm2-v2.yaml)
starts from these schedules and trains them together with the weight functions.

Greedy continuation of "{PROMPT}"
- original / odeified at N = L: {results["greedy_original"]!r}
- odeified at N = {fewest}: {results[f"greedy_at_{fewest}_steps"]!r}
- calibrated at N = {first}: {results[f"greedy_at_{first}_steps_calibrated"]!r}

{results["eval_tokens"]} tokens, windows of 512; total {results["seconds"]} s.
"""
