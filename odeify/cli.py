"""The ``odeify`` command: convert, eval, generate, demo.

    odeify convert smollm2 out/smollm2-ode            # or a transformers folder, or a .gguf file
    odeify eval out/smollm2-ode --steps 15,30,60 --plot out/ppl.png
    odeify generate out/smollm2-ode --prompt "To be, or not" --steps 30
    odeify demo                                       # the main job on the bundled defaults
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _steps_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--steps needs integers >= 1, got {text!r}")
    return values


def _convert_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--basis", default="hat", help="hat | chebyshev | legendre | fourier (default: hat)")
    parser.add_argument("--num-basis", type=int, default=None, help="K basis tensors (default: L, exact)")
    parser.add_argument("--scheme", default="sequential", help="default scheme saved with the model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _report_fit(block) -> None:
    residuals = block.fit_residuals
    worst = sorted(residuals.items(), key=lambda kv: -kv[1])[:5]
    print(f"fit: {len(residuals)} parameters, K = {block.ode.num_basis}, L = {block.ode.num_layers}")
    print(f"     max relative residual {max(residuals.values()):.3e}; worst: " + ", ".join(f"{n} {r:.2e}" for n, r in worst))


def cmd_convert(args) -> int:
    from . import get_block, odeify, save_pretrained
    from .loading import load_model

    model, tokenizer, ode = load_model(args.source, args.dtype)
    if ode:
        raise SystemExit(f"{args.source} is already odeified")
    start = time.perf_counter()
    odeify(model, basis=args.basis, num_basis=args.num_basis, scheme=args.scheme)
    print(f"converted in {time.perf_counter() - start:.1f} s")
    _report_fit(get_block(model))
    save_pretrained(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"saved to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from . import get_block, odeify
    from .data import corpus, tokenize, windows
    from .evaluate import perplexity, plot_sweep, sweep
    from .loading import load_model

    model, tokenizer, ode = load_model(args.model, args.dtype, args.tokenizer)
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer; pass --tokenizer (a folder, or 'gpt2')")
    ids = windows(tokenize(corpus(args.corpus), tokenizer), args.seq_len, args.max_windows)
    reference = {}
    if not ode:
        reference["original"] = perplexity(model, ids, batch_size=args.batch_size, desc="original")
        odeify(model)
    block = get_block(model)
    scheme = args.scheme or block.ode.scheme
    L = block.ode.num_layers
    results = sweep(model, ids, args.steps or [max(1, L // 2), L, 2 * L], scheme=scheme, batch_size=args.batch_size)
    print(f"\n{args.model}: {ids.numel()} tokens of {args.corpus}, scheme {scheme}, L = {L}")
    print(f"{'steps':>6} {'perplexity':>12}")
    for n, ppl in results.items():
        print(f"{n:>6} {ppl:>12.4f}")
    for label, value in reference.items():
        print(f"{label:>6} {value:>12.4f}")
    if args.plot:
        plot_sweep({f"{scheme}, {block.ode.basis} basis": results}, args.plot, f"{Path(args.model).name} on {args.corpus}", reference)
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": results, "reference": reference}, indent=2))
    return 0


def cmd_generate(args) -> int:
    from . import get_block, odeify
    from .loading import load_model

    model, tokenizer, ode = load_model(args.model, args.dtype, args.tokenizer)
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer; pass --tokenizer (a folder, or 'gpt2')")
    if not ode:
        odeify(model)
    block = get_block(model)
    n = args.steps or block.ode.resolved_steps
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    start = time.perf_counter()
    with odeify.steps(model, n, args.scheme):
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id, **sampling)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    new = out.shape[1] - ids.shape[1]
    print(f"\n[{new} tokens at {n} steps of {args.scheme or block.ode.scheme}: {new / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), play=args.play, tokens=args.tokens, step_counts=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odeify", description="Continuous-depth (neural-ODE) transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="odeify a model and save it")
    p.add_argument("source", help="'smollm2' (bundled), a transformers folder, or a .gguf file")
    p.add_argument("out", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _convert_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("eval", help="perplexity at several step counts, with a plot")
    p.add_argument("model", help="an odeified folder, or any source 'convert' takes (odeified in memory)")
    p.add_argument("--steps", type=_steps_list, default=None, help="comma-separated step counts (default: L/2,L,2L)")
    p.add_argument("--scheme", default=None, help="integration scheme (default: the model's)")
    p.add_argument("--corpus", default="shakespeare:hamlet", help="'shakespeare[:plays]', a file or a folder")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=4, help="windows evaluated (default 4)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, or 'gpt2' (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--plot", default=None, help="write a PNG of perplexity against steps")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text with the ODE model (KV-cached)")
    p.add_argument("model", help="an odeified folder, or any source 'convert' takes")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the model's)")
    p.add_argument("--scheme", default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the main job: SmolLM2 on Shakespeare, fidelity and retargeting")
    p.add_argument("--out", default="out/demo", help="folder for results.json, the plot and the report")
    p.add_argument("--play", default="hamlet")
    p.add_argument("--tokens", type=int, default=2048, help="evaluation tokens (windows of 512)")
    p.add_argument("--steps", type=_steps_list, default=[10, 15, 20, 24, 30, 36, 45, 60])
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
