"""Pretrain a DiffEqFormer (ICLR 2025, "Neural ODE Transformers") or its discrete baseline.

    python recipes/pretrain.py --config recipes/configs/shakespeare-tiny.yaml
    python recipes/pretrain.py --config recipes/configs/shakespeare-tiny.yaml --set ode=false
    torchrun --nproc_per_node=8 recipes/pretrain.py --config recipes/configs/owt-small.yaml
    python recipes/pretrain.py --config ... --resume          # continue the run in out_dir

Features:
- Model: a fresh transformers GPT-2 (tied embeddings) or Llama config, odeified through the
  library path conversions use, ``odeify(model, basis="fourier", init="random")``: the
  paper's parallel field with Euler steps, one learned time unit per weight group (S =
  ``time_features``, E = ``time_directions``, unit width ``time_hidden``), norms starting at the
  identity, biases at zero. ``ode: false`` trains the same config without odeify (the
  baseline). Parameter counts of both are printed.
- Data: a corpus spec (``shakespeare``, ``shakespeare:hamlet,...``, a text, ``.jsonl`` file or
  folder, ``hf:NAME[:CONFIG[:SPLIT]]``, streamed), held-out documents (``heldout``: e.g. a few
  plays) or a held-out fraction, each split streamed once through ``data_workers`` tokenising
  processes into cached token shards (``odeify.train.shards``; rank 0 prepares, the others wait)
  read a window at a time (constant memory); GPT-2 BPE or any tokenizer folder. Batches are a pure function of
  (seed, step).
- Training: AdamW with weight decay on matrices only (norms, biases, time units excluded),
  linear warmup + cosine decay, gradient clipping, gradient accumulation, bf16 autocast where
  the device supports it (``precision: auto``), optional ``torch.compile``, per-step activation
  checkpointing, seeds; optional step-count augmentation (a random number of solver steps per
  batch, drawn from ``step_augmentation: [min, max]``) so the model is retargetable.
- Distributed: under torchrun, DDP by default or FSDP2 (``fully_shard``) with
  ``distributed: fsdp``; gloo on CPU, NCCL on GPU. The global batch is split over ranks, so
  the loss curve does not depend on the number of processes.
- Evaluation: validation loss and perplexity at several solver step counts (default L/2, L,
  2L) every ``eval_every`` steps; at the end a table and a PNG of perplexity against steps.
- Checkpoints: atomic, model + optimizer + scheduler + step (= data position) + RNG state,
  keep-last-N; ``--resume`` continues exactly where the run stopped, also after SIGKILL; the
  final model is exported in the odeify save format (``odeify.from_pretrained``).
- Feedback: a progress bar with loss and tokens/s; ``metrics.jsonl`` in the run folder.
- Errors before any work: unknown config keys, a missing dataset, a run folder from another
  config (or with a run in it and no ``--resume``), a batch that does not fit the context or
  does not split over processes and accumulation steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

import odeify as ode_lib
from odeify.atomic import replace_folder, write_text
from odeify.surgery import block_stack
from odeify.train import data, shards
from odeify.train.checkpoints import Checkpoints, finished
from odeify.train.config import config_stamp, launch
from odeify.train.data import load_tokenizer
from odeify.train.distributed import (
    StateView,
    full_state,
    full_tensor,
    sync,
    wrap,
)
from odeify.train.evaluate import sweep
from odeify.train.optim import adamw, seed_everything, warmup_cosine
from odeify.train.plots import plot_sweep
from odeify.train.run import open_run
from odeify.train.sampler import StepSampler

# Keys that change what a run prints, not what it computes: a resume may change them.
_PRESENTATION = ("progress", "log_every", "data_workers")


@dataclass
class Config:
    """Every option of the recipe; YAML files and ``--set key=value`` fill it."""

    # model
    family: str = "gpt2"  # 'gpt2' or 'llama'
    ode: bool = True  # False: the discrete baseline of the same config
    d_model: int = 128
    n_layer: int = 4  # L: the baseline's depth and the ODE's default step count
    n_head: int = 4
    n_kv_head: int | None = None  # llama: grouped-query attention (None: n_head)
    d_ff: int | None = None  # None: 4 d (gpt2), 8 d / 3 rounded up to 64 (llama)
    context: int = 256  # positions the model holds
    dropout: float = 0.0
    time_directions: int = 20  # E: W(t) = P_0 + sum_e g_e(t) P_e, K = E + 1
    time_features: int = 128  # S: sinusoidal features of t
    time_hidden: int = 64  # width of the time unit's hidden layer
    scheme: str = "euler"  # the paper's parallel field
    # data
    corpus: str = "shakespeare"
    tokenizer: str = "gpt2"  # 'gpt2' (offline BPE), 'char' (the corpus's characters) or a folder
    heldout: list[str] = field(default_factory=list)  # held-out document names, e.g. plays
    heldout_fraction: float = 0.05  # without names: this share of the documents
    token_cache: str | None = None  # None: ~/.cache/odeify/tokens
    data_workers: int = 1  # processes that tokenise the corpus into shards (once, then cached)
    # optimisation
    seq_len: int = 128
    batch_size: int = 16  # global, in sequences per optimizer step
    grad_accum: int = 1
    max_steps: int = 200
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    precision: str = "auto"  # 'auto' (bf16 on GPUs that have it), 'fp32', 'bf16'
    compile: bool = False
    activation_checkpointing: bool = False
    step_augmentation: list[int] | None = None  # [min, max] solver steps per batch
    seed: int = 0
    distributed: str = "ddp"  # under torchrun: 'ddp' or 'fsdp'
    # evaluation, checkpoints, output
    eval_every: int = 50
    eval_steps: list[int] | None = None  # None: [L/2, L, 2L]
    eval_windows: int = 64  # validation windows per periodic evaluation
    eval_batch_size: int = 8
    final_steps: list[int] | None = None  # None: eval_steps
    final_windows: int | None = None  # None: the whole validation split
    out_dir: str = "runs/pretrain"
    save_every: int = 100
    keep: int = 2
    export: bool = True
    log_every: int = 1
    progress: bool = True


# ------------------------------------------------------------------------------------ config
def resolved_eval_steps(cfg: Config) -> list[int]:
    """The solver step counts evaluated each time: L/2, L, 2L unless configured (L alone without odeify)."""
    if not cfg.ode:
        return [cfg.n_layer]
    if cfg.eval_steps:
        return list(cfg.eval_steps)
    return sorted({max(1, cfg.n_layer // 2), cfg.n_layer, 2 * cfg.n_layer})


def validate(cfg: Config, world: int) -> None:
    """Every check that needs no data and no model, so a bad config fails at once."""
    problems = []
    if cfg.family not in ("gpt2", "llama"):
        problems.append(f"family must be 'gpt2' or 'llama', got {cfg.family!r}")
    if cfg.seq_len > cfg.context:
        problems.append(
            f"a batch of seq_len {cfg.seq_len} does not fit the model's context of {cfg.context} "
            "positions: lower seq_len or raise context"
        )
    if cfg.grad_accum < 1 or cfg.batch_size % (world * cfg.grad_accum):
        problems.append(
            f"batch_size {cfg.batch_size} does not split into {world} process(es) x grad_accum "
            f"{cfg.grad_accum} equal micro-batches"
        )
    if cfg.precision not in ("auto", "fp32", "bf16"):
        problems.append(f"precision must be 'auto', 'fp32' or 'bf16', got {cfg.precision!r}")
    if cfg.distributed not in ("ddp", "fsdp"):
        problems.append(f"distributed must be 'ddp' or 'fsdp', got {cfg.distributed!r}")
    aug = cfg.step_augmentation
    if aug is not None:
        if not cfg.ode:
            problems.append("step_augmentation needs ode: true (the baseline has a fixed depth)")
        if not (
            isinstance(aug, list)
            and len(aug) == 2
            and all(isinstance(a, int) and a >= 1 for a in aug)
            and aug[0] <= aug[1]
        ):
            problems.append(f"step_augmentation must be [min, max] with 1 <= min <= max, got {aug}")
    for name in ("eval_steps", "final_steps"):
        counts = getattr(cfg, name)
        if counts is not None and not all(isinstance(n, int) and n >= 1 for n in counts):
            problems.append(f"{name} must be a list of integers >= 1, got {counts}")
    names = ("max_steps", "eval_every", "save_every", "keep", "log_every", "n_layer")
    for name in (*names, "time_directions", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.warmup_steps <= cfg.max_steps:
        problems.append(f"warmup_steps must be in [0, max_steps], got {cfg.warmup_steps}")
    if not cfg.heldout and not 0 < cfg.heldout_fraction < 1:
        problems.append(f"heldout_fraction must be in (0, 1), got {cfg.heldout_fraction}")
    if cfg.tokenizer not in ("gpt2", "char") and not Path(cfg.tokenizer).is_dir():
        problems.append(f"tokenizer {cfg.tokenizer!r} is neither 'gpt2', 'char' nor a folder")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


# -------------------------------------------------------------------------------------- data
# ------------------------------------------------------------------------------------- model
def model_config(cfg: Config, tokenizer):
    """The transformers config both models share."""
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    if cfg.family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab,
            n_positions=cfg.context,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.d_ff,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=eos,
            eos_token_id=eos,
            tie_word_embeddings=True,
        )
    from transformers import LlamaConfig

    d_ff = cfg.d_ff or 64 * math.ceil(8 * cfg.d_model / 3 / 64)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.d_model,
        intermediate_size=d_ff,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head,
        max_position_embeddings=cfg.context,
        attention_dropout=cfg.dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
    )


def build_model(cfg: Config, hf_config, ode: bool, init: str = "random") -> nn.Module:
    """A fresh model: the baseline, or it odeified into a DiffEqFormer (``init='none'`` only
    allocates, for counting parameters on the meta device).

    Example:
        >>> model = build_model(Config(d_model=32, n_head=2), model_config(Config(), tok), True)   # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config))
    if ode:
        ode_lib.odeify(
            model,
            basis="fourier",
            num_basis=cfg.time_directions + 1,
            basis_kwargs={"features": cfg.time_features, "hidden": cfg.time_hidden},
            scheme=cfg.scheme,
            init=init,
            checkpoint_steps=cfg.activation_checkpointing,
            progress=False,
        )
    elif cfg.activation_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters (tied ones once) and those outside the token and position embeddings."""
    embeddings = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
    }
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "non_embedding": sum(p.numel() for p in params if id(p) not in embeddings),
    }


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sampler(cfg: Config) -> StepSampler | None:
    """The step-count augmentation: one count per step from ``step_augmentation`` = [min, max],
    uniformly; None without augmentation (every step at the model's L)."""
    if cfg.step_augmentation is None:
        return None
    low, high = cfg.step_augmentation
    return StepSampler(cfg.n_layer, low, high, weighting="uniform", full_every=0, seed=cfg.seed)


# ---------------------------------------------------------------------------------- the run
class Pretrain:
    """The recipe in phases: :meth:`setup` (run folder, data, model, optimizer), :meth:`train`,
    :meth:`evaluate`, :meth:`report`; :meth:`run` calls them in turn.

    Example:
        >>> summary = Pretrain(load_config(Config, "recipes/configs/shakespeare-tiny.yaml")).run()   # doctest: +SKIP
        >>> summary["final"]["perplexity"]                                                          # doctest: +SKIP
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.name = "DiffEqFormer" if cfg.ode else "baseline"
        self.out = Path(cfg.out_dir)
        self.checkpoints = Checkpoints(
            self.out / "checkpoints", config_stamp(cfg, _PRESENTATION), keep=cfg.keep
        )

    def check(self) -> None:
        """Every check of the config that needs no data and no model (one process)."""
        validate(self.cfg, world=1)

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train as configured; returns the summary also written to ``out_dir/summary.json``."""
        done = finished(self.checkpoints, self.out / "summary.json", resume)
        if done is not None:
            return done
        self.setup(resume)
        self.train()
        final = self.evaluate(self.val_final, self.final_counts)
        return self.report(final)

    # ------------------------------------------------------------------------------- setup
    def setup(self, resume: bool) -> None:
        cfg = self.cfg
        run = open_run(self.out, self.checkpoints, resume, lambda world: validate(cfg, world))
        self.ctx, self.metrics, self.start = run.ctx, run.metrics, run.start
        if cfg.ode and cfg.precision == "bf16" and run.ctx.device.type == "cpu":
            # ODEBlock.weights_at runs under autocast, so W(t) of the norms comes out in bf16 and
            # CPU layer_norm refuses bf16 parameters with fp32 inputs (CUDA casts both to fp32).
            raise ValueError(
                "precision bf16 on CPU is not supported for the ODE model: use fp32 (precision: "
                "auto does) or a GPU"
            )
        self.setup_data()
        self.setup_model()
        self.announce()

    def setup_data(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        docs = data.Documents(cfg.corpus)
        self.split = data.Split(docs.names(), cfg.heldout, cfg.heldout_fraction, cfg.corpus)
        self.tokenizer = load_tokenizer(cfg.tokenizer, docs)
        cache = data.CACHE if cfg.token_cache is None else Path(cfg.token_cache)
        # Rank 0 prepares (or finds) the shards; the others wait for it, then only read them.
        with ctx.main_first():
            shown = ctx.main and cfg.progress
            self.train_tokens, self.val_tokens = (
                shards.cached(docs, self.tokenizer, part, cache, cfg.data_workers, shown)
                for part in (self.split.train, self.split.held)
            )
        self.batches = data.Batches(self.train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
        val_all = data.windows(self.val_tokens, cfg.seq_len + 1)
        windows_each = min(cfg.eval_windows, len(val_all))
        if windows_each < ctx.world:
            raise ValueError(
                f"the validation split makes {len(val_all)} windows of {cfg.seq_len + 1} tokens, "
                f"fewer than the {ctx.world} processes; hold out more text"
            )
        # Equal shares per rank: a sharded model needs every rank in every forward.
        even = lambda w: w[: len(w) // ctx.world * ctx.world]
        self.val_periodic = even(val_all[:windows_each])
        self.val_final = even(
            val_all if cfg.final_windows is None else val_all[: cfg.final_windows]
        )
        self.eval_counts = resolved_eval_steps(cfg)
        self.final_counts = (
            sorted(set(cfg.final_steps or self.eval_counts)) if cfg.ode else self.eval_counts
        )
        self.sampler = sampler(cfg)

    def setup_model(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.hf_config = model_config(cfg, self.tokenizer)
        with torch.device("meta"):
            self.counts = {
                "diffeqformer": parameter_counts(build_model(cfg, self.hf_config, True, "none")),
                "baseline": parameter_counts(build_model(cfg, self.hf_config, False)),
            }
        # Every rank builds the same initial model (DDP would broadcast it anyway; FSDP needs it).
        seed_everything(cfg.seed)
        raw = build_model(cfg, self.hf_config, cfg.ode).to(ctx.device)
        raw.train()
        shard = None
        if cfg.distributed == "fsdp":
            # One shard group per block (the ODE model has one block), then the embeddings and head.
            shard = [ode_lib.get_block(raw)] if cfg.ode else list(block_stack(raw))
        self.model = wrap(raw, ctx, shard=shard, compile=cfg.compile)
        betas = (cfg.beta1, cfg.beta2)
        self.optimizer = adamw(self.model, cfg.lr, cfg.weight_decay, betas=betas)
        self.scheduler = warmup_cosine(
            self.optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio
        )
        self.tokens_seen = 0
        if self.start:
            self.start, extra = self.checkpoints.resume(
                StateView(self.model, self.optimizer, "model"),
                StateView(self.model, self.optimizer, "optimizer"),
                self.scheduler,
            )
            self.tokens_seen = extra["tokens_seen"]
        self.bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and ctx.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )

    def autocast(self):
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def announce(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if not ctx.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        write_text(
            self.out / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
        )
        for label, c in self.counts.items():
            print(
                f"{label:>12}: {c['total']:,} parameters ({c['non_embedding']:,} outside the "
                "embeddings)"
            )
        print(
            f"training {self.name} ({cfg.family}, d={cfg.d_model}, L={cfg.n_layer}) on "
            f"{len(self.train_tokens):,} tokens of {self.train_tokens.documents:,} documents; "
            f"validation {len(self.val_tokens):,} tokens of {self.val_tokens.documents:,}"
            f" ({self.split.describe()}); "
            f"{ctx.world} process(es) on {ctx.device.type}, {'bf16' if self.bf16 else 'fp32'}"
            + (f", resuming at step {self.start}" if self.start else "")
        )

    # ------------------------------------------------------------------------------- train
    def train(self) -> None:
        cfg = self.cfg
        self.train_seconds, self.timed_tokens = 0.0, 0
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.start,
            desc=self.name,
            disable=not (self.ctx.main and cfg.progress),
            dynamic_ncols=True,
        )
        for step in range(self.start, cfg.max_steps):
            began = time.perf_counter()
            n = self.sampler.draw(step)[0] if self.sampler else None
            loss, grad_norm = self.train_step(step, n)
            seconds = time.perf_counter() - began
            step_tokens = cfg.batch_size * cfg.seq_len
            self.tokens_seen += step_tokens
            if step > self.start:  # the first step of a process pays for warm-up (and compilation)
                self.train_seconds += seconds
                self.timed_tokens += step_tokens
            rate = step_tokens / seconds
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                self.metrics.log(
                    event="train",
                    step=done,
                    loss=loss,
                    lr=self.scheduler.get_last_lr()[0],
                    grad_norm=None if grad_norm is None else float(full_tensor(grad_norm)),
                    solver_steps=n if n is not None else cfg.n_layer,
                    tokens=self.tokens_seen,
                    tokens_per_s=rate,
                )
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                self.periodic_eval(done, bar)
            if done % cfg.save_every == 0 or done == cfg.max_steps:
                self.save(done)
        bar.close()

    def train_step(self, step: int, n: int | None) -> tuple[float, torch.Tensor | None]:
        """One optimizer step on global batch ``step`` at ``n`` solver steps: (mean loss over
        ranks, gradient norm before clipping)."""
        cfg, ctx, model = self.cfg, self.ctx, self.model
        kwargs = {} if n is None else {"ode_steps": n}
        micro = cfg.batch_size // (ctx.world * cfg.grad_accum)
        x, y = self.batches.get(step, ctx.rank, ctx.world)
        loss_sum = torch.zeros((), device=ctx.device)
        for j in range(cfg.grad_accum):
            xm = x[j * micro : (j + 1) * micro].to(ctx.device)
            ym = y[j * micro : (j + 1) * micro].to(ctx.device)
            with sync(model, j == cfg.grad_accum - 1):
                with self.autocast():
                    logits = model(xm, use_cache=False, **kwargs).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), ym.flatten()) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(ctx.mean(loss_sum)), grad_norm

    def periodic_eval(self, done: int, bar) -> None:
        losses = self.evaluate(self.val_periodic, self.eval_counts)
        self.metrics.log(
            event="eval",
            step=done,
            val_loss={str(k): v for k, v in losses.items()},
            val_ppl={str(k): math.exp(v) for k, v in losses.items()},
        )
        if self.ctx.main:
            bar.write(
                f"step {done}: val ppl "
                + ", ".join(f"{math.exp(v):.2f} @ {k}" for k, v in losses.items())
            )

    def save(self, done: int) -> None:
        model, optimizer = self.model, self.optimizer
        model_state, optim_state = full_state(model, optimizer)
        if self.ctx.main:
            self.checkpoints.save(
                done,
                StateView(model, optimizer, "model", model_state),
                StateView(model, optimizer, "optimizer", optim_state),
                self.scheduler,
                extra={
                    "tokens_seen": self.tokens_seen,
                    "data": {"seed": self.cfg.seed, "step": done},
                },
            )
        self.ctx.barrier()

    # ---------------------------------------------------------------------------- evaluate
    def evaluate(self, windows: torch.Tensor, counts: list[int]) -> dict[int, float]:
        """Mean next-token loss on validation windows [n, seq_len + 1] at each solver step count,
        the windows split over ranks in equal shares."""
        scores = sweep(
            self.model,
            windows,
            counts,
            self.cfg.eval_batch_size,
            shifted=True,
            autocast=self.autocast,
            dist=self.ctx,
        )
        return scores.loss

    # ------------------------------------------------------------------------------ report
    def report(self, final: dict[int, float]) -> dict[str, Any]:
        cfg, ctx, out = self.cfg, self.ctx, self.out
        peak = ctx.sum(torch.tensor(peak_memory_mib(ctx.device), device=ctx.device))
        summary = {
            "model": self.name,
            "parameters": self.counts,
            "steps": cfg.max_steps,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": self.timed_tokens / self.train_seconds if self.train_seconds else None,
            "peak_memory_mib": float(peak / ctx.world),
            "final": {
                "windows": len(self.val_final),
                "val_loss": {str(k): v for k, v in final.items()},
                "perplexity": {str(k): math.exp(v) for k, v in final.items()},
            },
        }
        export_state = full_state(self.model, self.optimizer)[0] if cfg.export else None
        if ctx.main:
            self.metrics.log(event="final", step=cfg.max_steps, **summary)
            self.print_table(summary, final)
            plot_sweep(
                {self.name: {k: math.exp(v) for k, v in final.items()}},
                out / "ppl_vs_steps.png",
                f"{self.name}: validation perplexity against solver steps (L = {cfg.n_layer})",
            )
            if cfg.export:
                export(cfg, self.hf_config, export_state, self.tokenizer, out / "model")
                print(f"exported to {out / 'model'}")
            write_text(out / "summary.json", json.dumps(summary, indent=2))  # last: the run is done
        ctx.barrier()
        return summary

    def print_table(self, summary: dict, final: dict[int, float]) -> None:
        windows = summary["final"]["windows"]
        print(f"\n{self.name}, validation ({windows} windows of {self.cfg.seq_len}):")
        print(f"{'steps':>6} {'loss':>8} {'perplexity':>11}")
        for k, v in final.items():
            print(f"{k:>6} {v:8.4f} {math.exp(v):11.2f}")
        if summary["tokens_per_s"]:
            print(
                f"throughput {summary['tokens_per_s']:,.0f} tokens/s, peak memory "
                f"{summary['peak_memory_mib']:,.0f} MiB"
            )


def export(cfg: Config, hf_config, state: dict, tokenizer, path: Path) -> None:
    """The trained model as a plain CPU model: odeify's save format, or transformers' for the baseline."""
    model = build_model(cfg, hf_config, cfg.ode, init="none")
    model.load_state_dict(state)
    if cfg.ode:
        ode_lib.save_pretrained(model.eval(), path, tokenizer=tokenizer, overwrite=True)
    else:
        with replace_folder(path, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    description = "Pretrain a DiffEqFormer or its discrete baseline (see the module docstring)."
    return launch(Pretrain, Config, argv, description)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
