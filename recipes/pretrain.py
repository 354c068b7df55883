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
- Data: a corpus spec (``shakespeare``, ``shakespeare:hamlet,...``, a text file or folder,
  ``hf:NAME[:CONFIG[:SPLIT]]``), held-out documents (``heldout``: e.g. a few plays) or a
  held-out fraction, each split tokenised once into a cached uint16/uint32 memmap; GPT-2 BPE
  or any tokenizer folder. Batches are a pure function of (seed, step).
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

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

import odeify as ode_lib
from odeify import data
from odeify.assets import gpt2_tokenizer
from odeify.evaluate import plot_sweep
from odeify.training import (
    Checkpoints,
    Metrics,
    adamw,
    config_stamp,
    load_config,
    seed_everything,
    warmup_cosine,
)

# Keys that change what a run prints, not what it computes: a resume may change them.
_PRESENTATION = ("progress", "log_every")


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
def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set`` pairs as {key: value}, each value read as YAML.

    Example:
        >>> parse_overrides(["lr=0.001", "ode=false", "heldout=[hamlet, macbeth]"])
        {'lr': 0.001, 'ode': False, 'heldout': ['hamlet', 'macbeth']}
    """
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


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
def split_documents(
    docs: dict[str, str], heldout: list[str], fraction: float
) -> tuple[dict[str, str], dict[str, str]]:
    """(train, validation) documents: the named ones held out, else a fraction of them chosen by
    name hash (the tail of the text when there is one document).

    Example:
        >>> split_documents({"a": "x", "b": "y", "c": "z"}, ["b"], 0.0)
        ({'a': 'x', 'c': 'z'}, {'b': 'y'})
    """
    if heldout:
        missing = sorted(set(heldout) - set(docs))
        if missing:
            raise ValueError(
                f"held-out documents {missing} are not in the corpus (it has {len(docs)} "
                f"documents, e.g. {sorted(docs)[:5]})"
            )
        val = {name: docs[name] for name in heldout}
        train = {name: text for name, text in docs.items() if name not in val}
    elif len(docs) > 1:
        order = sorted(docs, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
        count = min(len(docs) - 1, max(1, round(fraction * len(docs))))
        val = {name: docs[name] for name in order[:count]}
        train = {name: text for name, text in docs.items() if name not in val}
    else:
        ((name, text),) = docs.items()
        cut = text.rfind("\n", 0, int(len(text) * (1 - fraction)))
        cut = cut if cut > 0 else int(len(text) * (1 - fraction))
        train, val = {name: text[:cut]}, {name: text[cut:]}
    if not train:
        raise ValueError("every document is held out; leave some for training")
    return train, val


def char_tokenizer(docs: dict[str, str]):
    """One token per character of the corpus, plus EOS and UNK: a fast tokenizer that saves,
    loads and decodes like any other.

    Example:
        >>> tok = char_tokenizer({"a": "to be"})
        >>> tok("be")["input_ids"], tok.decode(tok("be")["input_ids"])
        ([3, 4], 'be')
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set().union(*map(set, docs.values())))
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<unk>", *chars])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", unk_token="<unk>"
    )


def load_tokenizer(spec: str, docs: dict[str, str]):
    """The offline GPT-2 BPE for 'gpt2', characters for 'char' (the character set of all of
    ``docs``, held-out ones included, so validation has no unknown tokens), else a folder's."""
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec == "char":
        return char_tokenizer(docs)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {spec} has no EOS token to separate documents")
    return tokenizer


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


# ------------------------------------------------------------------------------ distribution
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value


def setup_distributed() -> Dist:
    """One process, or the process group torchrun describes: NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), world, local_rank, device)


def wrap(model: nn.Module, cfg: Config, ctx: Dist) -> nn.Module:
    """The model the training loop calls: compiled, and under DDP or FSDP2 when distributed."""
    if cfg.compile:
        model.compile()  # in place: state_dict keys stay those of the plain model
    if ctx.world == 1:
        return model
    if cfg.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One shard group per block (the ODE model has one block), then the embeddings and head.
        blocks = [ode_lib.get_block(model)] if cfg.ode else list(_stack(model))
        for module in blocks:
            fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
    )


def _stack(model: nn.Module) -> nn.ModuleList:
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


class _StateView:
    """Full (unsharded) model or optimizer state for :class:`Checkpoints`, under any wrapping.

    torch.distributed.checkpoint's state-dict functions see through DDP, FSDP2 and compile,
    and key optimizer state by parameter name, so one file resumes any of them.
    """

    def __init__(self, model: nn.Module, optimizer, part: str, saved: dict | None = None):
        self.model, self.optimizer, self.part, self.saved = model, optimizer, part, saved

    def state_dict(self) -> dict:
        return self.saved

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        if self.part == "model":
            set_model_state_dict(self.model, state, options=options)
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state, options=options)


def full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state gathered on rank 0 (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


# -------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    counts: list[int],
    cfg: Config,
    ctx: Dist,
    autocast,
) -> dict[int, float]:
    """Mean next-token loss on validation windows [n, seq_len + 1] at each solver step count.

    Windows are split over ranks in equal shares (FSDP needs every rank in every forward).
    """
    was_training = model.training
    model.eval()
    share = len(windows) // ctx.world
    mine = windows[ctx.rank * share : (ctx.rank + 1) * share]
    losses = {}
    for n in counts:
        total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for start in range(0, len(mine), cfg.eval_batch_size):
            batch = mine[start : start + cfg.eval_batch_size].to(ctx.device)
            kwargs = {"ode_steps": n} if cfg.ode else {}
            with autocast():
                logits = model(batch[:, :-1], use_cache=False, **kwargs).logits
            total[0] += F.cross_entropy(
                logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
            ).double()
            total[1] += batch[:, 1:].numel()
        total = ctx.sum(total)
        losses[n] = float(total[0] / total[1])
    model.train(was_training)
    return losses


def solver_steps(cfg: Config, step: int) -> int | None:
    """The solver steps of training step ``step``: drawn from (seed, step) with augmentation,
    so every rank and a resumed run draw the same; None (the model's L) otherwise."""
    if cfg.step_augmentation is None:
        return None
    low, high = cfg.step_augmentation
    return int(np.random.default_rng([cfg.seed, step, 7]).integers(low, high + 1))


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trim_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a run resumes from), and a last
    line torn by a kill."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- the run
def run(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train as configured; returns the summary also written to ``out_dir/summary.json``.

    Example:
        >>> summary = run(load_config(Config, "recipes/configs/shakespeare-tiny.yaml"))   # doctest: +SKIP
        >>> summary["final"]["perplexity"]                                                # doctest: +SKIP
    """
    ctx = setup_distributed()
    validate(cfg, ctx.world)
    if cfg.ode and cfg.precision == "bf16" and ctx.device.type == "cpu":
        # ODEBlock.weights_at runs under autocast, so W(t) of the norms comes out in bf16 and
        # CPU layer_norm refuses bf16 parameters with fp32 inputs (CUDA casts both to fp32).
        raise ValueError(
            "precision bf16 on CPU is not supported for the ODE model: use fp32 (precision: "
            "auto does) or a GPU"
        )
    out = Path(cfg.out_dir)
    checkpoints = Checkpoints(out / "checkpoints", config_stamp(cfg, _PRESENTATION), keep=cfg.keep)
    metrics_path = out / "metrics.jsonl"
    if not resume and (checkpoints.paths() or metrics_path.exists()):
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it or choose another out_dir"
        )
    start = checkpoints.check() if resume else 0
    if resume and ctx.main:
        _trim_metrics(metrics_path, start)
    docs = data.corpus(cfg.corpus)
    train_docs, val_docs = split_documents(docs, cfg.heldout, cfg.heldout_fraction)

    tokenizer = load_tokenizer(cfg.tokenizer, docs)
    cache = data.CACHE if cfg.token_cache is None else Path(cfg.token_cache)
    # The main process writes the token cache; the others then read it, never racing on a file.
    if not ctx.main:
        ctx.barrier()
    train_tokens = data.tokenize(train_docs, tokenizer, cache)
    val_tokens = data.tokenize(val_docs, tokenizer, cache)
    if ctx.main:
        ctx.barrier()
    batches = data.Batches(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
    val_all = data.windows(val_tokens, cfg.seq_len + 1)
    windows_each = min(cfg.eval_windows, len(val_all))
    if windows_each < ctx.world:
        raise ValueError(
            f"the validation split makes {len(val_all)} windows of {cfg.seq_len + 1} tokens, "
            f"fewer than the {ctx.world} processes; hold out more text"
        )
    val_periodic = val_all[:windows_each]
    val_final = val_all if cfg.final_windows is None else val_all[: cfg.final_windows]

    hf_config = model_config(cfg, tokenizer)
    with torch.device("meta"):
        counts = {
            "diffeqformer": parameter_counts(build_model(cfg, hf_config, True, init="none")),
            "baseline": parameter_counts(build_model(cfg, hf_config, False)),
        }
    # Every rank builds the same initial model (DDP would broadcast it anyway; FSDP needs it).
    seed_everything(cfg.seed)
    raw = build_model(cfg, hf_config, cfg.ode).to(ctx.device)
    raw.train()
    model = wrap(raw, cfg, ctx)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    tokens_seen = 0
    if start:
        step, extra = checkpoints.resume(
            _StateView(model, optimizer, "model"),
            _StateView(model, optimizer, "optimizer"),
            scheduler,
        )
        start, tokens_seen = step, extra["tokens_seen"]

    bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and ctx.device.type == "cuda" and torch.cuda.is_bf16_supported()
    )

    def autocast():
        return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16)

    eval_counts = resolved_eval_steps(cfg)
    final_counts = sorted(set(cfg.final_steps or eval_counts)) if cfg.ode else eval_counts
    name = "DiffEqFormer" if cfg.ode else "baseline"
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        for label, c in counts.items():
            print(
                f"{label:>12}: {c['total']:,} parameters ({c['non_embedding']:,} outside the "
                "embeddings)"
            )
        print(
            f"training {name} ({cfg.family}, d={cfg.d_model}, L={cfg.n_layer}) on "
            f"{len(train_tokens):,} tokens of {len(train_docs)} documents; validation "
            f"{len(val_tokens):,} tokens of {len(val_docs)} ({', '.join(sorted(val_docs)[:6])}); "
            f"{ctx.world} process(es) on {ctx.device.type}, {'bf16' if bf16 else 'fp32'}"
            + (f", resuming at step {start}" if start else "")
        )
    metrics = Metrics(metrics_path) if ctx.main else None

    micro = cfg.batch_size // (ctx.world * cfg.grad_accum)
    step_tokens = cfg.batch_size * cfg.seq_len
    train_seconds, timed_tokens = 0.0, 0
    bar = tqdm(
        total=cfg.max_steps,
        initial=start,
        desc=name,
        disable=not (ctx.main and cfg.progress),
        dynamic_ncols=True,
    )
    for step in range(start, cfg.max_steps):
        began = time.perf_counter()
        n = solver_steps(cfg, step)
        kwargs = {} if n is None else {"ode_steps": n}
        x, y = batches.get(step, ctx.rank, ctx.world)
        loss_sum = torch.zeros((), device=ctx.device)
        for j in range(cfg.grad_accum):
            xm = x[j * micro : (j + 1) * micro].to(ctx.device)
            ym = y[j * micro : (j + 1) * micro].to(ctx.device)
            last = j == cfg.grad_accum - 1
            with _sync(model, last):
                with autocast():
                    logits = model(xm, use_cache=False, **kwargs).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), ym.flatten()) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(ctx.mean(loss_sum))
        seconds = time.perf_counter() - began
        tokens_seen += step_tokens
        if step > start:  # the first step of a process pays for warm-up (and compilation)
            train_seconds += seconds
            timed_tokens += step_tokens
        rate = step_tokens / seconds
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        done = step + 1
        if ctx.main and (done % cfg.log_every == 0 or done == cfg.max_steps):
            metrics.log(
                event="train",
                step=done,
                loss=loss_value,
                lr=scheduler.get_last_lr()[0],
                grad_norm=None if grad_norm is None else float(_full(grad_norm)),
                solver_steps=n if n is not None else cfg.n_layer,
                tokens=tokens_seen,
                tokens_per_s=rate,
            )
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            losses = evaluate(model, val_periodic, eval_counts, cfg, ctx, autocast)
            if ctx.main:
                metrics.log(
                    event="eval",
                    step=done,
                    val_loss={str(k): v for k, v in losses.items()},
                    val_ppl={str(k): math.exp(v) for k, v in losses.items()},
                )
                bar.write(
                    f"step {done}: val ppl "
                    + ", ".join(f"{math.exp(v):.2f} @ {k}" for k, v in losses.items())
                )
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            model_state, optim_state = full_state(model, optimizer)
            if ctx.main:
                checkpoints.save(
                    done,
                    _StateView(model, optimizer, "model", model_state),
                    _StateView(model, optimizer, "optimizer", optim_state),
                    scheduler,
                    extra={"tokens_seen": tokens_seen, "data": {"seed": cfg.seed, "step": done}},
                )
            ctx.barrier()
    bar.close()

    final = evaluate(model, val_final, final_counts, cfg, ctx, autocast)
    summary = {
        "model": name,
        "parameters": counts,
        "steps": cfg.max_steps,
        "tokens_seen": tokens_seen,
        "tokens_per_s": timed_tokens / train_seconds if train_seconds else None,
        "peak_memory_mib": float(
            ctx.sum(torch.tensor(peak_memory_mib(ctx.device), device=ctx.device)) / ctx.world
        ),
        "final": {
            "windows": len(val_final) // ctx.world * ctx.world,
            "val_loss": {str(k): v for k, v in final.items()},
            "perplexity": {str(k): math.exp(v) for k, v in final.items()},
        },
    }
    export_state = full_state(model, optimizer)[0] if cfg.export else None
    if ctx.main:
        metrics.log(event="final", step=cfg.max_steps, **summary)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"\n{name}, validation ({summary['final']['windows']} windows of {cfg.seq_len}):")
        print(f"{'steps':>6} {'loss':>8} {'perplexity':>11}")
        for k, v in final.items():
            print(f"{k:>6} {v:8.4f} {math.exp(v):11.2f}")
        if summary["tokens_per_s"]:
            print(
                f"throughput {summary['tokens_per_s']:,.0f} tokens/s, peak memory "
                f"{summary['peak_memory_mib']:,.0f} MiB"
            )
        plot_sweep(
            {name: {k: math.exp(v) for k, v in final.items()}},
            out / "ppl_vs_steps.png",
            f"{name}: validation perplexity against solver steps (L = {cfg.n_layer})",
        )
        if cfg.export:
            export(cfg, hf_config, export_state, tokenizer, out / "model")
            print(f"exported to {out / 'model'}")
    if ctx.world > 1:
        dist.barrier()
    return summary


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


@contextlib.contextmanager
def _sync(model: nn.Module, last: bool):
    """Reduce gradients on the last micro-batch of an accumulation only."""
    if last or not isinstance(model, nn.Module):
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def export(cfg: Config, hf_config, state: dict, tokenizer, path: Path) -> None:
    """The trained model as a plain CPU model: odeify's save format, or transformers' for the baseline."""
    model = build_model(cfg, hf_config, cfg.ode, init="none")
    model.load_state_dict(state)
    if cfg.ode:
        ode_lib.save_pretrained(model.eval(), path, tokenizer=tokenizer, overwrite=True)
    else:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description="Pretrain a DiffEqFormer or its discrete baseline (see the module docstring)."
    )
    parser.add_argument("--config", help="YAML file of Config fields")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir")
    args = parser.parse_args(argv)
    cfg = load_config(Config, args.config, parse_overrides(args.set))
    try:
        return run(cfg, resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
