"""Depth adaptation: make a converted pretrained model retargetable by continuous-depth
distillation from its frozen original (issue 6), and the layer-dropping baseline beside it.

    python recipes/adapt_depth.py --config recipes/configs/adapt-smollm2.yaml
    python recipes/adapt_depth.py --config recipes/configs/adapt-smollm2-drop15.yaml   # baseline (a)
    python recipes/adapt_depth.py --config ... --set max_steps=20 --set out_dir=runs/try
    python recipes/adapt_depth.py --config ... --resume        # continue the run in out_dir
    torchrun --nproc_per_node=2 recipes/adapt_depth.py --config ...   # DDP
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
  and the student's forwards and backwards, :class:`odeify.train.cost.CostModel`): the run takes
  the steps that fit in it, so runs of different modes get the same compute.
- Data: a corpus spec (``shakespeare``, a text file or folder), the ``heldout`` documents
  (plays) removed from training and used for every evaluation; batches are a pure function of
  (seed, step). ``autocast: bf16`` trains in bfloat16 autocast (fp32 master weights);
  evaluation is always fp32.
- Distributed: under torchrun, DDP (gloo on CPU, NCCL on GPU): each process distils on its
  share of every batch (``batch_size`` must split over the processes) and scores its share of
  the held-out windows; the first writes checkpoints, metrics and outputs.
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

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import odeify as ode_lib
from odeify.atomic import replace_folder, write_text
from odeify.bases import BASES
from odeify.loading import load_with_tokenizer
from odeify.lora import lora_config
from odeify.train import data
from odeify.train.checkpoints import Checkpoints, finished
from odeify.train.config import config_stamp, launch, recipe_parser
from odeify.train.cost import CostModel, steps_for_budget
from odeify.train.distill import (
    LossWeights,
    adapt_step,
    drop_layers,
    frozen_teacher,
    teacher_targets,
)
from odeify.train.distributed import wrap
from odeify.train.evaluate import sweep
from odeify.train.optim import adamw, seed_everything, warmup_cosine
from odeify.train.plots import plot_budget, plot_runs
from odeify.train.run import open_run
from odeify.train.sampler import WEIGHTINGS, StepSampler

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
def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _model_problems(cfg: Config) -> list[str]:
    """What is wrong with the model, training and basis options."""
    problems = []
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
    return problems


def _sampler_problems(cfg: Config) -> list[str]:
    """What is wrong with the budget and the step-count sampler options."""
    problems = []
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
    return problems


def _run_problems(cfg: Config, world: int) -> list[str]:
    """What is wrong with the evaluation, data and output options."""
    problems = []
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
    if _is_count(cfg.batch_size) and cfg.batch_size % world:
        problems.append(f"batch_size {cfg.batch_size} does not split over {world} processes")
    if cfg.eval_every < 0 or cfg.warmup_steps < 0 or cfg.full_every < 0 or cfg.draws < 0:
        problems.append("eval_every, warmup_steps, full_every and draws must be >= 0")
    if cfg.weighting not in WEIGHTINGS:
        problems.append(f"weighting must be one of {WEIGHTINGS}, got {cfg.weighting!r}")
    if cfg.autocast not in AUTOCAST:
        problems.append(f"autocast must be one of {sorted(AUTOCAST)}, got {cfg.autocast!r}")
    if not cfg.heldout:
        problems.append("heldout must name the evaluation documents (e.g. plays)")
    return problems


def validate(cfg: Config, world: int = 1) -> None:
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
    problems += _model_problems(cfg) + _sampler_problems(cfg) + _run_problems(cfg, world)
    try:
        LossWeights(cfg.kl, cfg.lm, cfg.hidden, cfg.temperature)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------- model
def load_original(cfg: Config) -> tuple[nn.Module, Any]:
    """The original (stock) model named by ``cfg.model`` and its tokenizer."""
    model, tokenizer, ode = load_with_tokenizer(cfg.model, cfg.tokenizer)
    if ode:
        raise ValueError(
            f"{cfg.model} holds an odeified model; depth adaptation distils from the original, "
            "so give the stock model it was converted from (or odeify.materialize(model, L) "
            "saved with save_pretrained)"
        )
    return model, tokenizer


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
def _flat(scores: dict) -> dict[str, dict[str, float]]:
    return {str(n): v for n, v in scores["steps"].items()}


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


def _mean_parts(reports: list[dict[str, float]], ctx) -> list[dict[str, float]]:
    """Each step count's loss parts averaged over ranks (each rank's are means over its rows)."""
    if ctx.world == 1:
        return reports
    keys = [(i, k) for i, r in enumerate(reports) for k in r if k != "steps"]
    values = ctx.mean(torch.tensor([reports[i][k] for i, k in keys], dtype=torch.float64))
    out = [dict(r) for r in reports]
    for (i, k), v in zip(keys, values.tolist(), strict=True):
        out[i][k] = v
    return out


# ------------------------------------------------------------------------------------- recipe
class AdaptDepth:
    """The recipe in phases: :meth:`setup` (run folder, teacher and student, data, budget,
    optimizer), :meth:`evaluate` (before, during, after), :meth:`train`, :meth:`report`;
    :meth:`run` calls them in turn.

    Under torchrun each rank distils on its share of every batch (DDP) and scores its share of
    the held-out windows; rank 0 writes checkpoints, metrics and outputs.

    Example:
        >>> results = AdaptDepth(load_config(Config, "recipes/configs/adapt-smollm2.yaml")).run()   # doctest: +SKIP
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.checkpoints = Checkpoints(
            self.out / "checkpoints",
            config_stamp(cfg, _PRESENTATION),
            keep=cfg.keep,
            trainable_only=True,
        )

    def check(self) -> None:
        """Every check of the config that needs no data and no model (one process)."""
        validate(self.cfg)

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Adapt (or train baseline (a)) as configured; returns what ``results.json`` holds."""
        done = finished(self.checkpoints, self.out / "results.json", resume)
        if done is not None:
            return done
        extra = self.setup(resume)
        before = extra.get("before")
        if before is None:
            scores = self.evaluate(self.windows, self.counts, self.cfg.progress)
            before = {"original": scores["original"], "steps": _flat(scores)}
            self.metrics.log(event="before", **before)
        self.train(before, extra.get("flops", 0.0), extra.get("seconds", 0.0))
        return self.report(before)

    # ------------------------------------------------------------------------------- setup
    def setup(self, resume: bool) -> dict:
        """Everything before training; returns the resumed checkpoint's extra state."""
        cfg = self.cfg
        run = open_run(self.out, self.checkpoints, resume, lambda world: validate(cfg, world))
        self.ctx, self.metrics = run.ctx, run.metrics
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        train_docs, heldout_docs = data.split(data.corpus(cfg.corpus), cfg.heldout, spec=cfg.corpus)
        original, self.tokenizer = load_original(cfg)
        self.student, self.teacher, self.sampler = build(cfg, original)
        del original
        self.num_layers = ode_lib.get_block(self.teacher).ode.num_layers
        self.weights = LossWeights(cfg.kl, cfg.lm, cfg.hidden, cfg.temperature)
        self.autocast = AUTOCAST[cfg.autocast]
        self.setup_data(train_docs, heldout_docs)
        self.setup_budget()
        self.optimizer = adamw(self.student, cfg.lr, cfg.weight_decay)
        self.schedule = warmup_cosine(
            self.optimizer,
            min(cfg.warmup_steps, self.total_steps),
            self.total_steps,
            self.cfg.min_lr_ratio,
        )
        self.start, extra = (
            self.checkpoints.resume(self.student, self.optimizer, self.schedule)
            if resume
            else (0, {})
        )
        self.model = wrap(self.student, self.ctx)
        return extra

    def setup_data(self, train_docs: dict[str, str], heldout_docs: dict[str, str]) -> None:
        cfg = self.cfg
        cache = data.CACHE if cfg.token_cache is None else Path(cfg.token_cache)
        with self.ctx.main_first():  # rank 0 fills the token cache, the others read it
            tokens = data.tokenize(train_docs, self.tokenizer, cache)
            windows = heldout_windows(cfg, heldout_docs, self.tokenizer, cache)
        self.batches = data.Batches(tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
        self.windows = windows
        pick = torch.linspace(0, len(windows) - 1, cfg.curve_windows).long().unique()
        self.curve_windows = windows[pick]
        self.counts = default_counts(cfg, self.num_layers, curve=False)
        self.curve_counts = default_counts(cfg, self.num_layers, curve=True)
        lowest = min(self.counts + self.curve_counts)
        if lowest <= 2 * cfg.discrete_ends:
            raise ValueError(
                f"discrete_ends = {cfg.discrete_ends} needs every step count above "
                f"{2 * cfg.discrete_ends}; eval_steps / curve_steps ask for {lowest}"
            )

    def setup_budget(self) -> None:
        cfg = self.cfg
        self.cost = CostModel.of(self.teacher, train_factor=3.0 if cfg.train == "full" else 2.0)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        if cfg.max_steps is not None:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps, _ = steps_for_budget(
                cfg.budget_flops, self.tokens_per_step, self.cost, self.sampler.draw
            )

    # ---------------------------------------------------------------------------- evaluate
    def evaluate(self, windows: torch.Tensor, counts: list[int], progress: bool) -> dict:
        """Perplexity of the student at each step count, its KL from the teacher (nats per
        token), and the teacher's own perplexity, in one pass (the teacher runs once per batch),
        the windows split over ranks: ``{"original", "tokens", "steps": {N: {"perplexity",
        "kl"}}}``."""
        scores = sweep(
            self.student,
            windows,
            counts,
            self.cfg.eval_batch_size,
            teacher=self.teacher,
            dist=self.ctx,
            progress=progress and self.ctx.main,
        )
        return {
            "original": math.exp(scores.teacher_loss),
            "tokens": scores.tokens,
            "steps": {
                n: {"perplexity": math.exp(scores.loss[n]), "kl": scores.kl[n]} for n in counts
            },
        }

    def log_curve(self, step: int, flops: float) -> None:
        """The perplexity at the curve step counts on the curve windows, against training."""
        curve = self.evaluate(self.curve_windows, self.curve_counts, False)
        self.metrics.log(
            event="curve",
            step=step,
            tokens=step * self.tokens_per_step,
            flops=flops,
            original=curve["original"],
            steps=_flat(curve),
        )

    # ------------------------------------------------------------------------------- train
    def train(self, before: dict, flops: float, seconds: float) -> None:
        cfg = self.cfg
        bar = tqdm(
            range(self.start, self.total_steps),
            initial=self.start,
            total=self.total_steps,
            desc=f"adapt {cfg.mode}",
            disable=not (cfg.progress and self.ctx.main),
        )
        self.student.train()
        for step in bar:
            began = time.perf_counter()
            step_counts = self.sampler.draw(step)
            reports, norm, lr = self.train_step(step, step_counts)
            flops += self.cost.train_step(self.tokens_per_step, step_counts)
            seconds += time.perf_counter() - began
            done = step + 1
            self.metrics.log(
                step=done,
                lr=lr,
                grad_norm=float(norm),
                tokens=done * self.tokens_per_step,
                flops=flops,
                seconds=round(seconds, 2),
                parts=reports,
            )
            bar.set_postfix({f"N={r['steps']}": f"{r['loss']:.3f}" for r in reports})
            if cfg.eval_every and done % cfg.eval_every == 0 and done < self.total_steps:
                self.log_curve(done, flops)
            if (done % cfg.save_every == 0 or done == self.total_steps) and self.ctx.main:
                state = {"before": before, "flops": flops, "seconds": seconds}
                self.checkpoints.save(done, self.student, self.optimizer, self.schedule, state)
        bar.close()
        self.flops, self.seconds = flops, seconds

    def train_step(self, step: int, counts: list[int]) -> tuple[list[dict], torch.Tensor, float]:
        """One optimizer step on this rank's rows of batch ``step`` at each of ``counts``: (loss
        parts per count averaged over ranks, gradient norm before clipping, learning rate)."""
        cfg, ctx = self.cfg, self.ctx
        ids, labels = self.batches.get(step, ctx.rank, ctx.world)
        targets = teacher_targets(self.teacher, ids, self.weights, self.autocast)
        reports = adapt_step(
            self.model, targets, ids, labels, counts, self.weights, cfg.full_weight, self.autocast
        )
        del targets
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(
            trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _mean_parts(reports, ctx), norm, lr

    # ------------------------------------------------------------------------------ report
    def report(self, before: dict) -> dict[str, Any]:
        cfg, out = self.cfg, self.out
        trainable = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        if cfg.train == "lora":
            if self.ctx.main:
                with replace_folder(out / "adapter", overwrite=True) as tmp:
                    self.student.save_pretrained(tmp)
            self.student = self.student.merge_and_unload()  # what is evaluated, checked and saved
        after = self.evaluate(self.windows, self.counts, cfg.progress)
        if cfg.eval_every:
            self.log_curve(self.total_steps, self.flops)
        self.metrics.log(event="after", original=after["original"], steps=_flat(after))
        results = self.results(before, after, trainable)
        if self.ctx.main:
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / "report.md", report_table([results]))
            plot_runs([results], out)
            if cfg.save_model:
                ode_lib.save_pretrained(
                    self.student, out / "model", tokenizer=self.tokenizer, overwrite=True
                )
            if cfg.progress:
                print(report_table([results]))
            write_text(out / "results.json", json.dumps(results, indent=2) + "\n")  # last: done
        self.ctx.barrier()
        return results

    def results(self, before: dict, after: dict, trainable: int) -> dict[str, Any]:
        """What ``results.json`` holds."""
        cfg, sampler, cost, layers = self.cfg, self.sampler, self.cost, self.num_layers
        block = ode_lib.get_block(self.student)
        half = max(layers // 2, 2 * cfg.discrete_ends + 1)  # the shortest grid it allows
        check_steps = cfg.keep_layers if cfg.mode == "drop" else half
        return {
            "mode": cfg.mode,
            "label": label(cfg, sampler),
            "model": cfg.model,
            "layers": layers,
            "student_layers": block.ode.num_layers,
            "basis": block.ode.basis,
            "num_basis": block.ode.num_basis,
            "discrete_ends": block.ode.discrete_ends,
            "train": cfg.train,
            "trainable_parameters": trainable,
            "sampler": {**dataclasses.asdict(sampler), "choices": list(sampler.choices)},
            "loss": dataclasses.asdict(self.weights),
            "heldout": cfg.heldout,
            "eval_tokens": after["tokens"],
            "optimizer_steps": self.total_steps,
            "tokens_seen": self.total_steps * self.tokens_per_step,
            "train_flops": self.flops,
            "train_seconds": round(self.seconds, 1),
            "cost_model": dataclasses.asdict(cost),
            "inference_gflops_per_token": {
                str(n): cost.forward(1, n) / 1e9 for n in sorted({*self.counts, layers})
            },
            "original_perplexity": after["original"],
            "before": before["steps"],
            "after": _flat(after),
            "materialize_check": {
                "steps": check_steps,
                "max_abs_logit_diff": _materialize_check(
                    self.student, self.windows[:1], check_steps
                ),
            },
        }


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
    write_text(target / "report.md", table)
    plot_runs(runs, target)
    plot_budget(folders, target, [r["label"] for r in runs])
    return table


def main(argv: list[str] | None = None) -> dict[str, Any] | str:
    parser = recipe_parser(
        "Depth adaptation of an odeified model, and the layer-dropping baseline."
    )
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
    return launch(AdaptDepth, Config, argv, parser=parser)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
