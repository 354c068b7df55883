"""The weight function W(t) = sum_k c_k(t) P_k of a continuous-depth block.

A :class:`WeightFunction` holds the basis tensors P_k of every block parameter (``basis``, under
the original parameter names, [K, *shape]; linear weights always [K, out, in]) and the time
bases c(t) (``time_basis``: one per weight group when learned, one shared otherwise). It
evaluates W at any times, fits the P_k to layer samples by least squares, and keeps the weights
of the last few integration grids cached (one entry per grid, safe to read and fill from several
threads) until a parameter or the adapter state changes.

Low-rank updates dB_k = s B_k A_k of the basis tensors (continuous LoRA, see :mod:`odeify.lora`)
have one declared slot per thread, set through :meth:`WeightFunction.set_low_rank`: while it is filled,
``basis_tensor`` and ``weights_at`` include the full update and ``grid_weights`` carries it as
factors beside the cached frozen weights.

The ODE block (:class:`odeify.block.ODEBlock`) *is* a weight function (it subclasses this): the
checkpoints' keys, parameter names and peft's ``target_parameters`` are paths from the block,
``<stack>.0.basis.<name>`` and ``<stack>.0.time_basis.<group>...``, which composition would
lengthen by one module level and so break saved models and adapters. Code that needs only the
weights (``materialize``, ``diffeqformer.random_init``, the spectra) is typed against this class.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from . import local

try:  # the sharded tensors of tensor parallelism; torch builds without distributed lack them
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:
    _DTensor = None
from .bases import TimeBasis, make_basis
from .weights import Weights, vectors_in_own_dtype

# Relative residual above which a fit that K >= L makes exact is reported as not exact.
EXACT_FIT_TOLERANCE = 1e-4

# One low-rank update of a basis tensor [K, out, in]: (B [K, out, r], A [K, r, in], s), i.e.
# dB_k = s B_k A_k, as peft's ``ParamWrapper.get_delta_factors`` returns it.
Factor = tuple[Tensor, Tensor, float]

_NO_LOW_RANK: tuple[dict, Hashable] = ({}, ())

# Guards every grid cache's dict (lookups and inserts are short; grids are built outside it).
# Process-wide rather than per module: a lock cannot be pickled or deep-copied with the model.
_CACHE_LOCK = threading.Lock()


class _ParamTree(nn.Module):
    """Nested modules mirroring the original block's parameter names (``attn.c_attn.weight``)."""

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{name}: {list(p.shape)}" for name, p in self._parameters.items())
        weight = self._parameters.get("weight")
        if weight is None or weight.dim() != 3:
            return shapes
        # peft names this module in its "Target module ... is not supported" error when a plain
        # LoraConfig targets it: the repr is the one place that message can say what to do.
        return (
            f"{shapes}; W(t) over {weight.shape[0]} basis tensors, not an nn.Linear: for LoRA "
            "use odeify.lora_config(model)"
        )


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


def _whole(basis: Tensor) -> Tensor:
    """A basis tensor whole: one that a tensor-parallel plan sharded (a DTensor, see
    :func:`odeify.models.tp_plan`) is gathered, differentiably (its gradient goes back to each
    rank's shard), as the forward computes W(t) with whole weights on every rank."""
    return basis.full_tensor() if _DTensor is not None and isinstance(basis, _DTensor) else basis


class WeightFunction(nn.Module):
    """Every parameter of a block as a function of depth time, p(t) = sum_k c_k(t) P_k.

    Args:
        shapes: {parameter name: shape at one time}, linear weights as [out, in].
        basis, num_basis, num_layers, basis_kwargs: the time basis (see
            :func:`odeify.bases.make_basis`); fixed bases span the layer times l / L.
        group_of: the weight group of a parameter name (a learned basis has one unit per group).
        transposed: parameters the grid cache stores as [in, out] (GPT-2's Conv1D layout).

    ``grid_cache_size`` (an attribute, default 4) is how many grids' weights the cache keeps,
    least recently used first out; each costs the block's weights times (grid points / K).

    Example:
        >>> wf = WeightFunction({"fc.weight": torch.Size([3, 2])}, "hat", 4, 4, {}, lambda n: "mlp")
        >>> wf.weights_at([0.0, 0.5])["fc.weight"].shape
        torch.Size([2, 3, 2])
    """

    def __init__(
        self,
        shapes: Mapping[str, torch.Size],
        basis: str,
        num_basis: int,
        num_layers: int,
        basis_kwargs: Mapping,
        group_of: Callable[[str], str],
        transposed: Collection[str] = (),
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.names = tuple(shapes)
        learned = make_basis(basis, num_basis, num_layers, **basis_kwargs).learned
        self.group = {n: group_of(n) if learned else "shared" for n in self.names}
        self.time_basis = nn.ModuleDict(
            {
                g: make_basis(basis, num_basis, num_layers, **basis_kwargs)
                for g in sorted(set(self.group.values()))
            }
        ).to(device)
        self.basis = _ParamTree()
        for name, shape in shapes.items():
            value = torch.empty(num_basis, *shape, dtype=dtype, device=device)
            _set_param(self.basis, name, nn.Parameter(value))
        self.fit_residuals: dict[str, float] = {}
        self._transposed = frozenset(transposed)
        self.grid_cache_size = 4
        self._grid_cache: OrderedDict[Hashable, tuple[tuple, list[Weights]]] = OrderedDict()

    # ------------------------------------------------------------------------------ evaluating
    def basis_tensor(self, name: str) -> Tensor:
        """P_k of one parameter, [K, *shape], plus the low-rank update while one is set."""
        return self._adapted(name, self._low_rank)

    def adapted_basis(self) -> Callable[[str], Tensor]:
        """``basis_tensor`` with the low-rank updates set now, for work done after the slot is
        emptied: a checkpointed step recomputed in backward, the adjoint's backward solve.

        Example:
            >>> block = odeify.get_block(model)
            >>> b, a = torch.ones(4, 128, 1), torch.ones(4, 1, 32)
            >>> block.set_low_rank({"mlp.c_fc.weight": [(b, a, 1.0)]})   # inside the forward
            >>> lookup = block.adapted_basis()
            >>> block.set_low_rank()                                     # the slot is emptied
            >>> update = lookup("mlp.c_fc.weight") - block.basis_tensor("mlp.c_fc.weight")
            >>> torch.allclose(update, torch.ones(4, 128, 32))   # the update of its moment
            True
        """
        return functools.partial(self._adapted, low_rank=self._low_rank, whole=True)

    def _adapted(
        self, name: str, low_rank: Mapping[str, Sequence[Factor]], whole: bool = False
    ) -> Tensor:
        # Without an update and not ``whole``: the parameter itself, which loaders write into.
        basis = _get(self.basis, name)
        terms = low_rank.get(name, ())
        if whole or terms:
            basis = _whole(basis)
        for lhs, rhs, scaling in terms:
            basis = torch.baddbmm(basis, lhs, rhs, alpha=scaling)
        return basis

    def coefficients(self, times) -> dict[str, Tensor]:
        """c(t) of every time basis for times given as a list of floats or a tensor: {group: [n, K]}.
        A tensor of times that requires grad stays in the graph (calibrated step times)."""
        if isinstance(times, Tensor):
            t64 = times.to("cpu", torch.float64).reshape(-1)
        else:
            t64 = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
        device = next(iter(self.basis.parameters())).device
        out = {}
        for group, basis in self.time_basis.items():
            t = t64.to(device, torch.float32) if basis.learned else t64
            out[group] = basis(t).to(device)
        return out

    def weights_at(self, times, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """W(t) at every time for every parameter (or those in ``names``): {name: [n, *shape]},
        one matmul per parameter.

        Example:
            >>> block = odeify.get_block(model)
            >>> block.weights_at([0.0, 0.5])["attn.c_attn.weight"].shape
            torch.Size([2, 96, 32])
        """
        return self._combine(self.coefficients(times), names, self.basis_tensor)

    def _combine(self, coeffs: dict[str, Tensor], names, lookup) -> dict[str, Tensor]:
        out = {}
        for name in self.names if names is None else names:
            basis = _whole(lookup(name))
            c = coeffs[self.group[name]].to(basis.dtype)
            with vectors_in_own_dtype(basis):
                value = c @ basis.reshape(basis.shape[0], -1)
            out[name] = value.view(c.shape[0], *basis.shape[1:])
        return out

    # ---------------------------------------------------------------------------- low-rank slot
    def set_low_rank(
        self, factors: Mapping[str, Sequence[Factor]] | None = None, state: Hashable = ()
    ) -> None:
        """Set (or, with no arguments, clear) the low-rank updates of the basis tensors.

        ``factors`` maps parameter names to updates (B [K, out, r], A [K, r, in], s) adding
        s B_k A_k to P_k; ``state`` names the adapter configuration that produced them (which
        adapters are active, disabled, merged): the grid cache is rebuilt when it changes, as
        merging writes into the basis without bumping its versions. This is the slot's only
        writer; :func:`odeify.lora_hooks.attach` calls it around every forward.

        Example:
            >>> shapes = {"fc.weight": torch.Size([3, 2])}
            >>> wf = WeightFunction(shapes, "hat", 4, 4, {}, lambda n: "mlp")
            >>> _ = wf.fit({"fc.weight": torch.zeros(4, 3, 2)}, progress=False)
            >>> b, a = torch.ones(4, 3, 1), torch.ones(4, 1, 2)
            >>> wf.set_low_rank({"fc.weight": [(b, a, 2.0)]}, state="adapter-1")
            >>> wf.weights_at([0.5])["fc.weight"][0, 0].tolist()
            [2.0, 2.0]
            >>> wf.set_low_rank()
            >>> wf.weights_at([0.5])["fc.weight"][0, 0].tolist()
            [0.0, 0.0]
        """
        # A new dict, never mutated: adapted_basis() holds on to the one of its moment. Held for
        # the calling thread: another thread's forward sets (and empties) its own.
        low_rank = {name: tuple(terms) for name, terms in (factors or {}).items()}
        local.put(self, "low_rank", (low_rank, state) if low_rank or state != () else None)

    @property
    def _low_rank(self) -> dict[str, tuple[Factor, ...]]:
        return local.get(self, "low_rank", _NO_LOW_RANK)[0]

    @property
    def _low_rank_state(self) -> Hashable:
        return local.get(self, "low_rank", _NO_LOW_RANK)[1]

    # ------------------------------------------------------------------------------ grid cache
    def _own_parameters(self) -> list[Tensor]:
        # The basis and time units, not the LoRA factors peft hangs under the basis
        # ("<module>.lora_A.<adapter>.weight"): those enter the grid as separate low-rank terms,
        # so frozen base weights stay cacheable under LoRA.
        return [
            p for n, p in self.named_parameters() if ".lora_A." not in n and ".lora_B." not in n
        ]

    def _reusable(self) -> bool:
        if torch.compiler.is_compiling():
            return False
        if any(parametrize.is_parametrized(m) for m in self.basis.modules()):
            return False  # a parametrised basis tensor depends on more than the basis
        return not (
            torch.is_grad_enabled() and any(p.requires_grad for p in self._own_parameters())
        )

    def _param_state(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self._own_parameters())

    def grid_weights(self, key: Hashable, times: list[float], cache: bool = True) -> list[Weights]:
        """Weights of each grid time (``key`` names the grid). With ``cache``, outside training
        and under LoRA with a frozen base, the base weights of the last ``grid_cache_size`` grids
        are kept until a parameter changes (in-place updates bump a parameter's version, a
        ``.data`` assignment replaces its storage) or the adapter state changes; a low-rank update
        rides along as factors. Edits the version counter does not see (``p.data.mul_()``, a
        numpy view) need :meth:`clear_weight_cache`."""
        base = functools.partial(_get, self.basis)
        if not (cache and self._reusable()):
            weights = self._split(self._combine(self.coefficients(times), None, base))
        else:
            state = (self._low_rank_state, self._param_state())
            weights = self._cached(key, state)
            if weights is None:
                # Built in the parameters' dtype even under autocast: the cache outlives the
                # autocast region (a bf16 training step, then an fp32 evaluation on the same grid).
                device = next(iter(self.basis.parameters())).device
                with torch.no_grad(), torch.autocast(device.type, enabled=False):
                    grid = self._combine(self.coefficients(times), None, base)
                    transposed = self._transposed.intersection(grid)
                    for name in transposed:
                        grid[name] = grid[name].mT.contiguous()
                    weights = self._split(grid, transposed)
                self._store(key, state, weights)
        return self._with_low_rank(weights, times) if self._low_rank else weights

    def _cached(self, key: Hashable, state: tuple) -> list[Weights] | None:
        with _CACHE_LOCK:
            entry = self._grid_cache.get(key)
            if entry is None or entry[0] != state:
                return None
            self._grid_cache.move_to_end(key)
            return entry[1]

    def _store(self, key: Hashable, state: tuple, weights: list[Weights]) -> None:
        # Two threads missing the same grid both build it (identically); the second insert wins.
        with _CACHE_LOCK:
            stale = [k for k, (s, _) in self._grid_cache.items() if s != state]
            for k in stale:
                del self._grid_cache[k]
            self._grid_cache[key] = (state, weights)
            self._grid_cache.move_to_end(key)
            while len(self._grid_cache) > max(1, self.grid_cache_size):
                self._grid_cache.popitem(last=False)

    def clear_weight_cache(self) -> None:
        """Drop every cached grid: needed only after edits that parameter versions miss.

        ``load_state_dict``, optimizer steps, in-place edits under ``torch.no_grad()``, ``.to()``
        and ``p.data = ...`` are seen by the cache; ``p.data.mul_(...)`` and writes through a
        numpy view of a parameter are not (``.data`` has a version counter of its own).

        Example:
            >>> block = odeify.get_block(model)
            >>> with torch.no_grad():
            ...     before = model(ids).logits
            ...     _ = block.basis_tensor("mlp.c_fc.weight").data.mul_(0.5)   # unseen by the cache
            ...     block.clear_weight_cache()
            ...     torch.equal(model(ids).logits, before)
            False
        """
        with _CACHE_LOCK:
            self._grid_cache.clear()

    def _with_low_rank(
        self, weights: list[Weights], times: list[float], low_rank: Mapping | None = None
    ) -> list[Weights]:
        """Each grid time's weights with dW(t) = sum_k c_k(t) s B_k A_k kept factored: only the k
        with c_k(t) != 0 (one or two for the hat basis), so the step costs what LoRA on a stock
        layer costs and no gradient of a full weight matrix is formed. ``low_rank``: the
        updates to use (default: the slot's, as this thread sees it now)."""
        coeffs = self.coefficients(times)
        out = [Weights(w.tensors, w.transposed, {}) for w in weights]
        for name, terms in (self._low_rank if low_rank is None else low_rank).items():
            c = coeffs[self.group[name]]
            live = (c != 0).cpu()
            for j, w in enumerate(out):
                ks = live[j].nonzero().flatten().to(c.device)
                pairs = w.lora.setdefault(name, [])
                for lhs, rhs, scaling in terms:
                    scale = (c[j, ks] * scaling).to(lhs.dtype).view(-1, 1, 1)
                    # sum_k c_k s B_k A_k as one product: [out, (k r)] @ [(k r), in].
                    b = rearrange(lhs[ks] * scale, "k o r -> o (k r)")
                    pairs.append((rearrange(rhs[ks], "k r i -> (k r) i"), b))
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
        if "_grid_cache" in self.__dict__:  # .to(), .half(), .cuda() replace parameter storage
            self.clear_weight_cache()
        return super()._apply(fn, *args, **kwargs)

    # --------------------------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit(self, samples: Mapping[str, Tensor], progress: bool = True) -> dict[str, float]:
        """Least-squares fit of the basis tensors to layer samples {name: [L, *shape]} at t = l / L.

        Returns (and stores in ``fit_residuals``) each parameter's relative residual
        ||W(t_l) - p_l|| / ||p_l|| over the layers, measured through the model's own weight path.

        Example:
            >>> shapes = {"fc.weight": torch.Size([3, 2])}
            >>> wf = WeightFunction(shapes, "hat", 4, 4, {}, lambda n: "mlp")
            >>> wf.fit({"fc.weight": torch.randn(4, 3, 2)}, progress=False)
            {'fc.weight': 0.0}
        """
        num_layers = next(iter(samples.values())).shape[0]
        layer_times = [layer / num_layers for layer in range(num_layers)]
        coeffs = self.coefficients(layer_times)
        for name in tqdm(self.names, desc="fitting W(t)", disable=not progress, leave=False):
            basis = self.basis_tensor(name)
            c = coeffs[self.group[name]].double().cpu()
            flat = samples[name].reshape(num_layers, -1)
            if c.shape[0] == c.shape[1] and torch.equal(c, torch.eye(c.shape[0], dtype=c.dtype)):
                solution = flat  # the hat basis at its own nodes: a copy, bit-exact
            else:
                # gelsd (SVD): deterministic, and the minimum-norm solution when K > L, where the
                # default driver leaves large residuals on full-row-rank systems.
                solution = torch.linalg.lstsq(c, flat.double().cpu(), driver="gelsd").solution
            basis.copy_(solution.reshape(basis.shape).to(basis.dtype))
        fitted = self.weights_at(layer_times)
        self.fit_residuals = {
            name: _relative_error(fitted[name].float(), samples[name].float())
            for name in self.names
        }
        self.clear_weight_cache()
        _warn_inexact(self.fit_residuals, next(iter(self.time_basis.values())), num_layers)
        return self.fit_residuals


def _warn_inexact(residuals: Mapping[str, float], basis: TimeBasis, num_layers: int) -> None:
    """K >= L promises a fit exact at every layer; say so when it is not, and when K > L
    leaves a fixed basis undetermined between the layers (a learned one is trained there).

    The warnings name fit()'s caller: stacklevel 4 counts this function, fit, and the wrapper
    that torch.no_grad() puts around fit (3 named that wrapper, inside torch)."""
    num_basis = basis.num_basis
    if num_basis > num_layers and not basis.learned:
        warnings.warn(
            f"num_basis K = {num_basis} > L = {num_layers} layers: the layers do not determine "
            "the basis tensors; the minimum-norm fit is exact at the layer times, but W(t) "
            "between them is not fitted to anything (use K <= L)",
            stacklevel=4,
        )
    worst = max(residuals, key=residuals.get)
    if num_basis >= num_layers and residuals[worst] > EXACT_FIT_TOLERANCE:
        warnings.warn(
            f"the fit is not exact although K = {num_basis} >= L = {num_layers}: relative "
            f"residual {residuals[worst]:.2e} for {worst} (the basis is ill-conditioned at this "
            "K in the model's dtype; the hat basis is exact at K = L)",
            stacklevel=4,
        )


def _relative_error(approx: Tensor, exact: Tensor) -> float:
    norm = exact.norm()
    diff = (approx - exact).norm()
    return float(diff / norm) if norm > 0 else float(diff)
