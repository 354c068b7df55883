"""The main job on the bundled defaults: SmolLM2-135M on Shakespeare.

Convert, check fidelity at N = L, sweep the step count, and write a plot and a report. It shows
honestly what holds for a converted pretrained model: it reproduces the original at N = L, and
training-free retargeting to other step counts degrades (pretrained layers are not smooth in
depth); depth adaptation (recipes/adapt_depth.py) is what makes it retargetable.
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
from .evaluate import perplexity
from .train.data import corpus, tokenize, windows
from .train.evaluate import sweep
from .train.plots import plot_sweep

PROMPT = "To be, or not to be, that is the question:"


def _greedy(model, tokenizer, n_new: int = 24) -> tuple[list[int], str]:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(
        ids, max_new_tokens=n_new, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    new = out[0, ids.shape[1] :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


@torch.no_grad()
def run_demo(
    out: Path, play: str = "hamlet", tokens: int = 2048, step_counts: list[int] | None = None
) -> dict:
    """Run the demo and write ``results.json``, ``perplexity.png`` and ``report.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    print("loading SmolLM2-135M-Instruct (GGUF, dequantised to float32)...")
    model, tokenizer = load_smollm2()
    num_layers = model.config.num_hidden_layers
    step_counts = sorted(set(step_counts or [num_layers]) | {num_layers})
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

    plot = plot_sweep(
        {"odeified, hat basis, sequential": curve},
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
        "seconds": round(time.perf_counter() - clock, 1),
    }
    write_text(out / "results.json", json.dumps(results, indent=2))
    write_text(out / "report.md", _report(results, curve, original_ppl, min(step_counts)))
    print(_report(results, curve, original_ppl, min(step_counts)))
    print(f"wrote {out / 'results.json'}, {plot}, {out / 'report.md'}")
    return results


def _report(results: dict, curve: dict[int, float], original: float, fewest: int) -> str:
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

Training-free retargeting degrades: the pretrained layers are not a smooth function of depth,
so W(t) between layers is a blend the model never saw. Depth adaptation
(recipes/adapt_depth.py) trains the weight functions so other step counts work.

Greedy continuation of "{PROMPT}"
- original / odeified at N = L: {results["greedy_original"]!r}
- odeified at N = {fewest}: {results[f"greedy_at_{fewest}_steps"]!r}

{results["eval_tokens"]} tokens, windows of 512; total {results["seconds"]} s.
"""
