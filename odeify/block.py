"""The ODE block: one module that replaces a stack of L blocks with the flow of
dx/dt = L * (A(x; W(t)) + M(x; W(t))) on t in [0, 1], with W(t) = sum_k c_k(t) P_k.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint
from torchdiffeq import odeint, odeint_adjoint
from tqdm.auto import tqdm

# Private to transformers (pinned at 5.23): how its output_hidden_states hooks collect states.
from transformers.utils.output_capturing import _active_collector

from .bases import make_basis
from .config import ODEConfig
from .family import Family, Step
from .schemes import Solver, check_sample_steps, check_solver, check_steps, spans, stage_times
from .weights import PerSampleWeights, Weights

# Keyword arguments of the parent's layer call that the block consumes itself.
_CONSUMED = ("use_cache", "encoder_attention_mask")


class _ParamTree(nn.Module):
    """Nested modules mirroring the original block's parameter names (``attn.c_attn.weight``)."""

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {list(p.shape)}" for name, p in self._parameters.items())


def _set_param(root: nn.Module, name: str, value: nn.Parameter) -> None:
    *path, leaf = name.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, _ParamTree())
        module = getattr(module, part)
    module.register_parameter(leaf, value)


def _get(root: nn.Module, name: str) -> Tensor:
    # Looked up on every call: peft's parametrisations replace the attribute, not the Parameter.
    return functools.reduce(getattr, name.split("."), root)


class ODEBlock(nn.Module):
    """A continuous-depth replacement of a model's whole block stack.

    It sits where the stack was (a ModuleList of length one), is called by the parent model the
    way its layers were, and integrates from t = 0 to 1 with the configured scheme and steps.
    Build it with :func:`odeify.odeify`; this class is not public API.

    Basis tensors live under ``block.basis`` with the original names and shape [K, *shape] (linear
    weights always [K, out, in]); time bases under ``block.time_basis`` (one per weight group when
    learned, one shared otherwise).
    """

    def __init__(
        self, family: Family, config, ode: ODEConfig, shapes: dict[str, torch.Size], dtype, device
    ):
        super().__init__()
        self.family, self.config, self.ode = family, config, ode
        for key, value in family.attention_attrs(config).items():
            setattr(self, key, value)
        self.layer_idx = 0
        self.gradient_checkpointing = False  # transformers' gradient_checkpointing_enable() sets it
        self.names = tuple(shapes)
        probe = make_basis(ode.basis, ode.num_basis, ode.num_layers, **ode.basis_kwargs)
        groups = sorted({family.group_of(n) for n in self.names}) if probe.learned else ["shared"]
        self.time_basis = nn.ModuleDict(
            {
                g: make_basis(ode.basis, ode.num_basis, ode.num_layers, **ode.basis_kwargs)
                for g in groups
            }
        ).to(device)
        self.group = {n: family.group_of(n) if probe.learned else "shared" for n in self.names}
        self.basis = _ParamTree()
        for name, shape in shapes.items():
            _set_param(
                self.basis,
                name,
                nn.Parameter(torch.empty(ode.num_basis, *shape, dtype=dtype, device=device)),
            )
        self.fit_residuals: dict[str, float] = {}
        self._weight_cache = None

    # ----------------------------------------------------------------------------------- weights
    def basis_tensor(self, name: str) -> Tensor:
        """P_k of one parameter, [K, *shape], with the active LoRA update added when a peft
        adapter is live (inside the forward; see :mod:`odeify.lora`)."""
        basis = _get(self.basis, name)
        for lhs, rhs, scaling in self.__dict__.get("_odeify_lora_factors", {}).get(name, ()):
            basis = torch.baddbmm(basis, lhs, rhs, alpha=scaling)
        return basis

    def coefficients(self, times) -> dict[str, Tensor]:
        """c(t) of every time basis for times given as a list of floats or a tensor: {group: [n, K]}."""
        t64 = torch.as_tensor(times, dtype=torch.float64).detach().cpu().reshape(-1)
        out = {}
        for group, basis in self.time_basis.items():
            device = next(iter(self.basis.parameters())).device
            t = t64.to(device, torch.float32) if basis.learned else t64
            out[group] = basis(t).to(device)
        return out

    def weights_at(self, times, names=None) -> dict[str, Tensor]:
        """W(t) at every time for every parameter (or those in ``names``): {name: [n, *shape]},
        one matmul per parameter.

        Example:
            >>> block = odeify.get_block(model)                    # doctest: +SKIP
            >>> block.weights_at([0.0, 0.5])["attn.c_attn.weight"].shape   # doctest: +SKIP
            torch.Size([2, 2304, 768])
        """
        return self._combine(self.coefficients(times), names, self.basis_tensor)

    def _combine(self, coeffs: dict[str, Tensor], names, lookup) -> dict[str, Tensor]:
        out = {}
        for name in self.names if names is None else names:
            basis = lookup(name)
            c = coeffs[self.group[name]].to(basis.dtype)
            out[name] = (c @ basis.reshape(basis.shape[0], -1)).view(c.shape[0], *basis.shape[1:])
        return out

    def _own_parameters(self) -> list[Tensor]:
        # The basis and time units, not the LoRA factors peft hangs under the basis
        # ("<module>.lora_A.<adapter>.weight"): those enter the grid as separate low-rank terms,
        # so frozen base weights stay cacheable under LoRA.
        return [
            p for n, p in self.named_parameters() if ".lora_A." not in n and ".lora_B." not in n
        ]

    def _reusable(self) -> bool:
        if not self.ode.cache_weights or torch.compiler.is_compiling():
            return False
        if any(parametrize.is_parametrized(m) for m in self.basis.modules()):
            return False  # a parametrised basis tensor depends on more than the basis
        return not (
            torch.is_grad_enabled() and any(p.requires_grad for p in self._own_parameters())
        )

    def _param_state(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self._own_parameters())

    def grid_weights(self, key, times: list[float]) -> list[Weights]:
        """Weights of each grid time. Outside training, and under LoRA with a frozen base, the
        base weights are kept until a parameter changes (in-place updates bump a parameter's
        version) or the grid changes; an active LoRA update rides along as low-rank factors."""
        base = functools.partial(_get, self.basis)
        if not self._reusable():
            weights = self._split(self._combine(self.coefficients(times), None, base))
        else:
            state = (key, self._param_state())
            if self._weight_cache is None or self._weight_cache[0] != state:
                # Built in the parameters' dtype even under autocast: the cache outlives the
                # autocast region (a bf16 training step, then an fp32 evaluation on the same grid).
                device = next(iter(self.basis.parameters())).device
                with torch.no_grad(), torch.autocast(device.type, enabled=False):
                    grid = self._combine(self.coefficients(times), None, base)
                    transposed = frozenset(n for n in grid if self.family.is_transposed(n))
                    for name in transposed:
                        grid[name] = grid[name].mT.contiguous()
                    self._weight_cache = (state, self._split(grid, transposed))
            weights = self._weight_cache[1]
        factors = self.__dict__.get("_odeify_lora_factors")
        return self._with_lora(weights, times, factors) if factors else weights

    def _with_lora(self, weights: list[Weights], times: list[float], factors) -> list[Weights]:
        """Each grid time's weights with dW(t) = sum_k c_k(t) s B_k A_k kept factored: only the k
        with c_k(t) != 0 (one or two for the hat basis), so the step costs what LoRA on a stock
        layer costs and no gradient of a full weight matrix is formed."""
        coeffs = self.coefficients(times)
        out = [Weights(w.tensors, w.transposed, {}) for w in weights]
        for name, terms in factors.items():
            c = coeffs[self.group[name]]
            live = (c != 0).cpu()
            for j, w in enumerate(out):
                ks = live[j].nonzero().flatten().to(c.device)
                pairs = w.lora.setdefault(name, [])
                for lhs, rhs, scaling in terms:
                    scale = (c[j, ks] * scaling).to(lhs.dtype).view(-1, 1, 1)
                    b = (lhs[ks] * scale).permute(1, 0, 2).reshape(lhs.shape[1], -1)
                    pairs.append((rhs[ks].reshape(-1, rhs.shape[-1]), b))
        return out

    def _split(
        self, grid: dict[str, Tensor], transposed: frozenset[str] = frozenset()
    ) -> list[Weights]:
        # unbind, not indexing: its backward stacks the gradients once, where indexing would
        # scatter each time's gradient into a zero tensor of the whole grid (quadratic in N).
        columns = {name: w.unbind(0) for name, w in grid.items()}
        n = next(iter(grid.values())).shape[0]
        return [
            Weights({name: col[j] for name, col in columns.items()}, transposed) for j in range(n)
        ]

    def _apply(self, fn, *args, **kwargs):
        self._weight_cache = None  # .to(), .half(), .cuda() replace parameter storage
        return super()._apply(fn, *args, **kwargs)

    # ----------------------------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit(self, samples: dict[str, Tensor], progress: bool = True) -> dict[str, float]:
        """Least-squares fit of the basis tensors to layer samples {name: [L, *shape]} at t = l / L.

        Returns (and stores in ``fit_residuals``) each parameter's relative residual
        ||W(t_l) - p_l|| / ||p_l|| over the layers, measured through the model's own weight path.
        """
        num_layers = self.ode.num_layers
        layer_times = [layer / num_layers for layer in range(num_layers)]
        coeffs = self.coefficients(layer_times)
        for name in tqdm(self.names, desc="fitting W(t)", disable=not progress, leave=False):
            target = samples[name]
            basis = self.basis_tensor(name)
            c = coeffs[self.group[name]].double().cpu()
            flat = target.reshape(num_layers, -1)
            if c.shape[0] == c.shape[1] and torch.equal(c, torch.eye(c.shape[0], dtype=c.dtype)):
                solution = flat  # the hat basis at its own nodes: a copy, bit-exact
            else:
                solution = torch.linalg.lstsq(c, flat.double().cpu()).solution
            basis.copy_(solution.reshape(basis.shape).to(basis.dtype))
        fitted = self.weights_at(layer_times)
        self.fit_residuals = {
            name: _relative_error(fitted[name].float(), samples[name].float())
            for name in self.names
        }
        self._weight_cache = None
        return self.fit_residuals

    # ---------------------------------------------------------------------------------- forward
    def solver(self, scheme: str | None = None, steps=None) -> tuple[Solver, int | Tensor]:
        """The validated scheme and step count of a call: an int, or per-sample counts [B]."""
        solver = check_solver(self.ode.scheme if scheme is None else scheme)
        steps = self.ode.resolved_steps if steps is None else steps
        if isinstance(steps, (Tensor, list, tuple)):
            return solver, check_sample_steps(steps)
        return solver, check_steps(steps)

    def bind(self, *args, **kwargs) -> tuple[Tensor, _Run]:
        """Parse the parent model's layer call into the hidden states and a run: solver, steps,
        mask, cache and, for native schemes, the weights of the grid.

        ``forward`` is ``bind`` followed by ``step`` for i < run.steps; analysis code that needs
        the states between steps captures the call with a forward pre-hook and does the same.
        """
        bound = dict(zip(self.family.call_signature, args, strict=False))
        bound.update(kwargs)
        x = bound.pop("hidden_states")
        if bound.pop("encoder_hidden_states", None) is not None:
            raise ValueError(
                "odeified models have no cross-attention; do not pass encoder_hidden_states"
            )
        solver, steps = self.solver(bound.pop("ode_scheme", None), bound.pop("ode_steps", None))
        cache = bound.pop("past_key_values", None)
        mask = bound.pop("attention_mask", None)
        position_embeddings = bound.pop("position_embeddings", None)
        for key in _CONSUMED:
            bound.pop(key, None)
        per_sample = None
        if isinstance(steps, Tensor):
            steps, per_sample = self._per_sample(steps, solver, x.shape[0])
        ends = self.ode.discrete_ends
        if ends and (solver.native is None or per_sample is not None):
            raise ValueError(
                f"discrete_ends = {ends} fixes where the end steps fall on a native grid: use a "
                f"native scheme ({solver.name!r} is not one) and one step count for the batch"
            )
        run = _Run(self, solver, steps, cache, mask, position_embeddings, bound)
        if solver.native is not None:
            scheme = solver.native
            if per_sample is None:
                run.times, run.index = stage_times(scheme, steps, run.num_layers, ends)
                if ends:
                    run.sizes = [s / run.num_layers for s in spans(steps, run.num_layers, ends)]
                run.weights = self.grid_weights((scheme.name, steps, ends), run.times)
                grid = (scheme.name, steps)
            else:
                run.per_sample = per_sample.to(x.device)
                grid = (scheme.name, tuple(per_sample.tolist()))
            if cache is not None:
                _claim_cache(cache, grid, steps * scheme.stages, x.shape[1])
        return x, run

    def _per_sample(self, counts: Tensor, solver: Solver, batch: int) -> tuple[int, Tensor | None]:
        """(steps of the loop, per-sample counts or None when all samples share one grid)."""
        if counts.numel() != batch:
            raise ValueError(f"got {counts.numel()} per-sample step counts for a batch of {batch}")
        if bool((counts == counts[0]).all()):
            return int(counts[0]), None
        if solver.native is None:
            raise ValueError(
                f"per-sample step counts need a native fixed-grid scheme, not {solver.name!r}"
            )
        if getattr(self.config, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError(
                "per-sample step counts are not supported with scale_attn_by_inverse_layer_idx"
            )
        return int(counts.max()), counts

    def step(self, x: Tensor, run: _Run, i: int) -> Tensor:
        """Step i of a native scheme: the state at t = i / N to the state at t = (i + 1) / N
        (with ``discrete_ends``, between the boundaries of :func:`odeify.schemes.spans`).

        With per-sample step counts N_b, sample b steps by 1 / N_b on its own grid with its own
        weights, and leaves its state unchanged once i >= N_b.
        """
        if run.per_sample is None:
            h = run.sizes[i] if run.sizes else 1.0 / run.steps
            return run.solver.native.step(_StepField(run, i), x, h)
        counts = run.per_sample.view(-1, 1, 1)
        h = (1.0 / counts.to(torch.float32)).to(x.dtype)
        moved = run.solver.native.step(_PerSampleStepField(run, i), x, h)
        return torch.where(counts > i, moved, x)

    def forward(self, *args, **kwargs) -> Tensor:
        x, run = self.bind(*args, **kwargs)
        record = run.collected is not None and "hidden_states" in run.collected
        if record:
            _record_hidden(run.collected, x)
        if run.solver.native is None:
            x = self._integrate_torchdiffeq(x, run)
            if record:
                _record_hidden(run.collected, x)
            return x
        remat = (self.gradient_checkpointing or self.ode.checkpoint_steps) and self.training
        remat = remat and torch.is_grad_enabled()
        for i in range(run.steps):
            if remat:
                x = checkpoint(self.step, x, run, i, use_reentrant=False)
            else:
                x = self.step(x, run, i)
            if record:
                _record_hidden(run.collected, x)
        return x

    def _integrate_torchdiffeq(self, x: Tensor, run: _Run) -> Tensor:
        solver = run.solver
        if run.cache is not None:
            # torchdiffeq evaluates at times it picks; there is no per-step KV slot to fill.
            _claim_cache(run.cache, (solver.name, None), 0, x.shape[1])
            run.cache = None
        field = _TorchdiffeqField(self, run)
        t = torch.tensor([0.0, 1.0], dtype=torch.float32, device=x.device)
        kwargs = {"method": solver.method}
        if solver.fixed_grid:
            kwargs["options"] = {"step_size": 1.0 / run.steps}
        else:
            kwargs.update(rtol=self.ode.rtol, atol=self.ode.atol)
        if self.ode.adjoint:
            params = tuple(p for p in self.parameters() if p.requires_grad)
            return odeint_adjoint(field, x, t, adjoint_params=params, **kwargs)[-1]
        return odeint(field, x, t, **kwargs)[-1]

    def extra_repr(self) -> str:
        return (
            f"family={self.family.name}, L={self.ode.num_layers}, basis={self.ode.basis}, "
            f"K={self.ode.num_basis}, scheme={self.ode.scheme}, steps={self.ode.resolved_steps}"
        )


class _Run:
    """What one forward call shares across its steps."""

    def __init__(
        self, block: ODEBlock, solver: Solver, steps: int, cache, mask, position_embeddings, extra
    ):
        self.block, self.solver, self.steps = block, solver, steps
        self.cache, self.mask = cache, mask
        self.position_embeddings, self.extra = position_embeddings, extra
        self.num_layers = block.ode.num_layers
        self.times: list[float] = []
        self.index: list[int] = []
        self.sizes: list[float] = []  # each step's size, when the grid is not uniform
        self.weights: list[Weights] = []
        self.per_sample: Tensor | None = None  # [B] step counts when samples have their own grids
        # What transformers' output_hidden_states / output_attentions asked to collect, if anything.
        self.collected = None if torch.compiler.is_compiling() else _active_collector.get()
        self.stages = solver.native.stages if solver.native is not None else 1

    def step(self, t: float, slot: int) -> Step:
        return Step(
            t,
            slot,
            self.cache,
            self.mask,
            self.position_embeddings,
            self.extra,
            self.block,
            self.num_layers,
            self.collected.get("attentions") if self.collected else None,
        )


class _StepField:
    """The field and its two sub-updates at the stages of one native step."""

    __slots__ = ("run", "i", "num_layers")

    def __init__(self, run: _Run, i: int):
        self.run, self.i, self.num_layers = run, i, run.num_layers

    def _at(self, stage: int) -> tuple[Weights, Step]:
        run = self.run
        slot = self.i * run.stages + stage
        j = run.index[slot]
        return run.weights[j], run.step(run.times[j], slot)

    def attention(self, x: Tensor, stage: int) -> Tensor:
        w, step = self._at(stage)
        return self.run.block.family.attention(x, w, step)

    def mlp(self, x: Tensor, stage: int) -> Tensor:
        w, step = self._at(stage)
        return self.run.block.family.mlp(x, w, step)

    def __call__(self, x: Tensor, stage: int) -> Tensor:
        w, step = self._at(stage)
        family = self.run.block.family
        return (family.attention(x, w, step) + family.mlp(x, w, step)) * self.num_layers


class _PerSampleStepField(_StepField):
    """Stage times (i + c) / N_b per sample; linear layers through time_linear."""

    __slots__ = ()

    def _at(self, stage: int) -> tuple[PerSampleWeights, Step]:
        run, block = self.run, self.run.block
        offset = run.solver.native.offsets[stage]
        t = ((self.i + offset) / run.per_sample.double()).clamp(max=1.0)
        w = PerSampleWeights(block.coefficients(t), block.basis_tensor, block.group)
        return w, run.step(t, self.i * run.stages + stage)


class _TorchdiffeqField(nn.Module):
    """f(t, x) = L * (A + M) at any time, for torchdiffeq. A module so the adjoint finds parameters."""

    def __init__(self, block: ODEBlock, run: _Run):
        super().__init__()
        self.block, self.run = block, run

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        block = self.block
        w = Weights({name: value[0] for name, value in block.weights_at(t).items()})
        step = self.run.step(float(t.detach()), 0)
        return (
            block.family.attention(x, w, step) + block.family.mlp(x, w, step)
        ) * self.run.num_layers


def _record_hidden(collected: dict, x: Tensor) -> None:
    """Append a state to transformers' output_hidden_states collection: the input, then the state
    after each step (so at N = L, exactly the original's per-layer hidden states)."""
    states, selection = collected["hidden_states"], collected.get("_hidden_states_layers")
    states.append(x if selection is None or len(states) in selection else None)


def _relative_error(approx: Tensor, exact: Tensor) -> float:
    norm = exact.norm()
    diff = (approx - exact).norm()
    return float(diff / norm) if norm > 0 else float(diff)


def _claim_cache(cache, grid: tuple, slots: int, new_tokens: int) -> None:
    """Check that a KV cache belongs to this grid, give it one slot per (step, stage), count tokens.

    A cache filled at N steps holds N slots of keys computed at those steps' times: it is
    meaningless at any other N or scheme, so reusing it is an error, never a silent mismatch.
    """
    state = getattr(cache, "_odeify", None)
    if state is None:
        if cache.get_seq_length() > 0:
            raise ValueError(
                "past_key_values already holds keys that odeify did not write (e.g. from the original "
                "model); pass past_key_values=None to start a new cache"
            )
        seen = 0
    else:
        (scheme, steps), seen = state
        if seen and steps is None:
            raise ValueError(
                f"scheme {scheme!r} is integrated by torchdiffeq, which keeps no KV cache: call "
                "generate(..., use_cache=False) or use a native fixed-grid scheme"
            )
        if seen and (scheme, steps) != grid:
            raise ValueError(
                f"this KV cache was filled at {steps} steps of {scheme!r} but the model now runs "
                f"{grid[1] or 'adaptive'} steps of {grid[0]!r}; a cache holds one slot per step and "
                "stage, so it is valid for one grid only. Start a new cache (past_key_values=None) or "
                "restore the steps."
            )
    layers = getattr(cache, "layers", None)
    if (
        layers is not None
        and getattr(cache, "layer_class_to_replicate", None) is None
        and len(layers) < slots
    ):
        if not layers:
            raise ValueError("past_key_values has no layers to replicate; pass a DynamicCache()")
        template = layers[0]
        layers.extend(copy.deepcopy(template) for _ in range(slots - len(layers)))
    cache._odeify = (grid, seen + new_tokens)
