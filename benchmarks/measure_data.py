"""Measurements of issue 16: streamed, parallel token shards against the in-memory path.

    python benchmarks/measure_data.py corpus /tmp/odeify-data --sizes 0.1 0.5 2   # write text
    python benchmarks/measure_data.py run /tmp/odeify-data --sizes 0.1 0.5 2 --json out.json
    python benchmarks/measure_data.py watch PID SHARD_FOLDER 10   # RSS during one preparation
    python benchmarks/measure_data.py throughput /tmp/odeify-data --sizes 0.03 --json t.json
    python benchmarks/measure_data.py step train SHARD_FOLDER SCRATCH --batches 40  # RSS in training
    rm -r /tmp/odeify-data                                                        # afterwards

``corpus`` writes, for each size in GB, a folder of the bundled plays with their lines shuffled
per copy (one file per copy). ``run`` measures each step in a fresh process, so every peak RSS
is that step's own: today's ``tokenize(corpus(...))`` at the smallest size, the tokenizer's own
batch call (one process, text already in memory), :func:`odeify.train.shards.prepare` with 1
and 2 workers at the smallest size and with 2 at every size, and the loader (``Batches`` over
today's memmap and over the shards) for a few hundred batches.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_corpus(root: Path, sizes: list[float]) -> None:
    from odeify.assets import play_text, plays

    lines = [play_text(name).splitlines() for name in plays()]
    rng = random.Random(0)
    for size in sizes:
        folder, written, copy = root / f"{size}GB", 0, 0
        folder.mkdir(parents=True, exist_ok=True)
        while written < size * 1e9:
            play = list(lines[copy % len(lines)])
            rng.shuffle(play)
            text = "\n".join(play) + "\n"
            (folder / f"{copy // 1000:03d}").mkdir(exist_ok=True)
            (folder / f"{copy // 1000:03d}" / f"copy{copy:06d}.txt").write_text(text)
            written += len(text.encode())
            copy += 1
        print(f"{folder}: {copy} files, {written / 1e9:.2f} GB")


def _cpu_seconds(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _peaks() -> dict[str, float]:
    mib = lambda who: resource.getrusage(who).ru_maxrss / 1024
    return {
        "peak_rss_mib": mib(resource.RUSAGE_SELF),
        "workers_rss_mib": mib(resource.RUSAGE_CHILDREN),
    }


def step(kind: str, folder: str, scratch: str, workers: int, batches: int) -> dict:
    """One measurement, in this (fresh) process."""
    import numpy as np
    import torch

    from odeify.assets import gpt2_tokenizer
    from odeify.train import data, shards

    tokenizer = gpt2_tokenizer()
    began, cpu = time.perf_counter(), time.process_time()
    if kind == "today":
        tokens = data.tokenize(data.corpus(folder), tokenizer, cache=Path(scratch))
        result = {"tokens": len(tokens)}
    elif kind == "backend":
        backend, batches_of_text, batch = shards._Encoder(tokenizer).backend, [], []
        for _, text in data.Documents(folder):
            batch.append(text)
            if sum(map(len, batch)) >= shards.BATCH_CHARS:
                batches_of_text, batch = [*batches_of_text, batch], []
        batches_of_text.append(batch)
        began, cpu = time.perf_counter(), time.process_time()
        encoded = (backend.encode_batch(b, add_special_tokens=False) for b in batches_of_text)
        result = {"tokens": sum(len(e.ids) for b in encoded for e in b)}
    elif kind == "prepare":
        prepared = shards.prepare(folder, tokenizer, scratch, workers=workers, progress=False)
        result = {"tokens": len(prepared), "shards": len(prepared.files)}
    elif kind == "train":
        # A small DiffEqFormer's training steps fed by the shard loader. One step on random
        # tokens first: the peak RSS after it is the model, optimizer and activations; what the
        # loader-fed steps add on top is the data path's share (the memory map's touched pages).
        from transformers import GPT2Config, GPT2LMHeadModel

        from odeify import odeify

        torch.manual_seed(0)
        config = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=len(tokenizer))
        model = odeify(GPT2LMHeadModel(config), basis="fourier", init="random", progress=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = data.Batches(shards.Shards(folder, tokenizer), batch_size=4, seq_len=128, seed=0)

        def train_step(x, y) -> float:
            loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        tokens = torch.randint(0, len(tokenizer), (loader.batch_size, loader.seq_len + 1))
        train_step(tokens[:, :-1], tokens[:, 1:])
        before = _peaks()["peak_rss_mib"]
        began, cpu = time.perf_counter(), time.process_time()
        for i in range(batches):
            loss = train_step(*loader.get(i))
        # tokens: those trained on (for the rates); corpus_tokens: the shards' size.
        trained = batches * loader.batch_size * loader.seq_len
        result = {"tokens": trained, "corpus_tokens": len(loader.tokens), "loss": loss}
        result["peak_rss_before_loader_mib"] = before
    else:  # loaders: today's memmap (a file) or a shard folder
        if Path(folder).is_file():
            tokens = np.memmap(folder, dtype=np.uint16, mode="r")
        else:
            tokens = shards.Shards(folder, tokenizer)
        loader = data.Batches(tokens, batch_size=16, seq_len=1024, seed=0)
        began, cpu = time.perf_counter(), time.process_time()
        for i in range(batches):
            loader.get(i)
        result = {
            "tokens": len(tokens),
            "ms_per_batch": 1e3 * (time.perf_counter() - began) / batches,
        }
    seconds = time.perf_counter() - began
    # CPU seconds (this process, and the pool's workers once reaped) do not depend on how many
    # other jobs share the cores, as wall-clock seconds do.
    cpu = {
        "cpu_s": time.process_time() - cpu,
        "workers_cpu_s": _cpu_seconds(resource.RUSAGE_CHILDREN),
    }
    rates = {"tokens_per_s": result["tokens"] / seconds}
    rates["tokens_per_cpu_s"] = result["tokens"] / (cpu["cpu_s"] + cpu["workers_cpu_s"])
    return {**result, "seconds": seconds, **rates, **cpu, **_peaks()}


def _child(kind: str, folder, scratch, workers: int = 1, batches: int = 300) -> dict:
    args = [sys.executable, __file__, "step", kind, str(folder), str(scratch)]
    args += ["--workers", str(workers), "--batches", str(batches)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"{kind:>8} {Path(folder).name:>8} workers={workers}: {json.dumps(result)}", flush=True)
    return {"kind": kind, "corpus": str(folder), "workers": workers, **result}


def throughput(root: Path, size: float) -> list[dict]:
    """The tokenizer's own batch call, and prepare with 1 and 2 workers, on one corpus."""
    scratch = Path(tempfile.mkdtemp(prefix="odeify-shards-"))
    try:
        results = [_child("backend", root / f"{size}GB", scratch)]
        for workers in (1, 2):
            folder = root / f"{size}GB"
            results.append(_child("prepare", folder, scratch / f"w{workers}", workers=workers))
    finally:
        shutil.rmtree(scratch)
    return results


def run(root: Path, sizes: list[float]) -> list[dict]:
    results, scratch = [], Path(tempfile.mkdtemp(prefix="odeify-shards-"))
    smallest = root / f"{min(sizes)}GB"
    try:
        results.append(_child("today", smallest, scratch / "today"))
        (memmap,) = (scratch / "today").iterdir()
        results.append(_child("backend", smallest, scratch))
        results.append(_child("prepare", smallest, scratch / "w1", workers=1))
        for size in sizes:
            results.append(_child("prepare", root / f"{size}GB", scratch / f"{size}", workers=2))
        results.append(_child("loader", memmap, scratch))
        for size in sizes:
            results.append(_child("loader", scratch / f"{size}", scratch))
    finally:
        shutil.rmtree(scratch)
    return results


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def watch(pid: int, folder: Path, every: float) -> None:
    """Sample a running preparation (process ``pid`` and its workers) until it ends: resident
    memory of each against the tokens written so far (listed shards plus the open one)."""
    peak = {"main": 0.0, "workers": 0.0}
    while Path(f"/proc/{pid}").exists():
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            main, workers = _rss_mib(pid), [_rss_mib(int(c)) for c in children]
        except (FileNotFoundError, ProcessLookupError):
            break
        written = sum(p.stat().st_size for p in folder.glob("shard-*")) // 2
        peak = {"main": max(peak["main"], main), "workers": max([peak["workers"], *workers])}
        sample = {"time": time.time(), "tokens": written, "main_rss_mib": main}
        print(json.dumps({**sample, "workers_rss_mib": workers, "peak": peak}), flush=True)
        time.sleep(every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["corpus", "run", "step", "watch", "throughput"])
    parser.add_argument("args", nargs="+")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.5, 2.0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.what == "corpus":
        write_corpus(Path(args.args[0]), args.sizes)
    elif args.what == "step":
        kind, folder, scratch = args.args
        print(json.dumps(step(kind, folder, scratch, args.workers, args.batches)))
    elif args.what == "watch":
        watch(int(args.args[0]), Path(args.args[1]), float(args.args[2]))
    else:
        measure = run if args.what == "run" else lambda root, sizes: throughput(root, sizes[0])
        results = measure(Path(args.args[0]), args.sizes)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
