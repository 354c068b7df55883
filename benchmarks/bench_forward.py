"""Forward latency and generation speed: odeified at N = L (weight cache warm) against the
original model, in the same run. The ratios print at the end (benchmarks/conftest.py).

Each group has the two models timed separately and a ``paired`` entry that alternates them call
by call and reports the median of the per-pair ratios of process CPU time: on a shared machine
whose load changes from second to second, that median is the number to trust. Torch runs on one
thread here for the same reason (idle OpenMP threads spin while other processes hold the cores).

    make bench          # or: python -m pytest benchmarks/bench_forward.py --benchmark-only
"""

import copy
import statistics
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from odeify import odeify
from odeify.assets import load_smollm2

NEW_TOKENS = 16
torch.set_num_threads(1)


def _gpt2_small():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12)).eval()


@pytest.fixture(scope="module", params=["smollm2", "gpt2-small"])
def models(request):
    original = load_smollm2()[0] if request.param == "smollm2" else _gpt2_small()
    ode = odeify(copy.deepcopy(original), progress=False)
    return request.param, {"original": original, "odeified": ode}


def _forward(model):
    ids = torch.randint(0, 1000, (1, 256), generator=torch.Generator().manual_seed(0))
    return lambda: model(ids, use_cache=False)


def _generate(model):
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    return lambda: model.generate(
        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )


TASKS = {
    "forward": (_forward, "1x256 tokens"),
    "generate": (_generate, f"16+{NEW_TOKENS} tokens, greedy, KV cache"),
}


@pytest.mark.parametrize("variant", ["original", "odeified", "paired"])
@pytest.mark.parametrize("task", list(TASKS))
def test_speed(benchmark, models, task, variant):
    name, pair = models
    make, label = TASKS[task]
    benchmark.group = f"{task} {name} {label}"
    benchmark.extra_info["baseline"] = variant == "original"
    calls = {k: make(m) for k, m in pair.items()}
    with torch.inference_mode():
        for call in calls.values():
            call()  # warm-up; fills the weight cache
        if variant != "paired":
            benchmark.pedantic(
                calls[variant], rounds=6 if task == "forward" else 4, warmup_rounds=1
            )
        else:
            ratios = []

            def both():
                seconds = {}
                for k in ("original", "odeified") if len(ratios) % 2 else ("odeified", "original"):
                    start = time.process_time()
                    calls[k]()
                    seconds[k] = time.process_time() - start
                ratios.append(seconds["odeified"] / seconds["original"])

            benchmark.pedantic(both, rounds=12 if task == "forward" else 8)
            benchmark.extra_info["paired_ratio_median"] = statistics.median(ratios)
    if task == "generate" and variant != "paired":
        benchmark.extra_info["tokens_per_s"] = NEW_TOKENS / benchmark.stats.stats.mean
