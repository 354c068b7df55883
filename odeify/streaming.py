"""Converting a stock checkpoint folder into an odeified model without loading the stock model.

``odeify(AutoModelForCausalLM.from_pretrained(folder))`` holds every layer, then stacks each
parameter's layers for the fit and writes the basis beside them: about 2.3x the block weights at
its peak. :func:`convert` builds the odeified model's skeleton on the meta device (no memory),
gives it uninitialised storage (pages are only taken as they are written), and fills it from
the checkpoint's safetensors files one tensor at a time:

- the hat basis at K = L is a copy, P_l = W_l: each layer's tensor goes straight into its slot;
- any other fit is the least-squares solution P = pinv(C) W, linear in the layers and
  independent for every entry of a parameter, so it is solved for a few rows of every layer at
  a time (each block small enough to be a rounding error of the model's size);
- embeddings, the final norm and the head are copied as they are.

Peak memory is the converted model plus one tensor and the interpreter (measured in
benchmarks/RESULTS.md). The result equals the in-memory conversion: bit-exact for the hat basis,
the same float64 solve rounded once for the others.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn
from tqdm.auto import tqdm

from .adapters import family_for
from .bases import make_basis
from .checkpoint import Checkpoint, floating_dtype, load_dtype, parse_dtype
from .hub import resolve
from .surgery import block_stack, find_block, is_odeified_folder, stack_prefix
from .weight_function import _warn_inexact

# Elements of float64 one solve works on at a time (32 MB): rows of every layer of a parameter.
CHUNK_ELEMENTS = 1 << 22

# Checkpoint entries transformers itself ignores on load: old causal-mask and RoPE buffers.
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


@torch.no_grad()
def convert(
    source: str | os.PathLike,
    *,
    basis: str = "hat",
    num_basis: int | None = None,
    scheme: str | None = None,
    steps: int | None = None,
    basis_kwargs: dict | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **options,
) -> nn.Module:
    """Odeify the stock model in a safetensors checkpoint folder (or hub id), streaming it from
    disk layer by layer: converting needs about the converted model's size in memory, never
    the stock model beside it. ``odeify("folder")`` calls this.

    The result equals ``odeify(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), ...)``
    (bit-exact with the hat basis; other bases solve the same least squares in float64, rounded
    once) and comes back in eval mode on ``device`` (default CPU), in ``dtype`` ("auto": the
    checkpoint's). The other arguments are :func:`odeify.odeify`'s.

    Example:
        >>> config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=97, n_positions=32)
        >>> GPT2LMHeadModel(config).save_pretrained("gpt2-tiny")
        >>> model = odeify("gpt2-tiny", progress=False)            # = convert("gpt2-tiny")
        >>> type(model).__name__, odeify.get_block(model).fit_residuals["attn.c_attn.weight"]
        ('OdeifyGPT2LMHeadModel', 0.0)
    """
    from .api import odeify

    folder = resolve(source, revision=revision, cache_dir=cache_dir)
    config = _stock_config(folder)
    try:
        tensors = Checkpoint(folder)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}; streaming conversion reads safetensors files. Convert it in memory "
            "instead: odeify(AutoModelForCausalLM.from_pretrained(folder))"
        ) from None
    with tensors:
        saved = parse_dtype(getattr(config, "dtype", None)) or floating_dtype(tensors)
        torch_dtype = load_dtype(dtype, saved if isinstance(saved, torch.dtype) else None)
        device = torch.device("cpu" if device is None else device)
        model = _meta_stock(config, torch_dtype)
        plan = _Plan(model, tensors)
        odeify(
            model,
            basis=basis,
            num_basis=num_basis,
            scheme=scheme,
            steps=steps,
            basis_kwargs=basis_kwargs,
            init="none",
            progress=False,
            **options,
        )
        _materialize(model, device)
        plan.fill_outer(model)
        plan.fill_block(find_block(model), progress)
        _init_buffers(model, plan)
    if (folder / "generation_config.json").exists():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model.eval()


def _stock_config(folder: Path) -> transformers.PretrainedConfig:
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist (nor is it a hub id)")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; is it a model folder?")
    if is_odeified_folder(folder):
        raise ValueError(f"{folder} is already odeified: load it with odeify.from_pretrained")
    return transformers.AutoConfig.from_pretrained(folder)


def _meta_stock(config: transformers.PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The stock model of the config on the meta device, in ``dtype`` as transformers builds it
    for from_pretrained (the default dtype set while building: RoPE frequencies stay float32,
    where casting the model would round them)."""
    name = config.architectures[0] if config.architectures else None
    cls = getattr(transformers, name, None) if name else None
    with torch.device("meta"):
        if cls is None:
            return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        return cls._from_config(config, dtype=dtype)  # what the Auto classes' from_config call


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Real storage for every tensor of a meta model, uninitialised (written by the plan), the
    tied weights tied again and a learned time basis made afresh (it is not in a stock
    checkpoint: odeify() initialises it the same way)."""
    model.to_empty(device=device)
    model.tie_weights()
    block = find_block(model)
    ode = block.ode
    if next(iter(block.time_basis.values())).learned:
        block.time_basis = nn.ModuleDict(
            {
                group: make_basis(ode.basis, ode.num_basis, ode.num_layers, **ode.basis_kwargs)
                for group in block.time_basis
            }
        ).to(device)
        for p in block.time_basis.parameters():
            p._is_hf_initialized = True


def _init_buffers(model: nn.Module, plan: _Plan) -> None:
    """Every tensor the checkpoint does not hold: non-persistent buffers (RoPE frequencies, the
    Fourier units' frequencies) are computed by transformers' own init, as after a meta-device
    load; a parameter that no checkpoint tensor filled is an error, never random weights."""
    unfilled = [
        name for name, p in model.named_parameters() if not getattr(p, "_is_hf_initialized", False)
    ]
    if unfilled:
        raise ValueError(
            f"{plan.folder} lacks tensors the model needs: {unfilled[:6]}. Convert it in memory "
            "instead: odeify(AutoModelForCausalLM.from_pretrained(folder))"
        )
    model.initialize_weights()


class _Plan:
    """Which checkpoint tensor fills which tensor of the odeified model, checked (names and
    shapes) before anything is read."""

    def __init__(self, stock: nn.Module, tensors: Checkpoint):
        self.tensors, self.folder = tensors, tensors.folder
        family = family_for(stock)
        prefix = stack_prefix(stock)
        base = getattr(stock, "base_model_prefix", "")
        layers = block_stack(stock)
        self.num_layers = len(layers)
        locate = lambda name: self._locate(name, base)
        # Each block parameter: its checkpoint key in every layer, stored layout, transposed.
        self.block: dict[str, tuple[list[str], bool]] = {}
        missing, wrong = [], []
        for name, param in layers[0].named_parameters():
            keys = [locate(f"{prefix}{layer}.{name}") for layer in range(self.num_layers)]
            missing += [f"{prefix}{i}.{name}" for i, k in enumerate(keys) if k is None]
            wrong += [self._wrong(k, param.shape) for k in keys if k is not None]
            self.block[name] = (keys, family.is_transposed(name))
        # Everything outside the stack, one entry per tensor (a tied head is its embedding).
        self.outer: dict[str, str] = {}
        seen: dict[int, str] = {}
        for name, tensor in stock.state_dict(keep_vars=True).items():
            if name.startswith(prefix) or id(tensor) in seen:
                continue
            seen[id(tensor)] = name
            key = locate(name)
            if key is None:
                if isinstance(tensor, nn.Parameter):
                    missing.append(name)
                continue  # a persistent buffer the checkpoint lacks: initialised by the model
            wrong.append(self._wrong(key, tensor.shape))
            self.outer[name] = key
        if missing:
            raise ValueError(
                f"{self.folder} lacks tensors the config implies: {missing[:6]}. If its keys "
                "follow another naming, convert it in memory: "
                "odeify(AutoModelForCausalLM.from_pretrained(folder))"
            )
        wrong = [w for w in wrong if w]
        if wrong:
            raise ValueError(f"{self.folder} does not match its config: " + "; ".join(wrong[:4]))
        used = set(self.outer.values()) | {k for keys, _ in self.block.values() for k in keys}
        unused = [k for k in tensors if k not in used and not _IGNORED.search(k)]
        if unused:
            warnings.warn(
                f"{self.folder}: {len(unused)} checkpoint tensors belong to nothing in the model "
                f"and are skipped: {unused[:4]}",
                stacklevel=3,
            )

    def _locate(self, name: str, base: str) -> str | None:
        # A checkpoint saved from the base model lacks the head's prefix, and the other way round.
        for key in (name, name.removeprefix(base + "."), f"{base}.{name}"):
            if key in self.tensors:
                return key
        return None

    def _wrong(self, key: str, shape: torch.Size) -> str:
        stored = self.tensors.shape(key)
        return (
            ""
            if stored == tuple(shape)
            else f"{key} is {stored}, the config implies {tuple(shape)}"
        )

    def fill_outer(self, model: nn.Module) -> None:
        state = model.state_dict(keep_vars=True)
        for name, key in self.outer.items():
            _write(state[name], self.tensors[key])

    def fill_block(self, block: nn.Module, progress: bool) -> None:
        ode = block.ode
        times = [layer / ode.num_layers for layer in range(ode.num_layers)]
        coeffs = {g: c.double().cpu() for g, c in block.coefficients(times).items()}
        # P = pinv(C) W is the least-squares solution (the minimum-norm one when K > L), as
        # WeightFunction.fit's gelsd solve gives it; pinv is an SVD of the small [L, K] matrix
        # once, where gelsd on a block of rows costs seconds (it is slow on many right-hand sides).
        inverses = {g: torch.linalg.pinv(c) for g, c in coeffs.items()}
        residuals = {}
        for name in tqdm(block.names, desc="converting", disable=not progress, leave=False):
            keys, transposed = self.block[name]
            target = block.basis_tensor(name)
            c = coeffs[block.group[name]]
            if c.shape[0] == c.shape[1] and torch.equal(c, torch.eye(len(c), dtype=c.dtype)):
                # The hat basis at its own nodes: P_l = W_l, a copy (bit-exact), a layer at a time.
                for layer, key in enumerate(keys):
                    w = self.tensors[key]
                    _write(target[layer], w.t() if transposed else w, mark=False)
                residuals[name] = 0.0
            else:
                inverse = inverses[block.group[name]]
                residuals[name] = self._solve(keys, transposed, c, inverse, target)
            target._is_hf_initialized = True
        block.fit_residuals = residuals
        block.clear_weight_cache()
        _warn_inexact(residuals, next(iter(block.time_basis.values())), ode.num_layers)

    def _solve(
        self, keys: list[str], transposed: bool, c: Tensor, inverse: Tensor, target: Tensor
    ) -> float:
        """Least squares C P = W as P = pinv(C) W, a block of rows of every layer at a time (rows
        of the stored tensor: columns of a transposed one); returns the relative residual over
        the layers."""
        rows, *rest = self.tensors.shape(keys[0])
        per_row = max(1, int(torch.Size(rest).numel()) * max(c.shape))
        chunk = max(1, CHUNK_ELEMENTS // per_row)
        error = norm = 0.0
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            stack = torch.stack([self.tensors.rows(k, start, stop) for k in keys]).double()
            flat = stack.reshape(len(keys), -1)
            solution = inverse @ flat
            value = solution.reshape(-1, *stack.shape[1:]).to(target.dtype)
            if transposed:
                target[:, :, start:stop].copy_(value.transpose(1, 2))
            else:
                target[:, start:stop].copy_(value)
            # Measured as WeightFunction.fit measures it: W(t_l) in the model's dtype, in float32.
            fitted = (c.to(value.dtype) @ value.reshape(value.shape[0], -1)).float()
            error += float((fitted - flat.float()).double().square().sum())
            norm += float(flat.float().double().square().sum())
        return (error / norm) ** 0.5 if norm > 0 else error**0.5


def _write(target: Tensor, value: Tensor, mark: bool = True) -> None:
    target.copy_(value)  # copy_ casts to the model's dtype as .to(dtype) would
    if mark:
        target._is_hf_initialized = True  # filled: transformers' init leaves it alone
