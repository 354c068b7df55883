"""Depth adaptation: make a converted pretrained model retargetable by continuous-depth
distillation from its frozen original (issue 6), and the layer-dropping baseline beside it.

    python recipes/adapt_depth.py --config recipes/configs/adapt-smollm2.yaml
    python recipes/adapt_depth.py --config recipes/configs/adapt-smollm2-drop15.yaml   # baseline (a)
    python recipes/adapt_depth.py --config recipes/configs/adapt-smollm2-v2.yaml       # v2
    python recipes/adapt_depth.py --config recipes/configs/adapt-smollm2-hyper.yaml    # hypersolver
    python recipes/adapt_depth.py --config recipes/configs/adapt-smollm2-bi15.yaml     # (a')
    python recipes/adapt_depth.py --config recipes/configs/adapt-smollm2-angular15.yaml  # (a'')
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
  uniformly, a pure function of (seed, step); ``every_batch: true`` instead takes every count
  of ``choices`` at every step (each target trained on every batch). ``basis`` / ``num_basis`` refit the weight
  functions before training (default: the exact hat basis, K = L). ``discrete_ends: d`` keeps
  the first and last d layers discrete: at every step count they are those layers, and the
  other steps share the middle of the depth (``odeify.ODEConfig.discrete_ends``).
- Depth adaptation v2 (``mode: ode``): ``schedules: calibrate`` first calibrates the
  ``choices`` below L with :func:`odeify.calibrate` on the training tokens (its keyword options
  in ``calibrate``, e.g. ``{init: dp, iters: 100, correction: linear}``; ``seq_len`` and ``seed``
  default to the run's), against the student at N = L (the original with the default exact
  hat basis); ``schedules: stored`` takes the calibrated schedules of an odeified input model
  (``odeify calibrate``'s output; the teacher is that model at N = L, which must be exact), one
  for each of ``choices`` below L. Each such count then trains on its own schedule; with
  ``train_schedules`` (default) the schedule's gains, and its times unless
  ``calibrate: {learn_times: false}`` (``learn_gains: false`` likewise), are trained with the
  weights by the same loss, at ``schedule_lr``; a linear correction's matrices too when
  ``correction_lr`` > 0. N = L (the anchor, ``full_every`` / ``full_weight``) and counts above
  L (2L may be a choice) run on the uniform grid. The trained schedules are stored in the
  model's ODE settings: evaluation at ``eval_steps``, the materialize check (at the smallest
  calibrated count) and ``model/`` use them. Calibrating's FLOPs (:func:`calibration_flops`)
  count in ``budget_flops``. Hidden-state matching (``hidden``) needs the uniform grid: 0 here.
  A resumed run calibrates again (deterministic), then loads its trained schedules.
  ``calibrate: {correction: linear, correction_rank: r}`` makes each correction low rank,
  T = I + U V^T (the truncated SVD of the closed-form fit), U and V trained at
  ``correction_lr``; the model holds the dense T.
- The hypersolver, ``train_weights: false`` (with v2's schedules): the weights stay frozen and
  only the per-step-count parameters train (gains, times, a correction at ``correction_lr``),
  so N = L is the original bit for bit without an anchor: ``full_every`` must be 0 (refused
  otherwise: its teacher and student passes would spend budget on a zero loss), and every
  count of ``choices`` must be below L. The budget counts the backward as one forward (the
  activations' gradients, no weight gradients: ``train_factor`` 2, as for LoRA).
- ``mode: drop`` are the baselines: the original with ``keep_layers`` = M layers kept, trained
  at its M layers with the same loss, data and budget. ``drop_selection``: ``uniform`` is (a)
  (layer floor(i L / M), output projections scaled by L / M, as ``materialize`` does);
  ``block_influence`` is (a'), the M layers of highest Block Influence 1 - cos(input, output)
  (ShortGPT); ``angular`` is (a''), all but the contiguous L - M layers whose input and output
  are closest in angle (Gromov et al.); both kept unscaled, measured on ``selection_tokens``
  training tokens (their FLOPs in the budget) and need ``hidden: 0``. ``drop_gains: true``
  adds a learned gain per attention and MLP update (an M-step schedule, at ``schedule_lr``),
  stored with the model as v2's schedules are.
- Loss: ``kl`` * KL(original || student) on the logits (``temperature``), ``lm`` * next-token
  cross-entropy, ``hidden`` * the mean squared difference of RMS-normalised hidden states where
  the student's grid meets the original's layers (t = j / N = l / L).
- Budget: ``max_steps``, or ``budget_flops`` (matrix-multiply FLOPs of the teacher's forwards
  and the student's forwards and backwards, :class:`odeify.train.cost.CostModel`): the run takes
  the steps that fit in it, so runs of different modes get the same compute.
- Data: a corpus spec (``shakespeare``, a text file or folder), the ``heldout`` documents
  (plays) removed from training and used for every evaluation; batches are a pure function of
  (seed, step). ``autocast: bf16`` trains in bfloat16 autocast (fp32 master weights),
  ``auto`` only where the device multiplies bfloat16 natively (an AVX2-only CPU emulates it, ten
  times slower than fp32); evaluation is always fp32.
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
  not in the corpus, a run folder from another config (or a run there and no ``--resume``),
  options of one mode given to the other (``drop_selection`` / ``drop_gains`` with mode ode,
  ``schedules`` with mode drop), ``schedules`` without ``choices``, unknown ``calibrate``
  options, ``schedules: stored`` on a stock model or one without a target's schedule,
  ``correction_rank`` without a correction or not an integer, ``train_weights: false`` without
  schedules, with LoRA, with an anchor (``full_every`` > 0) or with nothing to train.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import odeify as ode_lib
from odeify.atomic import replace_folder, write_text
from odeify.bases import BASES
from odeify.calibrate import INITS as CALIBRATE_INITS
from odeify.calibrate import ParametrisedSchedule, initial_layers, teacher_states
from odeify.loading import load_with_tokenizer
from odeify.lora import lora_config
from odeify.schedule import Schedule
from odeify.schemes import resolve_solver
from odeify.surgery import block_stack, is_odeified
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
from odeify.train.precision import AUTOCAST_CHOICES, autocast_dtype
from odeify.train.run import open_run
from odeify.train.sampler import WEIGHTINGS, StepSampler

MODES = ("ode", "drop")
SELECTIONS = ("uniform", "block_influence", "angular")
SCHEDULES = ("uniform", "calibrate", "stored")
# What drop_selection measures the layers with, in odeify.calibrate's names of the same methods.
_SELECTION_INIT = {"block_influence": "bi", "angular": "angular"}
# odeify.calibrate's options a config may set; the model, counts, data and progress are the run's.
CALIBRATE_OPTIONS = tuple(
    name
    for name, p in inspect.signature(ode_lib.calibrate).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "progress"
)
TRAIN = ("full", "lora")
# Keys that change what a run prints or how fast, not what it computes: a resume may change them.
_PRESENTATION = ("progress", "threads")


@dataclass
class Config:
    """Every option of the recipe; YAML files and ``--set key=value`` fill it."""

    # model
    model: str = "smollm2"  # 'smollm2' or a folder with a stock transformers model
    tokenizer: str | None = None  # None: the model's own; 'gpt2' or a folder
    mode: str = "ode"  # 'ode' (depth adaptation) or 'drop' (baselines (a), (a'), (a''))
    keep_layers: int | None = None  # M of mode 'drop'
    # mode 'drop': which M layers: 'uniform' (a), 'block_influence' (a'), 'angular' (a'')
    drop_selection: str = "uniform"
    drop_gains: bool = False  # mode 'drop': a learned gain per attention and MLP update
    selection_tokens: int = 4096  # training tokens of the pass that measures the layers
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
    every_batch: bool = False  # every count of choices at every step (draws unused)
    # step schedules (mode 'ode'): 'uniform' (v1), 'calibrate' (odeify.calibrate the choices
    # below L at the start), 'stored' (the calibrated schedules the odeified input model holds)
    schedules: str = "uniform"
    calibrate: dict[str, Any] = field(default_factory=dict)  # odeify.calibrate's options
    train_schedules: bool = True  # gains (and times, unless learn_times: false) trained too
    schedule_lr: float = 1e-3  # Adam's learning rate of schedule times and gains
    correction_lr: float = 0.0  # > 0: a linear correction's matrices trained too, at this lr
    # false: the hypersolver, weights frozen, only the schedules (gains, times, correction)
    # trained; N = L stays the original exactly, so it needs full_every: 0 (no anchor)
    train_weights: bool = True
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
    autocast: str = "none"  # 'none', 'bf16', or 'auto' (bf16 where the device has it natively)
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


def _schedule_problems(cfg: Config) -> list[str]:
    """What is wrong with the schedule (v2) and the baselines' layer-selection options."""
    problems = []
    if cfg.drop_selection not in SELECTIONS:
        problems.append(f"drop_selection must be one of {SELECTIONS}, got {cfg.drop_selection!r}")
    if cfg.mode == "ode" and (cfg.drop_selection != "uniform" or cfg.drop_gains):
        problems.append(
            "drop_selection and drop_gains choose and scale the kept layers of the baselines "
            "(mode: drop); with mode: ode use schedules: calibrate (calibrate: {init: bi} etc.)"
        )
    if cfg.mode == "drop" and cfg.drop_selection != "uniform" and cfg.hidden:
        problems.append(
            "hidden-state matching pairs step j of M with the original's layer j L / M; the "
            f"layers {cfg.drop_selection} keeps are others: set hidden: 0"
        )
    if not _is_count(cfg.selection_tokens):
        problems.append(f"selection_tokens must be an integer >= 1, got {cfg.selection_tokens!r}")
    if cfg.schedules not in SCHEDULES:
        problems.append(f"schedules must be one of {SCHEDULES}, got {cfg.schedules!r}")
    elif cfg.schedules != "uniform":
        if cfg.mode == "drop":
            problems.append(
                f"schedules: {cfg.schedules} is depth adaptation v2 (mode: ode); the baselines "
                "learn their gains with drop_gains: true"
            )
        if not cfg.choices:
            problems.append(
                f"schedules: {cfg.schedules} trains each target step count on its own schedule; "
                "list the targets in choices (e.g. choices: [15, 20])"
            )
        if cfg.hidden:
            problems.append(
                "hidden-state matching pairs the uniform grid with the teacher's layers; a "
                "calibrated schedule's steps end elsewhere: set hidden: 0 with schedules"
            )
    if not isinstance(cfg.calibrate, dict):
        problems.append(
            f"calibrate takes a mapping of odeify.calibrate's options, got {cfg.calibrate!r}"
        )
    else:
        unknown = sorted(set(cfg.calibrate) - set(CALIBRATE_OPTIONS))
        if unknown:
            problems.append(
                f"calibrate: unknown options {unknown}; odeify.calibrate takes {list(CALIBRATE_OPTIONS)}"
            )
        if cfg.calibrate and cfg.schedules == "uniform":
            problems.append("calibrate options need schedules: calibrate (or stored)")
        extra = sorted(set(cfg.calibrate) - {"learn_gains", "learn_times"})
        if cfg.schedules == "stored" and extra:
            problems.append(
                f"schedules: stored trains the model's schedules as they are; of calibrate's "
                f"options only learn_gains and learn_times apply, got {extra}"
            )
        init = cfg.calibrate.get("init", "dp")
        if init not in CALIBRATE_INITS:
            problems.append(f"calibrate: init must be one of {CALIBRATE_INITS}, got {init!r}")
    if cfg.every_batch and not cfg.choices:
        problems.append("every_batch trains every count of choices at each step; give choices")
    for name in ("schedule_lr", "correction_lr"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            problems.append(f"{name} must be a number >= 0, got {value!r}")
    if cfg.schedule_lr == 0 and (
        cfg.drop_gains or (cfg.schedules != "uniform" and cfg.train_schedules)
    ):
        problems.append("schedule_lr = 0 trains no gains: set it > 0, or train_schedules: false")
    if isinstance(cfg.calibrate, dict):
        problems += _rank_problems(cfg.calibrate)
    return problems + _hypersolver_problems(cfg)


def _rank_problems(options: dict[str, Any]) -> list[str]:
    """What is wrong with ``calibrate: {correction_rank}`` (its bound d is checked by
    odeify.calibrate, which knows the model)."""
    rank = options.get("correction_rank")
    if rank is None:
        return []
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        return [
            f"calibrate: correction_rank must be an integer from 1 to the hidden size (or 0 / "
            f"null: a full d x d correction), got {rank!r}"
        ]
    if rank and options.get("correction") is None:
        return [
            f"calibrate: correction_rank = {rank} is the rank of a linear correction; add "
            "correction: linear"
        ]
    return []


def _hypersolver_problems(cfg: Config) -> list[str]:
    """What is wrong with ``train_weights: false`` (the hypersolver: schedules trained alone)."""
    if not isinstance(cfg.train_weights, bool):
        return [f"train_weights must be true or false, got {cfg.train_weights!r}"]
    if cfg.train_weights:
        return []
    problems = []
    if cfg.mode != "ode" or cfg.schedules == "uniform":
        problems.append(
            "train_weights: false trains only per-step-count schedules (gains, times, a "
            "correction): it needs mode: ode with schedules: calibrate or stored"
        )
    if cfg.train != "full":
        problems.append(
            f"train_weights: false freezes the weights; train: {cfg.train} would train adapters "
            "on them: leave train at full"
        )
    if cfg.full_every:
        # Refused, not ignored: with the weights frozen N = L (the uniform grid, no schedule) is
        # the original exactly, so its teacher and student passes would cost FLOPs for a zero loss.
        problems.append(
            f"train_weights: false keeps N = L the original exactly, so the anchor trains nothing "
            f"and would spend budget on a zero loss: set full_every: 0 (got {cfg.full_every})"
        )
    options = cfg.calibrate if isinstance(cfg.calibrate, dict) else {}
    learned = options.get("learn_gains", True) or options.get("learn_times", True)
    if not cfg.train_schedules or not (learned or cfg.correction_lr > 0):
        problems.append(
            "train_weights: false with no schedule parameter trained trains nothing: set "
            "train_schedules: true with learn_gains / learn_times, or correction_lr > 0"
        )
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
    if cfg.autocast not in AUTOCAST_CHOICES:
        problems.append(f"autocast must be one of {list(AUTOCAST_CHOICES)}, got {cfg.autocast!r}")
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
    problems += _schedule_problems(cfg)
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
    if ode and cfg.schedules == "stored":
        # Its teacher is itself at N = L, which frozen_teacher checks is exact (hat basis, K = L).
        stored = ode_lib.get_block(model).ode.schedules
        num_layers = ode_lib.get_block(model).ode.num_layers
        missing = [n for n in cfg.choices or () if n < num_layers and str(n) not in stored]
        if missing:
            raise ValueError(
                f"schedules: stored trains the calibrated schedules of {cfg.model}, which has none "
                f"for {missing} (calibrated: {sorted(map(int, stored)) or 'none'}); calibrate "
                "them first (odeify calibrate) or set schedules: calibrate"
            )
        return model, tokenizer
    if cfg.schedules == "stored":
        raise ValueError(
            f"schedules: stored takes the calibrated schedules of an odeified model; {cfg.model} "
            "is a stock model (set schedules: calibrate to calibrate them at the start)"
        )
    if ode:
        raise ValueError(
            f"{cfg.model} holds an odeified model; depth adaptation distils from the original, "
            "so give the stock model it was converted from (or odeify.materialize(model, L) "
            "saved with save_pretrained)"
        )
    return model, tokenizer


def selected_layers(states: torch.Tensor, keep: int, selection: str) -> list[int]:
    """The ``keep`` layers a baseline keeps, from the original's states x_0 .. x_L
    [L + 1, tokens, d] (:func:`odeify.calibrate.teacher_states`): ``uniform`` floor(i L / M),
    ``block_influence`` the M of highest 1 - cos(x_l, x_{l+1}) (ShortGPT), ``angular`` all but
    the contiguous L - M whose input and output are closest in angle (Gromov et al.).

    Example:
        >>> selected_layers(torch.randn(7, 5, 4), 3, "uniform")
        [0, 2, 4]
    """
    num_layers = states.shape[0] - 1
    if selection == "uniform":
        return [i * num_layers // keep for i in range(keep)]
    if keep == num_layers:
        return list(range(num_layers))
    return initial_layers(states, keep, _SELECTION_INIT[selection])


def measure_layers(
    teacher: nn.Module, tokens, count: int, seq_len: int, batch: int
) -> torch.Tensor:
    """The teacher's states x_0 .. x_L [L + 1, tokens, d] on ``count`` training tokens (windows
    of ``seq_len`` spread over the corpus), ``batch`` windows a forward."""
    from odeify.calibrate import spread_windows

    ids = spread_windows(torch.from_numpy(np.asarray(tokens, dtype=np.int64)), count, seq_len)
    num_layers = ode_lib.get_block(teacher).ode.num_layers
    return torch.cat([teacher_states(teacher, part, num_layers) for part in ids.split(batch)], 1)


def build(
    cfg: Config, original: nn.Module, tokens=None
) -> tuple[nn.Module, nn.Module, StepSampler, list[int] | None]:
    """(student, teacher, sampler, kept layers of mode drop). Consumes ``original``; only the
    student's weight functions (basis tensors) are trainable, or with ``train: lora`` only the
    LoRA factors on them. ``tokens`` (the training tokens) are measured for a
    ``drop_selection`` other than uniform."""
    teacher = frozen_teacher(original)
    num_layers = ode_lib.get_block(teacher).ode.num_layers
    kept = None
    if cfg.mode == "drop":
        if cfg.keep_layers > num_layers:
            raise ValueError(f"keep_layers = {cfg.keep_layers} exceeds the depth L = {num_layers}")
        layers = None
        if cfg.drop_selection != "uniform":
            if tokens is None:
                raise ValueError(
                    f"drop_selection: {cfg.drop_selection} measures the layers on tokens"
                )
            states = measure_layers(
                teacher, tokens, cfg.selection_tokens, cfg.seq_len, cfg.batch_size
            )
            layers = selected_layers(states, cfg.keep_layers, cfg.drop_selection)
        kept = layers or selected_layers(
            torch.zeros(num_layers + 1, 1, 1), cfg.keep_layers, "uniform"
        )
        student = ode_lib.odeify(drop_layers(original, cfg.keep_layers, layers), progress=False)
        sampler = StepSampler(
            cfg.keep_layers, cfg.keep_layers, cfg.keep_layers, draws=1, full_every=0, seed=cfg.seed
        )
    else:
        if is_odeified(original):  # schedules: stored (load_original allows no other)
            ode = ode_lib.get_block(original).ode
            if (cfg.basis, cfg.num_basis or ode.num_basis, cfg.discrete_ends) != (
                ode.basis,
                ode.num_basis,
                ode.discrete_ends,
            ):
                raise ValueError(
                    f"{cfg.model} is odeified with basis {ode.basis}, K = {ode.num_basis}, "
                    f"discrete_ends = {ode.discrete_ends} and is trained as it is: set basis, "
                    "num_basis and discrete_ends to those (or leave them out)"
                )
            student = original
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
            every=cfg.every_batch,
        )
        if sampler.low <= 2 * cfg.discrete_ends:
            raise ValueError(
                f"discrete_ends = {cfg.discrete_ends} needs every step count above "
                f"{2 * cfg.discrete_ends}, but the sampler can draw {sampler.low}; raise low"
            )
    block = ode_lib.get_block(student)
    trainable = {id(block.basis_tensor(name)) for name in block.names}
    for p in student.parameters():
        p.requires_grad_(cfg.train_weights and cfg.train == "full" and id(p) in trainable)
    if cfg.train == "lora":
        from peft import get_peft_model

        config = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, model=student)
        student = get_peft_model(student, config)
    return student.train(), teacher, sampler, kept


def calibration_flops(cost: CostModel, counts: list[int], options: dict, corpus: int) -> float:
    """What ``odeify.calibrate(model, counts, **options)`` costs in matrix-multiply FLOPs: the
    states pass, a linear correction's two forwards over its tokens, and per Adam step the
    original's forward and the N-step forward and backward (to the activations only: the
    weights are frozen, so a factor 2, as for LoRA)."""
    per_batch = options.get("batch_size", 2) * options["seq_len"]
    learned = options.get("learn_gains", True) or options.get("learn_times", True)
    iters = options.get("iters", 100) if learned else 0
    total = cost.forward(per_batch, cost.num_layers)
    for n in counts:
        if options.get("correction") is not None:
            seq = options["seq_len"]
            wanted = math.ceil(options.get("correction_tokens", 32_768) / seq)
            fitted = min(wanted, max(1, corpus // seq)) * seq
            total += cost.forward(fitted, cost.num_layers) + cost.forward(fitted, n)
        total += iters * (cost.forward(per_batch, cost.num_layers) + 2 * cost.forward(per_batch, n))
    return total


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
        self.train(before, extra.get("flops", self.setup_flops), extra.get("seconds", 0.0))
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
        self.num_layers = (
            ode_lib.get_block(original).ode.num_layers
            if is_odeified(original)
            else len(block_stack(original))
        )
        self.setup_data(train_docs, heldout_docs)
        self.student, self.teacher, self.sampler, self.kept_layers = build(
            cfg, original, self.tokens
        )
        del original
        lowest = min(self.counts + self.curve_counts)
        if lowest <= 2 * cfg.discrete_ends:
            raise ValueError(
                f"discrete_ends = {cfg.discrete_ends} needs every step count above "
                f"{2 * cfg.discrete_ends}; eval_steps / curve_steps ask for {lowest}"
            )
        self.weights = LossWeights(cfg.kl, cfg.lm, cfg.hidden, cfg.temperature)
        self.autocast = autocast_dtype(cfg.autocast, self.ctx.device)
        self.setup_schedules()
        self.setup_budget()
        groups = [
            {"params": params, "lr": lr, "weight_decay": 0.0}
            for params, lr in self.schedule_groups()
        ]
        if cfg.train_weights:
            self.optimizer = adamw(self.student, cfg.lr, cfg.weight_decay)
            for group in groups:
                self.optimizer.add_param_group(group)
        else:  # the hypersolver: only the schedules' groups (AdamW without decay is Adam)
            self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
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
        for n, state in extra.get("plans", {}).items():
            self.plans[int(n)].load_state_dict(state)
        # Frozen weights leave DDP nothing to reduce (it refuses such a module); the schedules'
        # gradients are averaged by hand in train_step either way.
        self.model = wrap(self.student, self.ctx) if cfg.train_weights else self.student
        return extra

    def setup_schedules(self) -> None:
        """The schedules trained with the weights (``self.plans``, {N: ParametrisedSchedule}):
        mode ode with ``schedules`` calibrated or stored, one per target count below L; mode drop
        with ``drop_gains``, the M-step one whose gains scale the kept layers' updates. Also
        ``self.setup_flops``, what measuring layers and calibrating cost (in the budget). A
        resumed run calibrates again (the same result: a pure function of config and data),
        then loads its trained schedules from the checkpoint."""
        cfg, block = self.cfg, ode_lib.get_block(self.student)
        cost = CostModel.of(self.teacher)
        self.plans: dict[int, ParametrisedSchedule] = {}
        self.setup_flops, self.calibration = 0.0, {}
        if cfg.mode == "drop":
            if cfg.drop_selection != "uniform":
                self.setup_flops = cost.forward(self.selection_tokens(), self.num_layers)
            if cfg.drop_gains:
                m = cfg.keep_layers
                start = Schedule.from_layers(range(m), m)
                self.plans[m] = ParametrisedSchedule(start, 0, learn_gains=True, learn_times=False)
            return
        if cfg.schedules == "uniform":
            return
        targets = [n for n in self.sampler.choices if n < self.num_layers]
        above = [n for n in self.sampler.choices if n >= self.num_layers]
        if not cfg.train_weights and above:
            raise ValueError(
                f"train_weights: false trains the schedules of counts below L = {self.num_layers}; "
                f"{above} run on the uniform grid with frozen weights and train nothing: drop "
                "them from choices"
            )
        if cfg.schedules == "calibrate":
            options = self.calibrate_options()
            tokens = torch.from_numpy(np.asarray(self.tokens, dtype=np.int64))
            fits = ode_lib.calibrate(
                self.student, targets, tokens, progress=cfg.progress and self.ctx.main, **options
            )
            self.calibration = {
                str(n): {
                    "layers": fit.layers,
                    "kl_first": fit.losses[0] if fit.losses else None,
                    "kl_last": fit.losses[-1] if fit.losses else None,
                    "seconds": round(fit.seconds, 1),
                    "cpu_seconds": round(fit.cpu_seconds, 1),
                    # Per step: relative residual at T = I, of the full fit (and the rank-r one).
                    "residuals": [[round(v, 6) for v in step] for step in fit.residuals],
                    "schedule": fit.schedule.to_dict(),
                }
                for n, fit in fits.items()
            }
            self.setup_flops = calibration_flops(cost, targets, options, len(tokens))
        learn = {"learn_gains": True, "learn_times": True} | {
            k: v for k, v in cfg.calibrate.items() if k in ("learn_gains", "learn_times")
        }
        sequential = resolve_solver("sequential")
        rank = cfg.calibrate.get("correction_rank") or None
        for n in targets:
            start = block.schedule_for(sequential, n, "calibrated")
            self.plans[n] = ParametrisedSchedule(
                start,
                block.ode.discrete_ends,
                learn_gains=cfg.train_schedules and learn["learn_gains"],
                learn_times=cfg.train_schedules and learn["learn_times"],
                learn_correction=cfg.train_schedules and cfg.correction_lr > 0,
                rank=rank,
            )

    def calibrate_options(self) -> dict[str, Any]:
        """odeify.calibrate's options: the config's, over the run's seed and window length."""
        return {"seq_len": self.cfg.seq_len, "seed": self.cfg.seed, **self.cfg.calibrate}

    def selection_tokens(self) -> int:
        """How many tokens the layer-selection pass reads (whole windows, at most the corpus)."""
        cfg = self.cfg
        windows = min(
            math.ceil(cfg.selection_tokens / cfg.seq_len), len(self.tokens) // cfg.seq_len
        )
        return max(1, windows) * cfg.seq_len

    def schedule_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The optimizer groups of the trained schedules: (times and gains, schedule_lr) and
        (correction matrices, correction_lr), the empty ones left out."""
        plans = self.plans.values()
        grid = [p for plan in plans for p in (plan.z, plan.gains) if p.requires_grad]
        matrices = [p for plan in plans for p in plan.matrices() if p.requires_grad]
        groups = [(grid, self.cfg.schedule_lr), (matrices, self.cfg.correction_lr)]
        return [(params, lr) for params, lr in groups if params]

    def schedule_of(self, steps: int) -> Schedule | None:
        """The schedule count ``steps`` trains on now (None: the model's own for it)."""
        plan = self.plans.get(steps)
        return None if plan is None else plan.schedule()

    def store_schedules(self) -> None:
        """Write the schedules as trained so far into the student's ODE settings (what
        evaluation, materialize and save_pretrained use)."""
        block = ode_lib.get_block(self.student)
        for plan in self.plans.values():
            block.store_schedule(plan.final())

    def setup_data(self, train_docs: dict[str, str], heldout_docs: dict[str, str]) -> None:
        cfg = self.cfg
        cache = data.CACHE if cfg.token_cache is None else Path(cfg.token_cache)
        with self.ctx.main_first():  # rank 0 fills the token cache, the others read it
            tokens = data.tokenize(train_docs, self.tokenizer, cache)
            windows = heldout_windows(cfg, heldout_docs, self.tokenizer, cache)
        self.batches = data.Batches(tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
        self.tokens = tokens
        self.windows = windows
        pick = torch.linspace(0, len(windows) - 1, cfg.curve_windows).long().unique()
        self.curve_windows = windows[pick]
        self.counts = default_counts(cfg, self.num_layers, curve=False)
        self.curve_counts = default_counts(cfg, self.num_layers, curve=True)

    def setup_budget(self) -> None:
        cfg = self.cfg
        # Frozen weights (LoRA, the hypersolver) need the activations' gradients through every
        # step but no weight gradients: 2 forwards' worth, not 3.
        weights = cfg.train == "full" and cfg.train_weights
        self.cost = CostModel.of(self.teacher, train_factor=3.0 if weights else 2.0)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        if cfg.max_steps is not None:
            self.total_steps = cfg.max_steps
        else:
            if cfg.budget_flops <= self.setup_flops:
                raise ValueError(
                    f"budget_flops = {cfg.budget_flops:.3g} does not cover measuring layers / "
                    f"calibrating ({self.setup_flops:.3g} FLOPs, counted in the budget): raise it"
                )
            self.total_steps, _ = steps_for_budget(
                cfg.budget_flops - self.setup_flops,
                self.tokens_per_step,
                self.cost,
                self.sampler.draw,
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
        self.store_schedules()
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
                state["plans"] = {str(n): plan.state_dict() for n, plan in self.plans.items()}
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
            self.model,
            targets,
            ids,
            labels,
            counts,
            self.weights,
            cfg.full_weight,
            self.autocast,
            self.schedule_of if self.plans else None,
        )
        del targets
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(
            trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        )
        # Schedule parameters live outside the DDP module, so their gradients are averaged
        # here; they are not clipped with the weights (Adam's steps do not scale with them).
        grads = [
            p.grad for params, _ in self.schedule_groups() for p in params if p.grad is not None
        ]
        for grad in grads:
            grad.copy_(ctx.mean(grad))
        if not trainable and grads:  # the hypersolver: report what trains, unclipped
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _mean_parts(reports, ctx), norm, lr

    # ------------------------------------------------------------------------------ report
    def report(self, before: dict) -> dict[str, Any]:
        cfg, out = self.cfg, self.out
        trainable = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        self.store_schedules()
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
        # With trained schedules, a count that runs on one (materialize folds in its gains).
        check_steps = cfg.keep_layers if cfg.mode == "drop" else min(self.plans, default=half)
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
            "autocast": str(self.autocast or torch.float32).removeprefix("torch."),
            "train_weights": cfg.train_weights,
            "trainable_parameters": trainable,
            "schedule_parameters": sum(
                p.numel()
                for plan in self.plans.values()
                for p in plan.parameters()
                if p.requires_grad
            ),
            "sampler": {**dataclasses.asdict(sampler), "choices": list(sampler.choices)},
            "loss": dataclasses.asdict(self.weights),
            "heldout": cfg.heldout,
            "drop_selection": cfg.drop_selection if cfg.mode == "drop" else None,
            "kept_layers": self.kept_layers,
            "schedules": cfg.schedules if cfg.mode == "ode" else None,
            "calibration": self.calibration,
            "trained_schedules": {str(n): p.final().to_dict() for n, p in self.plans.items()},
            "setup_flops": self.setup_flops,
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
        gains = ", learned gains" if cfg.drop_gains else ""
        chosen = {
            "uniform": "(a) layer dropping",
            "block_influence": "(a') Block Influence layers",
            "angular": "(a'') angular-distance block removed",
        }[cfg.drop_selection]
        return f"{chosen} to M = {cfg.keep_layers}{gains}, then distillation at M{how}"
    anchor = f", N = L every {sampler.full_every}" if sampler.full_every else ""
    drawn = (
        "{" + ", ".join(map(str, sampler.choices)) + "}"
        if sampler.choices
        else f"[{sampler.low}, {sampler.high}]"
    )
    mix = "every batch" if sampler.every else sampler.weighting
    ends = f", {cfg.discrete_ends} discrete at each end" if cfg.discrete_ends else ""
    if cfg.schedules == "uniform":
        name, plan = "depth adaptation", ""
    else:
        where = (
            f"calibrated ({cfg.calibrate.get('init', 'dp')})"
            if cfg.schedules == "calibrate"
            else "stored"
        )
        name = "depth adaptation v2" if cfg.train_weights else "hypersolver"
        plan = f"{where} schedules{', trained' if cfg.train_schedules else ''}; "
        if not cfg.train_weights:
            plan += "weights frozen; "
    return (
        f"{name} ({plan}{cfg.basis} K = {cfg.num_basis or sampler.num_layers}{ends}, N in "
        f"{drawn} {mix}{anchor}{how})"
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
