"""Fine-tuning measurements on SmolLM2-135M behind the "Fine-tuning (issue 5)" section of RESULTS.md.

    python benchmarks/measure_finetune.py steptime --rounds 12 --out benchmarks/figures/finetune_steptime.json
    python benchmarks/measure_finetune.py shared --config recipes/configs/lora-smollm2-shakespeare.yaml \
        --set out_dir=runs/shared-lora-smollm2-shakespeare
    python benchmarks/measure_finetune.py report runs/*-smollm2-shakespeare --plot benchmarks/figures/finetune_smollm2.png

``steptime`` times one LoRA training step (forward, backward, AdamW) of the original model, of
continuous LoRA on the odeified model and of a shared t-independent dW, alternating the models
in one process on the same batch so that load from other jobs hits all of them alike, then
profiles one step of each LoRA form. ``shared`` runs the fine-tuning recipe with the shared dW
in place of peft's continuous LoRA (the alternative the continuous form was chosen over).
``report`` prints the markdown table of recipe runs and draws their perplexities.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parents[1]


def _recipe():
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "recipes" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune"] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------- shared dW
class _SharedDelta(nn.Module):
    """P_k + (alpha / r) B A for every k: with a basis whose coefficients sum to one (the hat
    basis does), W(t) + dW at every t: one t-independent update per matrix."""

    def __init__(self, shape: torch.Size, r: int, alpha: float):
        super().__init__()
        out_features, in_features = shape[-2:]
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's (nn.Linear's) init
        self.scaling = alpha / r

    def forward(self, basis: torch.Tensor) -> torch.Tensor:
        return basis + self.scaling * (self.lora_B @ self.lora_A)


class SharedLoRA(nn.Module):
    """An odeified model with a shared dW on the given block matrices; only dW trains."""

    def __init__(self, model: nn.Module, r: int, alpha: float, names: list[str]):
        super().__init__()
        import odeify

        block = odeify.get_block(model)
        if any(abs(s - 1) > 1e-6 for s in block.coefficients([0.1, 0.5, 0.93])["shared"].sum(1)):
            raise ValueError("a shared dW needs a basis whose coefficients sum to one (hat)")
        model.requires_grad_(False)
        self.model = model
        for name in names:
            leaf = block.basis
            for part in name.split(".")[:-1]:
                leaf = getattr(leaf, part)
            shape = block.basis_tensor(name).shape
            parametrize.register_parametrization(leaf, "weight", _SharedDelta(shape, r, alpha))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        save_file(tensors, path / "adapter_model.safetensors")


def _targets(model) -> list[str]:
    from odeify.lora import lora_config

    return [n.removeprefix("basis.") for n in lora_config(8, model=model).target_parameters]


# -------------------------------------------------------------------------------- steptime
def _train_step(model, optimizer, x, y) -> tuple[float, float]:
    """(wall, process CPU) seconds of one training step. On one thread, CPU time is what the step
    costs whatever else the machine runs; wall time also counts the waits for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    logits = model(x, use_cache=False).logits
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def _profile(model, optimizer, x, y, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _train_step(model, optimizer, x, y)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [
        {"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count}
        for e in rows
    ]


def _models(args) -> tuple[dict, dict, int]:
    """The three LoRA forms of SmolLM2 (original, continuous, shared dW), their optimizers, and
    the vocabulary size."""
    from peft import get_peft_model

    import odeify
    from odeify.assets import load_smollm2
    from odeify.lora import lora_config

    torch.manual_seed(0)
    base, _ = load_smollm2()
    original = get_peft_model(copy.deepcopy(base), lora_config(args.r, model=base))
    ode = odeify.odeify(base, progress=False)
    shared = SharedLoRA(copy.deepcopy(ode), args.r, 2 * args.r, _targets(ode))
    continuous = get_peft_model(ode, lora_config(args.r, model=ode))
    models = {"original LoRA": original, "continuous LoRA": continuous, "shared dW": shared}
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for k, m in models.items()
    }
    for m in models.values():
        m.train()
    return models, optimizers, base.config.vocab_size


def _rounds(models: dict, optimizers: dict, x, y, args) -> tuple[dict, dict]:
    """(wall, CPU) seconds per round of each model, the order rotating every round."""
    wall = {k: [] for k in models}
    cpu = {k: [] for k in models}
    names = list(models)
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed order
        for name in order:
            seconds, cpu_seconds = _train_step(models[name], optimizers[name], x, y)
            if r >= args.warmup:
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
        if r >= args.warmup:
            print(
                f"round {r}: "
                + ", ".join(f"{k} {wall[k][-1]:.2f} s ({cpu[k][-1]:.2f} CPU)" for k in names),
                flush=True,
            )
    return wall, cpu


def _paired(times: dict, name: str) -> float:
    """The median over rounds of the per-round ratio to the original."""
    ratios = [a / b for a, b in zip(times[name], times["original LoRA"], strict=True)]
    return round(statistics.median(ratios), 3)


def _print(result: dict) -> None:
    lists = ("cpu_seconds", "wall_seconds", "profile")
    print(json.dumps({k: v for k, v in result.items() if k not in lists}, indent=2))
    for name, rows in result["profile"].items():
        print(f"\n{name}: top ops by self CPU time")
        for row in rows:
            print(f"  {row['self_ms']:>9.1f} ms  {row['calls']:>5}  {row['op']}")


def steptime(args) -> dict:
    """Step times of the three LoRA forms on one batch, and a profile of two of them."""
    torch.set_num_threads(args.threads)
    models, optimizers, vocab = _models(args)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=generator)
    x, y = tokens[:, :-1], tokens[:, 1:]
    wall, cpu = _rounds(models, optimizers, x, y, args)
    names = list(models)
    result = {
        "threads": args.threads,
        "batch": [args.batch, args.seq],
        "rank": args.r,
        "rounds": args.rounds,
        "median_cpu_seconds": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "median_wall_seconds": {k: round(statistics.median(v), 3) for k, v in wall.items()},
        "over_original_cpu": {k: _paired(cpu, k) for k in names[1:]},
        "over_original_wall": {k: _paired(wall, k) for k in names[1:]},
        "cpu_seconds": {k: [round(s, 3) for s in v] for k, v in cpu.items()},
        "wall_seconds": {k: [round(s, 3) for s in v] for k, v in wall.items()},
        "trainable": {
            k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()
        },
        "profile": {
            k: _profile(models[k], optimizers[k], x, y)
            for k in ("original LoRA", "continuous LoRA")
        },
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    _print(result)
    return result


# ---------------------------------------------------------------------------------- shared
def shared(args) -> dict:
    """The fine-tuning recipe with the shared dW in place of continuous LoRA."""
    import dataclasses

    from odeify.train.config import load_config, parse_overrides

    finetune = _recipe()
    cfg = load_config(finetune.Config, args.config, parse_overrides(args.set))
    if cfg.form != "continuous" or cfg.method != "lora":
        raise ValueError(
            "the shared dW replaces continuous LoRA: use a form: continuous, method: lora config"
        )

    class SharedFinetune(finetune.Finetune):
        def prepare(self, base):
            full = finetune.prepare(dataclasses.replace(self.cfg, method="full"), base)
            alpha = self.cfg.lora_alpha if self.cfg.lora_alpha is not None else 2 * self.cfg.lora_r
            return SharedLoRA(full, self.cfg.lora_r, alpha, _targets(full)).train()

    return SharedFinetune(cfg).run(resume=args.resume)


# ---------------------------------------------------------------------------------- report
def report(args) -> str:
    from odeify.train.plots import plot_sweep

    rows, curves, before = [], {}, None
    for folder in args.runs:
        path = Path(folder) / "summary.json"
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        name = Path(folder).name.removesuffix("-smollm2-shakespeare")
        before = before or {int(k): v for k, v in s["perplexity_before"].items()}
        curves[name] = {int(k): v for k, v in s["perplexity_after"].items()}
        counts = sorted(int(k) for k in s["perplexity_after"])
        cells = " | ".join(
            f"{s['perplexity_before'][str(n)]:,.1f} -> {s['perplexity_after'][str(n)]:,.1f}"
            for n in counts
        )
        size = s.get("adapter_bytes")
        rows.append(
            f"| {name} | {cells} | {s['trainable_parameters']:,} | "
            f"{'-' if size is None else f'{size / 2**20:.1f} MiB'} | "
            f"{s['seconds_per_step']:.2f} ({s['cpu_seconds_per_step']:.2f} CPU) | {s['peak_memory_mib']:,.0f} |"
        )
    header = (
        "| run | "
        + " | ".join(f"N = {n}" for n in counts)
        + " | trainable | adapter | s/step wall (CPU) | peak MiB |\n"
        "|---|" + "---|" * len(counts) + "---|---|---|---|"
    )
    table = header + "\n" + "\n".join(rows)
    print(table)
    if args.plot and curves:
        plot_sweep(
            {"before (all runs)": before, **{f"after: {k}": v for k, v in curves.items()}},
            args.plot,
            "SmolLM2-135M fine-tuned on Shakespeare: held-out plays",
        )
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("steptime")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--out")
    p.set_defaults(fn=steptime)
    p = sub.add_parser("shared")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--resume", action="store_true")
    p.set_defaults(fn=shared)
    p = sub.add_parser("report")
    p.add_argument("runs", nargs="+")
    p.add_argument("--plot")
    p.set_defaults(fn=report)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    main()
