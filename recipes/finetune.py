"""Fine-tune a pretrained or odeified model: continuous LoRA, LoRA on materialised layers, full
fine-tuning, and step-adjusted fine-tuning (the adaptive fine-tuning of the ICLR 2025 paper
"Neural ODE Transformers").

    python recipes/finetune.py --config recipes/configs/lora-smollm2-shakespeare.yaml
    python recipes/finetune.py --config ... --set max_steps=50 --set out_dir=runs/try
    python recipes/finetune.py --config ... --resume          # continue the run in out_dir
    torchrun --nproc_per_node=2 recipes/finetune.py --config ...   # DDP

Features:
- Model: ``smollm2`` (the bundled SmolLM2-135M-Instruct), a transformers folder, or a folder
  written by ``odeify.save_pretrained`` / ``recipes/pretrain.py`` (an odeified model, trained at
  any step count). Plain models are odeified with ``basis`` / ``num_basis`` when the form needs it.
- Form: ``continuous`` trains the ODE model itself (its LoRA update is a function of t, so the
  result runs at any step count); ``discrete`` materialises it to ``materialize_steps`` = M
  stock layers first and trains those (the paper's way); ``original`` trains the model without
  any conversion (the baseline).
- Method: ``lora`` (peft; continuous LoRA through ``odeify.lora_config``, per-layer LoRA on
  stock layers; ``lora_r``, ``lora_alpha``, ``lora_targets``, optionally starting from a saved
  adapter ``init_adapter``) or ``full`` (every parameter).
- Step-adjusted fine-tuning: ``train_steps: [M]`` trains the continuous model at M solver
  steps, ``train_steps: [a, b, c]`` draws one per batch (a pure function of seed and step);
  a discrete model is trained at its M layers.
- Data: a corpus spec (``shakespeare``, ``shakespeare:hamlet,...``, a text file or folder,
  ``hf:NAME``), the ``heldout`` documents (e.g. plays) removed from training and used for
  validation, tokenised once into cached memmaps; batches are a pure function of (seed, step).
- Training: AdamW (decay on matrices only), linear warmup + cosine decay, gradient clipping,
  gradient accumulation, seeds, optional activation checkpointing, a progress bar.
- Distributed: under torchrun, DDP (gloo on CPU, NCCL on GPU): each process trains on its
  share of every batch, in ``grad_accum`` equal micro-batches (``batch_size`` must split into
  processes x ``grad_accum``; any ``grad_accum`` trains on the same batches) and
  scores its share of the validation windows; the first writes checkpoints, metrics and outputs.
- Evaluation: validation perplexity before and after training at several solver step counts
  (``eval_steps``, default L/2, L, 3L/2). A discrete or original model is evaluated through
  ``odeify`` of it (LoRA merged): exact at its own depth, retargeted at the others.
- Outputs in ``out_dir``: ``adapter/`` (peft, adapter only) or ``model/``, ``metrics.jsonl``,
  ``summary.json`` (perplexities, trainable parameters, adapter size, seconds per step, peak
  memory), ``perplexity.png``; checkpoints (atomic, keep-last-N, trainable tensors only for
  LoRA) that ``--resume`` continues exactly.
- Errors before any training: unknown config keys, bad option values, held-out documents not
  in the corpus, LoRA targets that match nothing (naming the matrices that exist), a rank
  larger than a weight, an adapter saved for another base model, a run folder from another
  config (or a run there and no ``--resume``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import odeify as ode_lib
from odeify.atomic import replace_folder, write_text
from odeify.loading import load_with_tokenizer
from odeify.lora import load_adapter, lora_config
from odeify.surgery import is_odeified
from odeify.train import data
from odeify.train.checkpoints import Checkpoints, finished
from odeify.train.config import config_stamp, launch
from odeify.train.distributed import sync, wrap
from odeify.train.evaluate import sweep
from odeify.train.optim import adamw, seed_everything, warmup_cosine
from odeify.train.plots import plot_sweep
from odeify.train.run import open_run
from odeify.train.sampler import StepSampler

FORMS = ("continuous", "discrete", "original")
METHODS = ("lora", "full")
# Keys that change what a run prints, not what it computes: a resume may change them.
_PRESENTATION = ("progress", "threads")


@dataclass
class Config:
    """Every option of the recipe; YAML files and ``--set key=value`` fill it."""

    # model
    model: str = "smollm2"  # 'smollm2', a transformers folder, or an odeified folder
    tokenizer: str | None = None  # None: the model's own; 'gpt2' (offline BPE) or a folder
    form: str = "continuous"  # 'continuous', 'discrete' (materialise to M layers), 'original'
    method: str = "lora"  # 'lora' or 'full'
    materialize_steps: int | None = None  # M of the discrete form (None: L)
    train_steps: list[int] = field(default_factory=list)  # continuous: [] = L, [M], or a set
    basis: str = "hat"  # conversion of a plain model (continuous and discrete forms)
    num_basis: int | None = None
    # LoRA
    lora_r: int = 8
    lora_alpha: float | None = None  # None: 2 r
    lora_targets: list[str] | str = "all-linear"
    init_adapter: str | None = None  # start from a saved adapter of this base
    # data
    corpus: str = "shakespeare"
    heldout: list[str] = field(default_factory=lambda: ["hamlet", "macbeth", "othello"])
    token_cache: str | None = None  # None: ~/.cache/odeify/tokens
    # optimisation
    seq_len: int = 256
    batch_size: int = 4  # sequences per optimizer step
    grad_accum: int = 1
    max_steps: int = 150
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    activation_checkpointing: bool = False
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads; None: torch's default
    # evaluation, checkpoints, output
    eval_steps: list[int] | None = None  # None: L/2, L, 3L/2
    eval_windows: int = 32  # validation windows, spread over the held-out documents
    eval_batch_size: int = 4
    save_every: int = 50
    keep: int = 2
    out_dir: str = "runs/finetune"
    progress: bool = True


# ------------------------------------------------------------------------------------ config
def validate(cfg: Config, world: int = 1) -> None:
    """Every check that needs no model and no data, so a bad config fails at once."""
    problems = []
    if cfg.form not in FORMS:
        problems.append(f"form must be one of {FORMS}, got {cfg.form!r}")
    if cfg.method not in METHODS:
        problems.append(f"method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.train_steps and cfg.form != "continuous":
        problems.append(
            f"train_steps needs form: continuous; a {cfg.form} model has a fixed depth "
            "(set materialize_steps for the discrete form)"
        )
    if cfg.materialize_steps is not None and cfg.form != "discrete":
        problems.append("materialize_steps is the depth of the discrete form; set form: discrete")
    counts = {
        "train_steps": cfg.train_steps,
        "eval_steps": cfg.eval_steps or [],
        "materialize_steps": [] if cfg.materialize_steps is None else [cfg.materialize_steps],
    }
    for name, values in counts.items():
        if not isinstance(values, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in values
        ):
            problems.append(f"{name} must hold integers >= 1, got {getattr(cfg, name)!r}")
    if cfg.init_adapter is not None and cfg.method != "lora":
        problems.append("init_adapter needs method: lora")
    if cfg.grad_accum < 1 or cfg.batch_size % (world * cfg.grad_accum):
        problems.append(
            f"batch_size {cfg.batch_size} does not split into {world} process(es) x grad_accum "
            f"{cfg.grad_accum} equal micro-batches"
        )
    for name in ("max_steps", "seq_len", "eval_windows", "eval_batch_size", "save_every", "keep"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.warmup_steps <= cfg.max_steps:
        problems.append(f"warmup_steps must be in [0, max_steps], got {cfg.warmup_steps}")
    if not cfg.heldout:
        problems.append("heldout must name the validation documents (e.g. plays)")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------- model
def load_base(cfg: Config) -> tuple[nn.Module, Any]:
    """The model named by ``cfg.model`` and its tokenizer (``cfg.tokenizer`` overrides it)."""
    model, tokenizer, _ = load_with_tokenizer(cfg.model, cfg.tokenizer)
    return model.train(), tokenizer


def depth(model: nn.Module) -> int:
    """L: the ODE's depth, or a stock model's number of layers."""
    if is_odeified(model):
        return ode_lib.get_block(model).ode.num_layers
    return model.config.num_hidden_layers


def prepare(cfg: Config, base: nn.Module) -> nn.Module:
    """The model to train: the base in the configured form, with LoRA or all parameters trainable.

    Example:
        >>> model = prepare(Config(form="discrete", materialize_steps=15), smollm2)   # doctest: +SKIP
        >>> model.print_trainable_parameters()                                        # doctest: +SKIP
    """
    if cfg.form == "original":
        if is_odeified(base):
            raise ValueError(
                f"form: original trains a model without conversion, but {cfg.model} is "
                "odeified; use form: continuous or discrete"
            )
        model = base
    else:
        model = (
            base
            if is_odeified(base)
            else ode_lib.odeify(base, basis=cfg.basis, num_basis=cfg.num_basis, progress=False)
        )
        if cfg.form == "discrete":
            model = ode_lib.materialize(model, steps=cfg.materialize_steps or depth(model))
    if cfg.activation_checkpointing:
        if is_odeified(model):
            ode_lib.get_block(model).ode.checkpoint_steps = True
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    if cfg.method == "full":
        return model.requires_grad_(True).train()
    if cfg.init_adapter is not None:
        return load_adapter(model, cfg.init_adapter, is_trainable=True).train()
    from peft import get_peft_model

    config = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, model=model)
    return get_peft_model(model, config).train()


def as_ode(model: nn.Module, cfg: Config) -> nn.Module:
    """An ODE view of a trained model for evaluation at any step count: the model itself in the
    continuous form, else the (LoRA-merged) stock model odeified with the hat basis, exact at
    its own depth. Consumes ``model`` in the discrete and original forms."""
    if cfg.form == "continuous":
        return model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return ode_lib.odeify(model, progress=False)


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied ones counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -------------------------------------------------------------------------------------- data
def validation_windows(cfg: Config, docs: dict[str, str], tokenizer, cache) -> torch.Tensor:
    """``eval_windows`` windows of ``seq_len`` tokens, an equal share from each held-out document
    (from its start), so every document counts."""
    share = math.ceil(cfg.eval_windows / len(docs))
    parts = [
        data.windows(data.tokenize({name: text}, tokenizer, cache), cfg.seq_len, share)
        for name, text in sorted(docs.items())
    ]
    return torch.cat(parts)[: cfg.eval_windows]


# -------------------------------------------------------------------------------- evaluation
def _median(values: list[float]) -> float | None:
    # The first step of a run pays for allocations; the median ignores such outliers. On a
    # shared machine wall time includes waiting for a core; process CPU time does not.
    return statistics.median(values[1:] or values) if values else None


def _reset_peak_rss() -> bool:
    # Linux: writing 5 to clear_refs resets VmHWM, so the peak covers training alone.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """The process's peak resident memory (since the last reset, on Linux) in MiB."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sampler(cfg: Config, num_layers: int) -> StepSampler:
    """Solver steps of the continuous model per optimizer step: L without ``train_steps``, else
    one of them, uniformly, a pure function of (seed, step); a discrete model runs its layers."""
    if not cfg.train_steps:
        return StepSampler(num_layers, num_layers, num_layers, draws=0, seed=cfg.seed)
    choices = tuple(cfg.train_steps)
    low, high = min(choices), max(choices)
    return StepSampler(
        num_layers, low, high, weighting="uniform", full_every=0, seed=cfg.seed, choices=choices
    )


# ------------------------------------------------------------------------------------- recipe
class Finetune:
    """The recipe in phases: :meth:`setup` (run folder, model, data, optimizer), :meth:`train`,
    :meth:`evaluate` (before and after), :meth:`report`; :meth:`run` calls them in turn.

    Under torchrun each rank trains on its share of every micro-batch (DDP) and scores its share
    of the validation windows; rank 0 writes checkpoints, metrics and outputs.

    Example:
        >>> cfg = load_config(Config, "recipes/configs/lora-smollm2-shakespeare.yaml")   # doctest: +SKIP
        >>> Finetune(cfg).run()["perplexity_after"]                                       # doctest: +SKIP
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.checkpoints = Checkpoints(
            self.out / "checkpoints",
            config_stamp(cfg, _PRESENTATION),
            keep=cfg.keep,
            trainable_only=cfg.method == "lora",
        )

    def check(self) -> None:
        """Every check of the config that needs no data and no model (one process)."""
        validate(self.cfg)

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Fine-tune as configured; returns the summary also written to ``out_dir/summary.json``."""
        done = finished(self.checkpoints, self.out / "summary.json", resume)
        if done is not None:
            return done
        extra = self.setup(resume)
        before = {int(k): v for k, v in extra.get("before", {}).items()}
        if not before:
            # A copy: the discrete and original views merge and odeify what they are given.
            view = (
                self.raw
                if self.cfg.form == "continuous"
                else as_ode(copy.deepcopy(self.raw), self.cfg)
            )
            before = self.evaluate(view)
            del view
            self.metrics.log(event="before", perplexity={str(k): v for k, v in before.items()})
        timing = self.train(before)
        return self.report(before, timing)

    # ------------------------------------------------------------------------------- setup
    def prepare(self, base: nn.Module) -> nn.Module:
        """The model to train, from the loaded base: :func:`prepare` (a subclass may train
        another form)."""
        return prepare(self.cfg, base)

    def setup(self, resume: bool) -> dict:
        """Everything before training; returns the resumed checkpoint's extra state."""
        cfg = self.cfg
        run = open_run(self.out, self.checkpoints, resume, lambda world: validate(cfg, world))
        self.ctx, self.metrics = run.ctx, run.metrics
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        train_docs, valid_docs = data.split(data.corpus(cfg.corpus), cfg.heldout, spec=cfg.corpus)
        base, self.tokenizer = load_base(cfg)
        self.raw = self.prepare(base)
        del base  # the discrete form trains a materialised copy: the ODE model can go
        self.num_layers = depth(self.raw)
        self.sampler = sampler(cfg, self.num_layers)
        layers = self.num_layers
        self.counts = cfg.eval_steps or sorted({max(1, layers // 2), layers, 3 * layers // 2})
        self.setup_data(train_docs, valid_docs)
        self.optimizer = adamw(self.raw, cfg.lr, cfg.weight_decay)
        self.schedule = warmup_cosine(
            self.optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio
        )
        self.start, extra = (
            self.checkpoints.resume(self.raw, self.optimizer, self.schedule) if resume else (0, {})
        )
        self.model = wrap(self.raw, self.ctx)
        return extra

    def setup_data(self, train_docs: dict[str, str], valid_docs: dict[str, str]) -> None:
        cfg = self.cfg
        cache = data.CACHE if cfg.token_cache is None else Path(cfg.token_cache)
        with self.ctx.main_first():  # rank 0 fills the token cache, the others read it
            tokens = data.tokenize(train_docs, self.tokenizer, cache)
            self.windows = validation_windows(cfg, valid_docs, self.tokenizer, cache)
        self.batches = data.Batches(tokens, cfg.batch_size, cfg.seq_len, cfg.seed)

    # ------------------------------------------------------------------------------- train
    def train(self, before: dict[int, float]) -> dict[str, Any]:
        """The optimizer steps; returns their median times and the peak memory."""
        cfg = self.cfg
        _reset_peak_rss()
        durations, cpu_durations = [], []
        bar = tqdm(
            range(self.start, cfg.max_steps),
            initial=self.start,
            total=cfg.max_steps,
            desc=f"{cfg.form} {cfg.method}",
            disable=not (cfg.progress and self.ctx.main),
        )
        self.model.train()
        for step in bar:
            began, began_cpu = time.perf_counter(), time.process_time()
            n = self.sampler.draw(step)[0]
            loss, lr = self.train_step(step, n)
            durations.append(time.perf_counter() - began)
            cpu_durations.append(time.process_time() - began_cpu)
            self.metrics.log(
                step=step + 1,
                loss=loss,
                lr=lr,
                steps=n,
                seconds=durations[-1],
                cpu_seconds=cpu_durations[-1],
            )
            bar.set_postfix(loss=f"{loss:.3f}", N=n)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
                saved_before = {str(k): v for k, v in before.items()}
                if self.ctx.main:
                    self.checkpoints.save(
                        step + 1, self.raw, self.optimizer, self.schedule, {"before": saved_before}
                    )
        bar.close()
        return {
            "seconds_per_step": _median(durations),
            "cpu_seconds_per_step": _median(cpu_durations),
            "peak": peak_rss_mib(),
        }

    def train_step(self, step: int, n: int) -> tuple[float, float]:
        """One optimizer step, ``grad_accum`` micro-batches of this rank's rows, at ``n`` solver
        steps: (loss averaged over ranks, learning rate used)."""
        cfg, ctx, model = self.cfg, self.ctx, self.model
        loss_sum = 0.0
        # The rows of batch ``step`` in equal slices: any grad_accum trains on the same batch.
        inputs, targets = self.batches.get(step, ctx.rank, ctx.world)
        size = len(inputs) // cfg.grad_accum
        for micro in range(cfg.grad_accum):
            x, y = (t[micro * size : (micro + 1) * size] for t in (inputs, targets))
            with sync(model, micro == cfg.grad_accum - 1):
                if cfg.form == "continuous":
                    with ode_lib.steps(model, n):
                        logits = model(x, use_cache=False).logits
                else:
                    logits = model(x, use_cache=False).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.grad_clip
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(ctx.mean(torch.tensor(loss_sum, dtype=torch.float64))), lr

    # ---------------------------------------------------------------------------- evaluate
    def evaluate(self, model: nn.Module) -> dict[int, float]:
        """{steps: validation perplexity} of an ODE model, the windows split over ranks."""
        scores = sweep(
            model,
            self.windows,
            self.counts,
            self.cfg.eval_batch_size,
            dist=self.ctx,
            progress=self.cfg.progress and self.ctx.main,
        )
        return scores.perplexity()

    # ------------------------------------------------------------------------------ report
    def report(self, before: dict[int, float], timing: dict[str, Any]) -> dict[str, Any]:
        cfg, out, model = self.cfg, self.out, self.raw
        trainable, total = trainable_count(model)
        summary: dict[str, Any] = {
            "form": cfg.form,
            "method": cfg.method,
            "depth": self.num_layers,
            "train_steps": cfg.train_steps
            or ([self.num_layers] if cfg.form == "continuous" else []),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "optimizer_steps": cfg.max_steps,
            "tokens_per_step": cfg.batch_size * cfg.seq_len,
            "seconds_per_step": timing["seconds_per_step"],
            "cpu_seconds_per_step": timing["cpu_seconds_per_step"],
            "peak_memory_mib": round(timing["peak"], 1),
            "threads": torch.get_num_threads(),
        }
        if self.ctx.main:
            summary.update(self.save_outputs(model))
        after = self.evaluate(as_ode(model, cfg))
        self.metrics.log(event="after", perplexity={str(k): v for k, v in after.items()})
        summary["perplexity_before"] = {str(k): v for k, v in before.items()}
        summary["perplexity_after"] = {str(k): v for k, v in after.items()}
        summary["eval_tokens"] = int(self.windows.numel())
        if self.ctx.main:
            self.plot(before, after)
            if cfg.progress:
                self.print_table(before, after, summary)
            write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")  # last: done
        self.ctx.barrier()
        return summary

    def save_outputs(self, model: nn.Module) -> dict[str, Any]:
        """``adapter/`` (LoRA) or ``model/``; returns the adapter's size for the summary."""
        out = self.out
        if self.cfg.method == "lora":
            with replace_folder(out / "adapter", overwrite=True) as tmp:
                model.save_pretrained(tmp)
            return {"adapter_bytes": (out / "adapter" / "adapter_model.safetensors").stat().st_size}
        if is_odeified(model):
            ode_lib.save_pretrained(model, out / "model", tokenizer=self.tokenizer, overwrite=True)
        else:
            with replace_folder(out / "model", overwrite=True) as tmp:
                model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
        return {}

    def plot(self, before: dict[int, float], after: dict[int, float]) -> None:
        cfg = self.cfg
        label = f"{cfg.form} {cfg.method}"
        if cfg.form == "discrete":
            label += f" (M = {cfg.materialize_steps or self.num_layers})"
        elif cfg.train_steps:
            label += f" (trained at N in {cfg.train_steps})"
        plot_sweep(
            {"before": before, f"after {cfg.max_steps} steps": after},
            self.out / "perplexity.png",
            f"{label}: validation perplexity ({', '.join(cfg.heldout)})",
        )

    def print_table(self, before: dict, after: dict, summary: dict) -> None:
        print(f"{'steps N':>8} {'before':>12} {'after':>12}")
        for n in self.counts:
            print(f"{n:>8} {before[n]:>12.2f} {after[n]:>12.2f}")
        speed = summary["seconds_per_step"]
        print(
            f"trainable {summary['trainable_parameters']:,} of {summary['total_parameters']:,} "
            f"parameters; {'-' if speed is None else f'{speed:.2f}'} s/step; peak memory "
            f"{summary['peak_memory_mib']:,.0f} MiB; outputs in {self.out}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    description = (
        "Fine-tune an odeified (or plain) model: continuous or discrete LoRA, full, step-adjusted."
    )
    return launch(Finetune, Config, argv, description)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(0 if main() else 1)
