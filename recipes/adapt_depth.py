"""Depth adaptation: make a converted pretrained model retargetable by continuous-depth
distillation from its frozen original (issue 6), and the layer-dropping baseline beside it.

    python recipes/adapt_depth.py --config recipes/configs/adapt-smollm2.yaml
    python recipes/adapt_depth.py --config recipes/configs/adapt-smollm2-drop15.yaml   # baseline (a)
    python recipes/adapt_depth.py --config ... --set max_steps=20 --set out_dir=runs/try
    python recipes/adapt_depth.py --config ... --resume        # continue the run in out_dir
    python recipes/adapt_depth.py --compare runs/adapt runs/drop15 --names C "(a)" --out benchmarks/figures/adapt

Features:
- Model: ``smollm2`` (the bundled SmolLM2-135M-Instruct) or a folder with a stock transformers
  GPT-2 / Llama-family model (its tokenizer, or ``tokenizer: gpt2`` / a folder). The original is
  the teacher: a frozen, exactly odeified copy run at N = L.
- ``mode: ode`` trains the weight functions of the odeified model (``train: full``: every
  basis tensor; ``train: lora``: continuous LoRA on them, ``lora_r``, ``lora_alpha``,
  ``lora_targets``, merged at the end; the embeddings, final norm and head stay the
  original's) at step counts from a sampler:
  N = L every ``full_every`` steps (the anchor that keeps full depth close to the original,
  weighted ``full_weight``) plus ``draws`` counts from [``low``, ``high``] (default L/3 to 2L)
  or from the list ``choices`` (e.g. the step counts a deployment will use),
  drawn with probability proportional to 1/N (``weighting: inverse``, equal compute per N) or
  uniformly, a pure function of (seed, step). ``basis`` / ``num_basis`` refit the weight
  functions before training (default: the exact hat basis, K = L). ``discrete_ends: d`` keeps
  the first and last d layers discrete: at every step count they are those layers, and the
  other steps share the middle of the depth (``odeify.ODEConfig.discrete_ends``).
- ``mode: drop`` is baseline (a): the original with ``keep_layers`` = M layers kept (layer
  floor(i L / M), output projections scaled by L / M, as ``materialize`` does), trained at its
  M layers with the same loss, data and budget.
- Loss: ``kl`` * KL(original || student) on the logits (``temperature``), ``lm`` * next-token
  cross-entropy, ``hidden`` * the mean squared difference of RMS-normalised hidden states where
  the student's grid meets the original's layers (t = j / N = l / L).
- Budget: ``max_steps``, or ``budget_flops`` (matrix-multiply FLOPs of the teacher's forwards
  and the student's forwards and backwards, :class:`odeify.adapt.CostModel`): the run takes
  the steps that fit in it, so runs of different modes get the same compute.
- Data: a corpus spec (``shakespeare``, a text file or folder), the ``heldout`` documents
  (plays) removed from training and used for every evaluation; batches are a pure function of
  (seed, step). ``autocast: bf16`` trains in bfloat16 autocast (fp32 master weights);
  evaluation is always fp32.
- Evaluation: perplexity and KL from the original at ``eval_steps`` before and after training,
  and the original's perplexity, all in one pass per batch; every ``eval_every`` steps the
  perplexity at ``curve_steps`` on ``curve_windows`` windows (the curve against tokens seen);
  after training a check that ``materialize(model, steps=M)`` equals the ODE model at M.
- Outputs in ``out_dir``: ``metrics.jsonl`` (per step: each step count's loss parts, lr, tokens,
  FLOPs, seconds), ``results.json``, ``report.md`` (the table), plots of perplexity against
  steps (``perplexity.png``, before and after; ``perplexity_after.png``, after only on an axis
  cut to the targets' range) and against inference FLOPs per token (``perplexity_flops.png``),
  ``model/`` (``odeify.save_pretrained``; LoRA merged into the weight functions), ``adapter/``
  (``train: lora``: the peft adapter), and checkpoints (atomic, keep-last-N, trainable tensors
  only) that ``--resume`` continues exactly. ``--compare`` puts finished runs (adaptation,
  baselines) in one table and the same plots, plus ``perplexity_budget.png`` (the curves
  against training FLOPs); ``--names`` gives the runs short names for the legends.
- Errors before any work: unknown config keys, bad option values, held-out documents that are
  not in the corpus, a run folder from another config (or a run there and no ``--resume``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

import odeify as ode_lib
from odeify import data
from odeify.adapt import (
    WEIGHTINGS,
    CostModel,
    LossWeights,
    StepSampler,
    adapt_step,
    drop_layers,
    evaluate_depths,
    frozen_teacher,
    steps_for_budget,
    teacher_targets,
)
from odeify.bases import BASES
from odeify.evaluate import plot_sweep
from odeify.lora import lora_config
from odeify.training import (
    Checkpoints,
    Metrics,
    adamw,
    config_stamp,
    load_config,
    seed_everything,
    warmup_cosine,
)

MODES = ("ode", "drop")
TRAIN = ("full", "lora")
AUTOCAST = {"none": None, "bf16": torch.bfloat16}
# Keys that change what a run prints or how fast, not what it computes: a resume may change them.
_PRESENTATION = ("progress", "threads")


@dataclass
class Config:
    """Every option of the recipe; YAML files and ``--set key=value`` fill it."""

    # model
    model: str = "smollm2"  # 'smollm2' or a folder with a stock transformers model
    tokenizer: str | None = None  # None: the model's own; 'gpt2' or a folder
    mode: str = "ode"  # 'ode' (depth adaptation) or 'drop' (baseline (a))
    keep_layers: int | None = None  # M of mode 'drop'
    basis: str = "hat"  # mode 'ode': refit the weight functions to this basis first
    num_basis: int | None = None  # None: L (exact with the hat basis)
    discrete_ends: int = 0  # mode 'ode': layers kept discrete at each end of the depth
    train: str = "full"  # 'full' (every basis tensor) or 'lora' (continuous LoRA on them)
    lora_r: int = 16
    lora_alpha: float | None = None  # None: 2 r
    lora_targets: list[str] | str = "all-linear"
    # step-count sampler (mode 'ode')
    low: int | None = None  # None: L // 3
    high: int | None = None  # None: 2 L
    choices: list[int] | None = None  # draw from these counts instead of [low, high]
    draws: int = 1
    weighting: str = "inverse"  # 'inverse' (P(N) ~ 1/N) or 'uniform'
    full_every: int = 1  # N = L joins every full_every-th step; 0: never
    full_weight: float = 1.0
    # loss
    kl: float = 1.0
    lm: float = 0.0
    hidden: float = 0.0
    temperature: float = 1.0
    # data
    corpus: str = "shakespeare"
    heldout: list[str] = field(default_factory=lambda: ["hamlet", "macbeth", "the-tempest"])
    token_cache: str | None = None  # None: ~/.cache/odeify/tokens
    seq_len: int = 256
    batch_size: int = 4
    # optimisation: exactly one of max_steps and budget_flops
    max_steps: int | None = None
    budget_flops: float | None = None
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    autocast: str = "none"  # 'none' or 'bf16'
    seed: int = 0
    threads: int | None = None
    # evaluation, checkpoints, output
    eval_steps: list[int] | None = None  # None: L/3, L/2, 2L/3, L, 3L/2, 2L (mode drop: M)
    eval_windows: int = 32
    eval_batch_size: int = 4
    eval_every: int = 0  # 0: no curve during training
    curve_steps: list[int] | None = None  # None: L/2, 2L/3, L, 2L (mode drop: M)
    curve_windows: int = 8
    save_every: int = 25
    keep: int = 2
    save_model: bool = True
    out_dir: str = "runs/adapt"
    progress: bool = True


# ------------------------------------------------------------------------------------ config
def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set`` pairs as {key: value}, each value read as YAML.

    Example:
        >>> parse_overrides(["lr=0.001", "eval_steps=[15, 30]"])
        {'lr': 0.001, 'eval_steps': [15, 30]}
    """
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate(cfg: Config) -> None:
    """Every check that needs no model and no data, so a bad config fails at once."""
    problems = []
    budget = cfg.budget_flops
    if budget is not None and not isinstance(budget, float):
        # YAML 1.1 reads 1.5e15 (no sign in the exponent) as a string, 300000 as an int.
        try:
            cfg.budget_flops = float(budget) if not isinstance(budget, bool) else None
        except (TypeError, ValueError):
            cfg.budget_flops = None
        if cfg.budget_flops is None:
            problems.append(f"budget_flops takes a number, got {budget!r}")
            cfg.budget_flops = budget
    if cfg.mode not in MODES:
        problems.append(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.mode == "drop" and not _is_count(cfg.keep_layers):
        problems.append(f"mode: drop needs keep_layers = M >= 1, got {cfg.keep_layers!r}")
    if cfg.mode == "ode" and cfg.keep_layers is not None:
        problems.append("keep_layers is the depth of baseline (a); set mode: drop")
    if cfg.train not in TRAIN:
        problems.append(f"train must be one of {TRAIN}, got {cfg.train!r}")
    if cfg.train == "lora" and not _is_count(cfg.lora_r):
        problems.append(f"lora_r must be an integer >= 1, got {cfg.lora_r!r}")
    if isinstance(cfg.discrete_ends, bool) or not isinstance(cfg.discrete_ends, int):
        problems.append(f"discrete_ends must be an integer >= 0, got {cfg.discrete_ends!r}")
    elif cfg.discrete_ends < 0:
        problems.append(f"discrete_ends must be >= 0, got {cfg.discrete_ends}")
    elif cfg.discrete_ends and cfg.mode == "drop":
        problems.append("discrete_ends belongs to depth adaptation (mode: ode), not baseline (a)")
    if cfg.basis not in BASES:
        problems.append(f"basis must be one of {BASES}, got {cfg.basis!r}")
    if (cfg.max_steps is None) == (cfg.budget_flops is None):
        problems.append("set exactly one of max_steps and budget_flops")
    if cfg.max_steps is not None and not _is_count(cfg.max_steps):
        problems.append(f"max_steps must be an integer >= 1, got {cfg.max_steps!r}")
    if isinstance(cfg.budget_flops, float) and not cfg.budget_flops > 0:
        problems.append(f"budget_flops must be > 0, got {cfg.budget_flops!r}")
    for name in ("low", "high", "num_basis"):
        value = getattr(cfg, name)
        if value is not None and not _is_count(value):
            problems.append(f"{name} must be an integer >= 1 or null, got {value!r}")
    if cfg.choices is not None:
        if not isinstance(cfg.choices, list) or not cfg.choices:
            problems.append(f"choices must be a list of step counts or null, got {cfg.choices!r}")
        elif not all(map(_is_count, cfg.choices)):
            problems.append(f"choices must be integers >= 1, got {cfg.choices!r}")
        if cfg.low is not None or cfg.high is not None:
            problems.append("set either low and high (a range) or choices (a list), not both")
    if _is_count(cfg.low) and _is_count(cfg.high) and cfg.low > cfg.high:
        problems.append(f"the step range is empty: low = {cfg.low} > high = {cfg.high}")
    for name in ("eval_steps", "curve_steps"):
        values = getattr(cfg, name)
        if values is not None and (
            not isinstance(values, list) or not values or not all(map(_is_count, values))
        ):
            problems.append(f"{name} must be a list of integers >= 1 or null, got {values!r}")
    for name in ("seq_len", "batch_size", "eval_windows", "eval_batch_size", "save_every"):
        if not _is_count(getattr(cfg, name)):
            problems.append(f"{name} must be an integer >= 1, got {getattr(cfg, name)!r}")
    for name in ("keep", "curve_windows"):
        if not _is_count(getattr(cfg, name)):
            problems.append(f"{name} must be an integer >= 1, got {getattr(cfg, name)!r}")
    if cfg.eval_every < 0 or cfg.warmup_steps < 0 or cfg.full_every < 0 or cfg.draws < 0:
        problems.append("eval_every, warmup_steps, full_every and draws must be >= 0")
    if cfg.weighting not in WEIGHTINGS:
        problems.append(f"weighting must be one of {WEIGHTINGS}, got {cfg.weighting!r}")
    if cfg.autocast not in AUTOCAST:
        problems.append(f"autocast must be one of {sorted(AUTOCAST)}, got {cfg.autocast!r}")
    if not cfg.heldout:
        problems.append("heldout must name the evaluation documents (e.g. plays)")
    try:
        LossWeights(cfg.kl, cfg.lm, cfg.hidden, cfg.temperature)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------- model
def load_original(cfg: Config) -> tuple[nn.Module, Any]:
    """The original (stock) model named by ``cfg.model`` and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = None
    if cfg.model == "smollm2":
        from odeify.assets import load_smollm2

        model, tokenizer = load_smollm2()
    else:
        folder = Path(cfg.model)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"model {cfg.model!r} is neither 'smollm2' nor a folder with a config.json"
            )
        if "odeify" in json.loads((folder / "config.json").read_text()):
            raise ValueError(
                f"{folder} holds an odeified model; depth adaptation distils from the original, "
                "so give the stock model it was converted from (or odeify.materialize(model, L) "
                "saved with save_pretrained)"
            )
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if (folder / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(folder)
    if cfg.tokenizer == "gpt2":
        from odeify.assets import gpt2_tokenizer

        tokenizer = gpt2_tokenizer()
    elif cfg.tokenizer is not None:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer; set tokenizer: gpt2 or a folder")
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
            f"{model.config.vocab_size}: they do not belong together"
        )
    return model.eval(), tokenizer


def build(cfg: Config, original: nn.Module) -> tuple[nn.Module, nn.Module, StepSampler]:
    """(student, teacher, sampler). Consumes ``original``; only the student's weight functions
    (basis tensors) are trainable, or with ``train: lora`` only the LoRA factors on them."""
    teacher = frozen_teacher(original)
    num_layers = ode_lib.get_block(teacher).ode.num_layers
    if cfg.mode == "drop":
        if cfg.keep_layers > num_layers:
            raise ValueError(f"keep_layers = {cfg.keep_layers} exceeds the depth L = {num_layers}")
        student = ode_lib.odeify(drop_layers(original, cfg.keep_layers), progress=False)
        sampler = StepSampler(
            cfg.keep_layers, cfg.keep_layers, cfg.keep_layers, draws=1, full_every=0, seed=cfg.seed
        )
    else:
        student = ode_lib.odeify(
            original,
            basis=cfg.basis,
            num_basis=cfg.num_basis,
            discrete_ends=cfg.discrete_ends,
            progress=False,
        )
        choices = tuple(cfg.choices or ())
        sampler = StepSampler(
            num_layers,
            min(choices) if choices else cfg.low or max(1, num_layers // 3),
            max(choices) if choices else cfg.high or 2 * num_layers,
            draws=cfg.draws,
            weighting=cfg.weighting,
            full_every=cfg.full_every,
            seed=cfg.seed,
            choices=choices,
        )
        if sampler.low <= 2 * cfg.discrete_ends:
            raise ValueError(
                f"discrete_ends = {cfg.discrete_ends} needs every step count above "
                f"{2 * cfg.discrete_ends}, but the sampler can draw {sampler.low}; raise low"
            )
    block = ode_lib.get_block(student)
    trainable = {id(block.basis_tensor(name)) for name in block.names}
    for p in student.parameters():
        p.requires_grad_(cfg.train == "full" and id(p) in trainable)
    if cfg.train == "lora":
        from peft import get_peft_model

        config = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, model=student)
        student = get_peft_model(student, config)
    return student.train(), teacher, sampler


def default_counts(cfg: Config, num_layers: int, curve: bool) -> list[int]:
    """The step counts evaluated at the end (``curve=False``) or during training."""
    given = cfg.curve_steps if curve else cfg.eval_steps
    if given:
        return sorted(set(given))
    if cfg.mode == "drop":
        return [cfg.keep_layers]
    fractions = (1 / 2, 2 / 3, 1, 2) if curve else (1 / 3, 1 / 2, 2 / 3, 1, 3 / 2, 2)
    return sorted({max(1, round(num_layers * f)) for f in fractions})


# -------------------------------------------------------------------------------------- data
def split(cfg: Config) -> tuple[dict[str, str], dict[str, str]]:
    """(train, held-out) documents: the held-out ones (by name, or by file name without its
    suffix for folder corpora) are never trained on."""
    docs = data.corpus(cfg.corpus)
    by_name = {**{Path(n).with_suffix("").as_posix(): n for n in docs}, **{n: n for n in docs}}
    missing = sorted(set(cfg.heldout) - set(by_name))
    if missing:
        listed = ", ".join(sorted(docs)[:12]) + (", ..." if len(docs) > 12 else "")
        raise ValueError(
            f"held-out documents {missing} are not in corpus {cfg.corpus!r} (it has "
            f"{len(docs)} documents: {listed})"
        )
    heldout = {by_name[n]: docs[by_name[n]] for n in cfg.heldout}
    train = {name: text for name, text in docs.items() if name not in heldout}
    if not train:
        raise ValueError("every document is held out; leave some for training")
    return train, heldout


def heldout_windows(cfg: Config, docs: dict[str, str], tokenizer, cache) -> torch.Tensor:
    """``eval_windows`` windows of ``seq_len`` tokens, an equal share from each held-out
    document, spread evenly over it (not only its opening scenes)."""
    share = math.ceil(cfg.eval_windows / len(docs))
    parts = []
    for name, text in sorted(docs.items()):
        every = data.windows(data.tokenize({name: text}, tokenizer, cache), cfg.seq_len)
        pick = torch.linspace(0, len(every) - 1, min(share, len(every))).round().long()
        parts.append(every[pick.unique()])
    return torch.cat(parts)[: cfg.eval_windows]


# ------------------------------------------------------------------------------------- train
def _flat(evaluation: dict) -> dict[str, dict[str, float]]:
    return {str(n): v for n, v in evaluation["steps"].items()}


def _materialize_check(student: nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Max |logit difference| between ``materialize(student, steps)`` and the ODE at ``steps``."""
    plain = ode_lib.materialize(student, steps=steps).eval()
    training = student.training
    student.eval()
    with torch.no_grad():
        ode_logits = student(ids, use_cache=False, ode_steps=steps).logits
        diff = (plain(ids, use_cache=False).logits - ode_logits).abs().max().item()
    student.train(training)
    return diff


def run(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Adapt (or train baseline (a)) as configured; returns what ``results.json`` holds."""
    validate(cfg)
    out = Path(cfg.out_dir)
    checkpoints = Checkpoints(
        out / "checkpoints", config_stamp(cfg, _PRESENTATION), keep=cfg.keep, trainable_only=True
    )
    metrics_path = out / "metrics.jsonl"
    if not resume and (checkpoints.paths() or metrics_path.exists()):
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it or choose another out_dir"
        )
    checkpoints.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    train_docs, heldout_docs = split(cfg)

    original, tokenizer = load_original(cfg)
    student, teacher, sampler = build(cfg, original)
    del original
    num_layers = ode_lib.get_block(teacher).ode.num_layers
    weights = LossWeights(cfg.kl, cfg.lm, cfg.hidden, cfg.temperature)
    autocast = AUTOCAST[cfg.autocast]
    cache = data.CACHE if cfg.token_cache is None else Path(cfg.token_cache)
    batches = data.Batches(
        data.tokenize(train_docs, tokenizer, cache), cfg.batch_size, cfg.seq_len, cfg.seed
    )
    windows = heldout_windows(cfg, heldout_docs, tokenizer, cache)
    curve_windows = windows[torch.linspace(0, len(windows) - 1, cfg.curve_windows).long().unique()]
    counts = default_counts(cfg, num_layers, curve=False)
    curve_counts = default_counts(cfg, num_layers, curve=True)
    if min(counts + curve_counts) <= 2 * cfg.discrete_ends:
        raise ValueError(
            f"discrete_ends = {cfg.discrete_ends} needs every step count above "
            f"{2 * cfg.discrete_ends}; eval_steps / curve_steps ask for {min(counts + curve_counts)}"
        )

    cost = CostModel.of(teacher, train_factor=3.0 if cfg.train == "full" else 2.0)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
    else:
        total_steps, _ = steps_for_budget(cfg.budget_flops, tokens_per_step, cost, sampler.draw)
    optimizer = adamw(student, cfg.lr, cfg.weight_decay)
    schedule = warmup_cosine(
        optimizer, min(cfg.warmup_steps, total_steps), total_steps, cfg.min_lr_ratio
    )
    start, extra = checkpoints.resume(student, optimizer, schedule) if resume else (0, {})
    metrics = Metrics(metrics_path)
    if resume:
        # Records past the checkpoint are redone by this run (with no checkpoint: all of them).
        kept = [r for r in metrics.read() if start and r.get("step", 0) <= start]
        metrics.path.write_text(
            "".join(json.dumps(r) + "\n" for r in kept if r.get("event") != "after")
        )
    before = extra.get("before")
    if before is None:
        before = evaluate_depths(
            student, teacher, windows, counts, cfg.eval_batch_size, cfg.progress
        )
        before = {"original": before["original"], "steps": _flat(before)}
        metrics.log(event="before", **before)
    flops, seconds = extra.get("flops", 0.0), extra.get("seconds", 0.0)

    clip = [p for p in student.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in clip)
    bar = tqdm(
        range(start, total_steps),
        initial=start,
        total=total_steps,
        desc=f"adapt {cfg.mode}",
        disable=not cfg.progress,
    )
    student.train()
    for step in bar:
        began = time.perf_counter()
        ids, labels = batches.get(step)
        step_counts = sampler.draw(step)
        targets = teacher_targets(teacher, ids, weights, autocast)
        reports = adapt_step(
            student, targets, ids, labels, step_counts, weights, cfg.full_weight, autocast
        )
        del targets
        norm = torch.nn.utils.clip_grad_norm_(
            clip, cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        )
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        flops += cost.train_step(tokens_per_step, step_counts)
        seconds += time.perf_counter() - began
        metrics.log(
            step=step + 1,
            lr=lr,
            grad_norm=float(norm),
            tokens=(step + 1) * tokens_per_step,
            flops=flops,
            seconds=round(seconds, 2),
            parts=reports,
        )
        bar.set_postfix({f"N={r['steps']}": f"{r['loss']:.3f}" for r in reports})
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps:
            curve = evaluate_depths(
                student, teacher, curve_windows, curve_counts, cfg.eval_batch_size, False
            )
            metrics.log(
                event="curve",
                step=step + 1,
                tokens=(step + 1) * tokens_per_step,
                flops=flops,
                original=curve["original"],
                steps=_flat(curve),
            )
        if (step + 1) % cfg.save_every == 0 or step + 1 == total_steps:
            state = {"before": before, "flops": flops, "seconds": seconds}
            checkpoints.save(step + 1, student, optimizer, schedule, extra=state)
    bar.close()
    if cfg.train == "lora":
        student.save_pretrained(out / "adapter")
        student = student.merge_and_unload()  # what is evaluated, checked and saved

    after = evaluate_depths(student, teacher, windows, counts, cfg.eval_batch_size, cfg.progress)
    final_curve = (
        evaluate_depths(student, teacher, curve_windows, curve_counts, cfg.eval_batch_size, False)
        if cfg.eval_every
        else None
    )
    if final_curve is not None:
        metrics.log(
            event="curve",
            step=total_steps,
            tokens=total_steps * tokens_per_step,
            flops=flops,
            original=final_curve["original"],
            steps=_flat(final_curve),
        )
    metrics.log(event="after", original=after["original"], steps=_flat(after))
    student_layers = ode_lib.get_block(student).ode.num_layers
    half = max(num_layers // 2, 2 * cfg.discrete_ends + 1)  # the shortest grid it allows
    check_steps = cfg.keep_layers if cfg.mode == "drop" else half
    results = {
        "mode": cfg.mode,
        "label": label(cfg, sampler),
        "model": cfg.model,
        "layers": num_layers,
        "student_layers": student_layers,
        "basis": ode_lib.get_block(student).ode.basis,
        "num_basis": ode_lib.get_block(student).ode.num_basis,
        "discrete_ends": ode_lib.get_block(student).ode.discrete_ends,
        "train": cfg.train,
        "trainable_parameters": trainable,
        "sampler": {**dataclasses.asdict(sampler), "choices": list(sampler.choices)},
        "loss": dataclasses.asdict(weights),
        "heldout": cfg.heldout,
        "eval_tokens": after["tokens"],
        "optimizer_steps": total_steps,
        "tokens_seen": total_steps * tokens_per_step,
        "train_flops": flops,
        "train_seconds": round(seconds, 1),
        "cost_model": dataclasses.asdict(cost),
        "inference_gflops_per_token": {
            str(n): cost.forward(1, n) / 1e9 for n in sorted({*counts, num_layers})
        },
        "original_perplexity": after["original"],
        "before": before["steps"],
        "after": _flat(after),
        "materialize_check": {
            "steps": check_steps,
            "max_abs_logit_diff": _materialize_check(student, windows[:1], check_steps),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(report_table([results]))
    plot_runs([results], out)
    if cfg.save_model:
        ode_lib.save_pretrained(student, out / "model", tokenizer=tokenizer, overwrite=True)
    if cfg.progress:
        print(report_table([results]))
    return results


def label(cfg: Config, sampler: StepSampler) -> str:
    """A short description of a run for tables and legends."""
    how = f", LoRA r = {cfg.lora_r}" if cfg.train == "lora" else ""
    if cfg.mode == "drop":
        return f"(a) layer dropping to M = {cfg.keep_layers}, then distillation at M{how}"
    anchor = f", N = L every {sampler.full_every}" if sampler.full_every else ""
    drawn = (
        "{" + ", ".join(map(str, sampler.choices)) + "}"
        if sampler.choices
        else f"[{sampler.low}, {sampler.high}]"
    )
    ends = f", {cfg.discrete_ends} discrete at each end" if cfg.discrete_ends else ""
    return (
        f"depth adaptation ({cfg.basis} K = {cfg.num_basis or sampler.num_layers}{ends}, N in "
        f"{drawn} {sampler.weighting}{anchor}{how})"
    )


# ------------------------------------------------------------------------------------ report
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "x", "D", "v")


def report_table(runs: list[dict]) -> str:
    """A Markdown table of finished runs: perplexity and KL per step count, before and after,
    against the original's perplexity, with each run's training budget."""
    original = runs[0]["original_perplexity"]
    lines = [
        f"Held-out {', '.join(runs[0]['heldout'])} ({runs[0]['eval_tokens']:,} tokens); "
        f"original model (L = {runs[0]['layers']}): perplexity {original:.2f}.",
        "",
        "| run | N | GFLOPs/token | ppl before | ppl after | after / original | KL after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        for n, value in sorted(r["after"].items(), key=lambda kv: int(kv[0])):
            cost = r["cost_model"]
            per_token = 2 * (int(n) * cost["layer_params"] + cost["head_params"]) / 1e9
            lines.append(
                f"| {r['label']} | {n} | {per_token:.4g} | {r['before'][n]['perplexity']:,.2f} "
                f"| {value['perplexity']:,.2f} | {value['perplexity'] / original:.3f} "
                f"| {value['kl']:.4f} |"
            )
    lines += [
        "",
        "| run | optimizer steps | tokens seen | training PFLOPs | seconds | materialize check |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        check = r["materialize_check"]
        lines.append(
            f"| {r['label']} | {r['optimizer_steps']} | {r['tokens_seen']:,} | "
            f"{r['train_flops'] / 1e15:.2f} | {r['train_seconds']:,.0f} | M = {check['steps']}: "
            f"max abs logit diff {check['max_abs_logit_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def _curves(runs: list[dict], x: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """(curves, styles): one color per run, solid (or dashed) after training, dotted before."""
    curves, styles = {}, {}
    for i, r in enumerate(runs):
        cost = r["cost_model"]
        for when in ("before", "after"):
            if r["mode"] == "drop" and when == "before":
                continue
            points = {}
            for n, value in r[when].items():
                key = (
                    int(n)
                    if x == "steps"
                    else 2 * (int(n) * cost["layer_params"] + cost["head_params"]) / 1e9
                )
                points[key] = value["perplexity"]
            name = f"{r['label']}: {when}"
            curves[name] = points
            # Ten colors, then dashed lines; the baselines' points are squares.
            styles[name] = {
                "color": f"C{i % 10}",
                "linestyle": (("-", "--")[i // 10 % 2]) if when == "after" else ":",
                "marker": "x" if when == "before" else "s" if r["mode"] == "drop" else "o",
            }
    return curves, styles


def plot_runs(runs: list[dict], out: Path) -> list[Path]:
    """``perplexity.png`` (against solver steps, before and after) and ``perplexity_flops.png``
    (against inference GFLOPs per token) of finished runs, and ``perplexity_after.png``: after
    training only, on an axis cut to 0.8x-4x the original's perplexity (the range the targets
    are in), with the original and 1.5x it as reference lines."""
    original = runs[0]["original_perplexity"]
    reference = {f"original (N = {runs[0]['layers']})": original}
    title = f"{Path(str(runs[0]['model'])).name}, held-out {', '.join(runs[0]['heldout'])}"
    by_steps, styles = _curves(runs, "steps")
    by_flops, _ = _curves(runs, "flops")
    after = {k.removesuffix(": after"): v for k, v in by_steps.items() if k.endswith(": after")}
    after_styles = {
        k.removesuffix(": after"): v for k, v in styles.items() if k.endswith(": after")
    }
    return [
        plot_sweep(by_steps, out / "perplexity.png", title, reference, styles=styles),
        plot_sweep(
            by_flops,
            out / "perplexity_flops.png",
            title,
            reference,
            xlabel="inference GFLOPs per token",
            styles=styles,
        ),
        plot_sweep(
            after,
            out / "perplexity_after.png",
            f"{title}: after training",
            {**reference, "1.5x the original": 1.5 * original},
            styles=after_styles,
            ylim=(0.8 * original, 4 * original),
        ),
    ]


def plot_budget(run_dirs: list[Path], out: Path, labels: list[str]) -> Path | None:
    """``perplexity_budget.png``: held-out perplexity against training PFLOPs from the curves
    the runs logged (``eval_every``), one line per (run, step count): one color per step count,
    one line style and marker per run. ``labels`` name the runs, one per folder."""
    curves: dict[str, dict] = {}
    styles: dict[str, dict] = {}
    colors: dict[int, str] = {}
    reference = None
    for i, (folder, run_label) in enumerate(zip(run_dirs, labels, strict=True)):
        for record in Metrics(folder / "metrics.jsonl").read():
            if record.get("event") != "curve":
                continue
            reference = reference or {"original": record["original"]}
            for n, value in record["steps"].items():
                name = f"{run_label}: N = {n}"
                curves.setdefault(name, {})[record["flops"] / 1e15] = value["perplexity"]
                styles[name] = {
                    "color": colors.setdefault(int(n), f"C{len(colors)}"),
                    "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
                    "marker": _MARKERS[i % len(_MARKERS)],
                }
    if not curves:
        return None
    return plot_sweep(
        curves,
        out / "perplexity_budget.png",
        "perplexity during training (curve windows)",
        reference,
        xlabel="training PFLOPs",
        styles=styles,
    )


def compare(run_dirs: list[str], out: str, names: list[str] | None = None) -> str:
    """One table (``report.md``) and the plots of several finished runs, written to ``out``.

    ``names`` (one per run) replace the runs' long labels in the table and the legends; the
    table then lists what each name stands for.

    Example:
        >>> compare(["runs/adapt-smollm2", "runs/adapt-smollm2-drop15"], "cmp", ["C", "(a)"])  # doctest: +SKIP
    """
    folders = [Path(d) for d in run_dirs]
    if names is not None and len(names) != len(folders):
        raise ValueError(
            f"--names gave {len(names)} names for {len(folders)} runs: give one per run, in order"
        )
    for folder in folders:
        if not (folder / "results.json").exists():
            raise FileNotFoundError(f"{folder} holds no finished run (no results.json)")
    runs = [json.loads((f / "results.json").read_text()) for f in folders]
    if len({(r["model"], tuple(r["heldout"]), r["eval_tokens"]) for r in runs}) > 1:
        raise ValueError("--compare needs runs of one model evaluated on the same held-out text")
    if len({r["label"] for r in runs}) < len(runs):
        # Runs of one config at other budgets: tell them apart (and keep their curves apart).
        for r in runs:
            r["label"] += f", {r['train_flops'] / 1e15:.2g} PFLOP"
    key = ""
    if names:
        key = "\n" + "".join(f"- {n}: {r['label']}\n" for n, r in zip(names, runs, strict=True))
        for n, r in zip(names, runs, strict=True):
            r["label"] = n
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    table = report_table(runs) + key
    (target / "report.md").write_text(table)
    plot_runs(runs, target)
    plot_budget(folders, target, [r["label"] for r in runs])
    return table


def main(argv: list[str] | None = None) -> dict[str, Any] | str:
    parser = argparse.ArgumentParser(
        description="Depth adaptation of an odeified model, and the layer-dropping baseline."
    )
    parser.add_argument("--config", help="YAML file of Config fields")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="tabulate finished runs")
    parser.add_argument("--out", help="where --compare writes its table and plots")
    parser.add_argument("--names", nargs="+", help="short names of the --compare runs, in order")
    args = parser.parse_args(argv)
    if args.compare:
        if not args.out:
            parser.error("--compare needs --out")
        table = compare(args.compare, args.out, args.names)
        print(table)
        return table
    cfg = load_config(Config, args.config, parse_overrides(args.set))
    return run(cfg, resume=args.resume)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
