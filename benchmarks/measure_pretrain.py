"""Measurements of issue 4: DiffEqFormer against the discrete GPT baseline, pretrained from
scratch with ``recipes/pretrain.py``.

    # throughput: both models' training steps alternated in one process, same batches
    python benchmarks/measure_pretrain.py throughput --config recipes/configs/shakespeare-char.yaml
    # after the runs: curves, retargeting plot and a markdown table
    python benchmarks/measure_pretrain.py report runs/char-baseline runs/char-ode runs/char-ode-aug

Alternating the two models step by step exposes both to the same load on a shared machine, so
their ratio is meaningful even when absolute tokens/s are not.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import odeify
from odeify.train import data
from odeify.train.config import load_config, parse_overrides
from odeify.train.optim import adamw
from odeify.train.plots import plot_sweep

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_SPEC = importlib.util.spec_from_file_location(
    "pretrain", Path(__file__).parents[1] / "recipes" / "pretrain.py"
)
pretrain = importlib.util.module_from_spec(_SPEC)
sys.modules["pretrain"] = pretrain
_SPEC.loader.exec_module(pretrain)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(); on one thread the CPU time is the work
    itself, whatever share of the CPU other jobs leave this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_growth_mib(fn) -> float:
    """Growth of the process's peak resident set during fn() (Linux: the peak is reset first,
    and freed heap handed back, so earlier work does not hide this call's peak)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def _models(cfg) -> tuple[data.Batches, dict]:
    """The training batches and both models, each with its optimizer, from one seed."""
    docs = data.corpus(cfg.corpus)
    train_docs, _ = data.split(docs, cfg.heldout, cfg.heldout_fraction, cfg.corpus)
    tokenizer = pretrain.load_tokenizer(cfg.tokenizer, docs)
    cache = data.CACHE if cfg.token_cache is None else Path(cfg.token_cache)
    tokens = data.tokenize(train_docs, tokenizer, cache)
    batches = data.Batches(tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
    hf_config = pretrain.model_config(cfg, tokenizer)
    runs = {}
    for ode in (False, True):
        torch.manual_seed(cfg.seed)
        model = pretrain.build_model(cfg, hf_config, ode).train()
        optimizer = adamw(model, cfg.lr, cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
        runs["diffeqformer" if ode else "baseline"] = (model, optimizer)
    return batches, runs


def _forward_backward(model, x, y) -> None:
    logits = model(x, use_cache=False).logits
    F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()


def _update(model, optimizer, clip: float) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _alternate(runs: dict, batches, cfg, steps: int, warmup: int) -> dict:
    """Per-step (wall, CPU, optimizer CPU) seconds of each model, the models taking turns."""
    times = {name: {"wall": [], "cpu": [], "optimizer_cpu": []} for name in runs}
    for step in range(warmup + steps):
        x, y = batches.get(step)
        for name, (model, optimizer) in runs.items():
            compute = _timed(lambda m=model, x=x, y=y: _forward_backward(m, x, y))
            updated = _timed(lambda m=model, o=optimizer: _update(m, o, cfg.grad_clip))
            if step >= warmup:
                times[name]["wall"].append(compute[0] + updated[0])
                times[name]["cpu"].append(compute[1] + updated[1])
                times[name]["optimizer_cpu"].append(updated[1])
    return times


def _step_peaks(runs: dict, batches, cfg) -> dict[str, float]:
    """Memory a training step adds on top of the parameters and optimizer state (activations,
    gradients, and for the ODE the weight grid W(t)): the largest of three steps."""
    x, y = batches.get(0)

    def step(model, optimizer):
        _forward_backward(model, x, y)
        _update(model, optimizer, cfg.grad_clip)

    return {
        name: max(_peak_growth_mib(lambda m=m, o=o: step(m, o)) for _ in range(3))
        for name, (m, o) in runs.items()
    }


def _weight_grid_seconds(model, cfg, rounds: int, warmup: int) -> float:
    """Median CPU seconds of W(t) at the L grid times, forward and backward."""
    block = odeify.get_block(model)
    grid = [i / cfg.n_layer for i in range(cfg.n_layer)]

    def grid_forward_backward():
        weights = block.weights_at(grid)
        torch.autograd.backward(
            list(weights.values()), [torch.ones_like(w) for w in weights.values()]
        )

    seconds = [_timed(grid_forward_backward)[1] for _ in range(rounds)]
    block.zero_grad(set_to_none=True)
    return statistics.median(seconds[warmup:])


def throughput(config: str, overrides: dict, steps: int, warmup: int) -> dict:
    """Training-step time of both models, alternated step by step on the same batches, and
    where the ODE step's extra time could go: the weight grid W(t) (forward and backward) and
    the optimizer step (clipping included)."""
    cfg = load_config(pretrain.Config, config, overrides)
    batches, runs = _models(cfg)
    times = _alternate(runs, batches, cfg, steps, warmup)
    step_peak = _step_peaks(runs, batches, cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    out = {
        "config": config,
        "overrides": overrides,
        "steps": steps,
        "threads": torch.get_num_threads(),
    }
    for name in runs:
        cpu = statistics.median(times[name]["cpu"])
        out[name] = {
            "cpu_seconds_per_step": cpu,
            "wall_seconds_per_step": statistics.median(times[name]["wall"]),
            "tokens_per_cpu_second": tokens_per_step / cpu,
            "optimizer_cpu_seconds": statistics.median(times[name]["optimizer_cpu"]),
            "step_peak_growth_mib": step_peak[name],
            "parameters": pretrain.parameter_counts(runs[name][0]),
        }
    out["diffeqformer"]["weight_grid_cpu_seconds"] = _weight_grid_seconds(
        runs["diffeqformer"][0], cfg, warmup + steps, warmup
    )
    # Each pair ran back to back under the same load: the median of their ratios.
    for clock in ("cpu", "wall"):
        pairs = zip(times["baseline"][clock], times["diffeqformer"][clock], strict=True)
        out[f"throughput_ratio_{clock}"] = statistics.median(b / o for b, o in pairs)
    return out


def _read(run: Path) -> tuple[list[dict], dict, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    return records, summary, config


def _label(config: dict) -> str:
    if not config["ode"]:
        return "GPT baseline"
    aug = config.get("step_augmentation")
    return "DiffEqFormer" + (f" + step augmentation {aug[0]}-{aug[1]}" if aug else "")


def _run_label(config: dict) -> str:
    return _label(config) + f", lr {config['lr']:g}, seed {config.get('seed', 0)}"


def _plot_curves(runs: list[Path], figures: Path) -> list[tuple]:
    """``pretrain_curves.png`` (validation at N = L and smoothed training loss against tokens);
    returns one row per run: (label, summary, final perplexities, L, late loss drop, steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    rows = []
    for run in runs:
        records, summary, config = _read(run)
        label, depth = _run_label(config), config["n_layer"]
        evals = [r for r in records if r["event"] == "eval"]
        tokens = [r["step"] * config["batch_size"] * config["seq_len"] / 1e6 for r in evals]
        ax.plot(tokens, [r["val_loss"][str(depth)] for r in evals], marker=".", label=label)
        train = [r for r in records if r["event"] == "train"]
        window = max(1, len(train) // 20)
        smooth = [
            statistics.mean(r["loss"] for r in train[max(0, i - window + 1) : i + 1])
            for i in range(len(train))
        ]
        ax.plot(
            [r["tokens"] / 1e6 for r in train],
            smooth,
            alpha=0.35,
            linewidth=0.8,
            color=ax.lines[-1].get_color(),
        )
        ppl = {int(k): v for k, v in summary["final"]["perplexity"].items()}
        last = evals[-1]["val_loss"][str(depth)]
        late = [r for r in evals if r["step"] <= 0.8 * evals[-1]["step"]][-1]
        rows.append(
            (label, summary, ppl, depth, late["val_loss"][str(depth)] - last, evals[-1]["step"])
        )
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss (dots: validation at N = L; lines: training)")
    ax.set_title("Pretraining on Shakespeare, held-out plays")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figures / "pretrain_curves.png")
    plt.close(fig)
    return rows


def _table(rows: list[tuple]) -> str:
    lines = [
        "| model | parameters (non-embedding) | tokens/s (own run) | peak RSS MiB | val ppl at N = L | loss drop over the last 20% |",
        "|---|---|---|---|---|---|",
    ]
    for label, summary, ppl, depth, drop, _ in rows:
        key = "baseline" if label.startswith("GPT baseline") else "diffeqformer"
        params = summary["parameters"][key]
        lines.append(
            f"| {label} | {params['total']:,} ({params['non_embedding']:,}) | "
            f"{summary['tokens_per_s']:,.0f} | {summary['peak_memory_mib']:,.0f} | "
            f"{ppl[depth]:.3f} | {drop:.4f} |"
        )
    counts = sorted({n for _, _, ppl, *_ in rows for n in ppl})
    lines += ["", "| model | " + " | ".join(f"N = {n}" for n in counts) + " |"]
    lines.append("|---|" + "---|" * len(counts))
    for label, _, ppl, *_ in rows:
        lines.append(
            f"| {label} | " + " | ".join(f"{ppl[n]:.3f}" if n in ppl else "" for n in counts) + " |"
        )
    return "\n".join(lines)


def report(runs: list[Path], figures: Path) -> str:
    """Validation curves against tokens, perplexity against solver steps, and a markdown table."""
    figures.mkdir(parents=True, exist_ok=True)
    rows = _plot_curves(runs, figures)
    sweep = {label: ppl for label, _, ppl, *_ in rows}
    plot_sweep(
        {k: v for k, v in sweep.items() if len(v) > 1},
        figures / "pretrain_retarget.png",
        "DiffEqFormer: validation perplexity against solver steps",
        reference={k: next(iter(v.values())) for k, v in sweep.items() if len(v) == 1},
    )
    return _table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the result here")
    p = sub.add_parser("report")
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--figures", type=Path, default=Path("benchmarks/figures"))
    args = parser.parse_args()
    if args.command == "throughput":
        result = throughput(args.config, parse_overrides(args.set), args.steps, args.warmup)
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
    else:
        print(report(args.runs, args.figures))


if __name__ == "__main__":
    main()
