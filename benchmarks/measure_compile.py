"""Measurements of issue 19 (point 7): compiling an odeified model that serves many step counts.

    python benchmarks/measure_compile.py --json out/compile.json
    python benchmarks/measure_compile.py --layers 4 --steps 1 2 3 --tokens 32   # a quick look
    python benchmarks/measure_compile.py --device cuda --dtype bfloat16 --layers 30 --tokens 512

A synthetic Llama with SmolLM2-135M's widths (576 wide, 1536 MLP, 9 heads, 3 KV heads) and
``--layers`` layers, random weights, odeified; one batch of ``--tokens`` tokens, no KV cache. For
each way of running it (each in a fresh process, so one's compiled code cannot serve another):

- ``eager``: no compilation;
- ``torch.compile``: ``torch.compile(model)`` (inductor), the loop traced unrolled;
- ``odeify.compile``: ``odeify.compile(model)`` (inductor), one compiled solver step.

it runs the step counts ``--steps`` in turn and reports, per step count, the wall time of the
first call (tracing and compiling included) and the median of ``--repeats`` further calls, and
in all the graphs dynamo compiled (a counting wrapper around inductor) and whether dynamo gave
up on the frame (its "recompile_limit" warning: later step counts then run eagerly).
``--backend`` replaces inductor (``aot_eager`` for a quick check of the script itself).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("eager", "torch.compile", "odeify.compile")


class _LimitWatch(logging.Handler):
    def __init__(self):
        super().__init__()
        self.hit = False

    def emit(self, record):
        self.hit |= "recompile_limit" in record.getMessage()


def _one(mode: str, args: argparse.Namespace) -> dict:
    import torch
    from torch._dynamo.backends.registry import lookup_backend
    from transformers import LlamaConfig, LlamaForCausalLM

    import odeify

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=max(256, args.tokens),
    )
    dtype = getattr(torch, args.dtype)
    model = odeify.odeify(LlamaForCausalLM(config), progress=False).eval()
    model = model.to(args.device, dtype)
    graphs = 0
    backend = lookup_backend(args.backend)

    def counting(graph, example_inputs):
        nonlocal graphs
        graphs += 1
        return backend(graph, example_inputs)

    def timed(n: int) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        call(ids, use_cache=False, ode_steps=n)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    watch = _LimitWatch()
    logging.getLogger("torch._dynamo").addHandler(watch)
    call = model
    if mode == "torch.compile":
        call = torch.compile(model, backend=counting)
    elif mode == "odeify.compile":
        odeify.compile(model, backend=counting)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), device=args.device)
    rows = []
    with torch.no_grad():
        for n in args.steps:
            first = timed(n)
            times = [timed(n) for _ in range(args.repeats)]
            rows.append(
                dict(steps=n, first_s=first, median_s=statistics.median(times), graphs=graphs)
            )
            print(
                f"{mode:15s} N={n:3d} first {first:7.2f} s  median {rows[-1]['median_s']:.4f} s "
                f"graphs {graphs}",
                file=sys.stderr,
                flush=True,
            )
    return dict(mode=mode, rows=rows, graphs=graphs, recompile_limit_hit=watch.hit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=list(range(1, 11)))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = _one(args.child, args)
        print(json.dumps(result))
        return
    results = []
    for mode in args.modes:
        command = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--layers",
            str(args.layers),
            "--tokens",
            str(args.tokens),
            "--repeats",
            str(args.repeats),
            "--steps",
            *map(str, args.steps),
        ]
        out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    eager = (
        {r["steps"]: r["median_s"] for r in results[0]["rows"]} if args.modes[0] == "eager" else {}
    )
    print(
        f"{'mode':15s} {'graphs':>6s} {'limit hit':>9s} {'compile s (sum of first - median)':>34s}"
    )
    for r in results:
        extra = sum(row["first_s"] - row["median_s"] for row in r["rows"])
        print(f"{r['mode']:15s} {r['graphs']:6d} {str(r['recompile_limit_hit']):>9s} {extra:34.1f}")
    print("median forward, s (speed-up over eager):")
    for r in results:
        cells = [
            f"N={row['steps']}: {row['median_s']:.4f}"
            + (f" ({eager[row['steps']] / row['median_s']:.2f}x)" if eager else "")
            for row in r["rows"]
        ]
        print(f"  {r['mode']:15s} " + ", ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)


if __name__ == "__main__":
    main()
