"""Measurements of issue 19 (point 5): peak memory of converting a big checkpoint folder.

    python benchmarks/measure_convert.py write /tmp/odeify-llama-1.5b      # ~3.1 GB of bf16
    python benchmarks/measure_convert.py run /tmp/odeify-llama-1.5b --json out.json
    python benchmarks/measure_convert.py run /tmp/odeify-llama-1.5b --paths streaming-chebyshev
    rm -r /tmp/odeify-llama-1.5b                                            # afterwards

``write`` saves a synthetic Llama of 1.54 B parameters (32 layers of 2048 x 5632, grouped-query
attention, 32000 tokens, untied head) with random weights as bf16 safetensors, in 8 shards of 4
layers, one tensor generated at a time (bf16 halves the disk and the time; every path below
converts it in that dtype). ``run`` converts it in a fresh process per path, so each peak RSS
(``ru_maxrss``) is that path's own, interpreter and imports included:

- ``streaming``: ``odeify(folder)``, the hat basis (a copy per layer);
- ``streaming-chebyshev``: ``odeify(folder, basis="chebyshev")`` (the least-squares solve in
  blocks of rows);
- ``in-memory``: ``odeify(AutoModelForCausalLM.from_pretrained(folder))``, the path before.

Each reports its peak against the checkpoint's size (the stock model in its dtype; the odeified
model at K = L is the same size) and the import baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAMA_1P5B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
PATHS = ("streaming", "streaming-chebyshev", "in-memory")


def write_checkpoint(folder: Path, layers_per_shard: int = 4) -> int:
    """A random-weight Llama as sharded bf16 safetensors; returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_1P5B, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).named_parameters()}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)

    def shard_of(name: str) -> int:
        parts = name.split(".")
        return int(parts[2]) // layers_per_shard if parts[1] == "layers" else -1

    shards = sorted({shard_of(n) for n in shapes})
    files = {s: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards)}
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for s in shards:
        tensors = {}
        for name, shape in shapes.items():
            if shard_of(name) != s:
                continue
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).bfloat16()
            weight_map[name] = files[s]
            total += tensors[name].numel() * 2
        save_file(tensors, folder / files[s], metadata={"format": "pt"})
        print(f"wrote {files[s]} ({sum(t.numel() for t in tensors.values()) / 1e6:.0f} M)")
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return sum(torch.Size(s).numel() for s in shapes.values())


def _child(path: str, folder: str) -> None:
    """One conversion in this process; prints one JSON line of its measurements."""
    import torch  # noqa: F401  (imports are part of the baseline, measured before converting)
    from transformers import AutoModelForCausalLM

    from odeify import odeify

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if path == "streaming":
        model = odeify(folder, progress=False)
    elif path == "streaming-chebyshev":
        model = odeify(folder, basis="chebyshev", progress=False)
    else:
        model = odeify(AutoModelForCausalLM.from_pretrained(folder), progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    print(
        json.dumps(
            {
                "path": path,
                "peak_rss": peak,
                "baseline_rss": baseline,
                "model_bytes": sum(held.values()),
                "dtype": str(model.dtype),
                "seconds": round(seconds, 1),
            }
        )
    )


def run(folder: Path, paths: list[str]) -> list[dict]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    checkpoint = index["metadata"]["total_size"]
    results = []
    for path in paths:
        out = subprocess.run(
            [sys.executable, __file__, "child", path, str(folder)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["checkpoint_bytes"] = checkpoint
        result["peak_over_checkpoint"] = round(result["peak_rss"] / checkpoint, 3)
        results.append(result)
        gb = lambda b: f"{b / 1e9:.2f} GB"
        print(
            f"{path:>20}: peak RSS {gb(result['peak_rss'])} = "
            f"{result['peak_over_checkpoint']:.2f}x the checkpoint ({gb(checkpoint)}); "
            f"imports {gb(result['baseline_rss'])}; model {gb(result['model_bytes'])} "
            f"{result['dtype']}; {result['seconds']} s"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the synthetic checkpoint")
    w.add_argument("folder", type=Path)
    r = sub.add_parser("run", help="measure each conversion path in its own process")
    r.add_argument("folder", type=Path)
    r.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    r.add_argument("--json", type=Path, default=None)
    c = sub.add_parser("child")
    c.add_argument("path", choices=PATHS)
    c.add_argument("folder")
    args = parser.parse_args()
    if args.command == "write":
        print(f"{write_checkpoint(args.folder) / 1e9:.3f} B parameters in {args.folder}")
    elif args.command == "run":
        results = run(args.folder, args.paths)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    else:
        _child(args.path, args.folder)


if __name__ == "__main__":
    main()
