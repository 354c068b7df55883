"""The weight cache: W(t) of the current grid is built once outside training and rebuilt exactly
when a parameter or the grid changes; in training, gradients reach the basis."""

import warnings

import pytest
import torch

from odeify import get_block, odeify, steps
from odeify.weight_function import WeightFunction

IDS = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model(make_gpt2):
    return odeify(make_gpt2(), progress=False)


@pytest.fixture
def builds(model, monkeypatch):
    """Counts how often the block evaluates W(t) on a grid."""
    block, count = get_block(model), [0]
    original = block._combine

    def counting(*args):
        count[0] += 1
        return original(*args)

    monkeypatch.setattr(block, "_combine", counting)
    return count


def _run(model, **kw):
    with torch.no_grad():
        return model(IDS, use_cache=False, **kw).logits


def test_weights_are_built_once_per_grid(model, builds):
    _run(model)
    _run(model)
    _run(model)
    assert builds[0] == 1
    _run(model, ode_steps=3)
    assert builds[0] == 2
    _run(model, ode_steps=3)
    assert builds[0] == 2


def test_an_in_place_parameter_update_invalidates_the_cache(model, builds):
    before = _run(model)
    with torch.no_grad():
        get_block(model).basis_tensor("mlp.c_fc.weight").mul_(0.5)
    after = _run(model)
    assert builds[0] == 2 and not torch.allclose(before, after)


def test_an_optimizer_step_invalidates_the_cache(model, builds):
    _run(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(IDS, labels=IDS, use_cache=False).loss.backward()
    optimizer.step()
    model.eval()
    stale = builds[0]
    fresh = _run(model)
    assert builds[0] == stale + 1
    get_block(model).ode.cache_weights = False
    torch.testing.assert_close(_run(model), fresh, rtol=0, atol=0)


def test_without_cache_weights_each_forward_builds_its_grid_and_keeps_none(model, builds):
    get_block(model).ode.cache_weights = False
    _run(model)
    _run(model)
    assert builds[0] == 2 and len(get_block(model)._grid_cache) == 0


def test_load_state_dict_and_dtype_changes_invalidate_the_cache(model, builds):
    _run(model)
    state = {k: v.clone() * 1.01 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    _run(model)
    assert builds[0] == 2
    model.to(torch.float64)
    assert _run(model).dtype == torch.float64 and builds[0] == 3


def test_training_forward_builds_with_gradients_to_the_basis(model, builds):
    model.train()
    for _ in range(2):
        model(IDS, labels=IDS, use_cache=False).loss.backward()
    assert builds[0] == 2  # no reuse while gradients are needed
    block = get_block(model)
    assert all(block.basis_tensor(n).grad.abs().sum() > 0 for n in block.names)


def test_basis_gradients_at_l_are_the_original_layers_gradients(make_gpt2):
    """Hat basis at N = L: P_l is layer l's parameter, so dLoss/dP_l is the original's gradient
    of layer l (eval mode: no dropout draws to keep in step)."""
    import copy

    from odeify.surgery import layer_samples

    original = make_gpt2()
    model = odeify(copy.deepcopy(original), progress=False)
    model(IDS, labels=IDS, use_cache=False).loss.backward()
    original(IDS, labels=IDS, use_cache=False).loss.backward()
    grads = copy.deepcopy(original)
    with torch.no_grad():
        for p, q in zip(grads.parameters(), original.parameters(), strict=True):
            p.copy_(q.grad)
    expected = layer_samples(grads)  # the gradients in the basis' layout ([out, in])
    block = get_block(model)
    for name in block.names:
        # The same products summed in another order (one [L]-stacked op vs L layer ops).
        torch.testing.assert_close(
            block.basis_tensor(name).grad, expected[name], rtol=1e-5, atol=1e-7
        )


def test_gradients_reach_a_learned_time_basis(make_llama):
    model = odeify(make_llama(), basis="fourier", num_basis=4, progress=False).train()
    with steps(model, 5):
        model(IDS, labels=IDS, use_cache=False).loss.backward()
    unit = get_block(model).time_basis["q"]
    assert unit.lin1.weight.grad is not None and unit.lin1.weight.grad.abs().sum() > 0


def test_per_step_checkpointing_gives_the_same_gradients(make_llama):
    grads = []
    for remat in (False, True):
        torch.manual_seed(1)
        model = odeify(make_llama(), progress=False, checkpoint_steps=remat).train()
        model(IDS, labels=IDS, use_cache=False).loss.backward()
        grads.append(get_block(model).basis_tensor("mlp.up_proj.weight").grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_transformers_activation_checkpointing_switch_reaches_the_block(model):
    model.activation_checkpointing_enable()
    assert get_block(model).stepper.gradient_checkpointing
    model.train()
    model(IDS, labels=IDS, use_cache=False).loss.backward()
    assert get_block(model).basis_tensor("ln_1.weight").grad is not None


def test_a_parametrised_basis_tensor_is_never_served_stale(model):
    """A parametrisation (a shared dW, say) makes the weights depend on more than the basis
    parameters, so the cache must not hold them."""

    class Shift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.delta = 0.0  # state no parameter version tracks

        def forward(self, basis):
            return basis + self.delta

    tree = get_block(model).basis.get_submodule("mlp.c_fc")
    shift = Shift()
    torch.nn.utils.parametrize.register_parametrization(tree, "weight", shift)
    before = _run(model)
    shift.delta = 0.1
    assert not torch.allclose(_run(model), before)


def test_weights_cached_under_autocast_serve_a_full_precision_forward(model):
    # Frozen weights are cached in training too (a LoRA step); a bf16 autocast step must not
    # leave bf16 weights behind for the fp32 evaluation that follows on the same grid.
    expected = _run(model, ode_steps=3)
    get_block(model).clear_weight_cache()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(IDS, use_cache=False, ode_steps=3)
    torch.testing.assert_close(_run(model, ode_steps=3), expected, rtol=0, atol=0)


def test_a_data_assignment_invalidates_the_cache(model, builds):
    before = _run(model)
    p = get_block(model).basis_tensor("mlp.c_fc.weight")
    p.data = p.data * 0.5  # new storage: the cache sees another data pointer
    after = _run(model)
    assert builds[0] == 2 and not torch.allclose(before, after)
    get_block(model).ode.cache_weights = False
    torch.testing.assert_close(_run(model), after, rtol=0, atol=0)


def test_edits_the_version_counter_misses_need_clear_weight_cache(model, builds):
    # `.data` (and a numpy view) write the storage behind the parameter's version counter: the
    # cache cannot see it, which is why clear_weight_cache exists and the README names it.
    before = _run(model)
    get_block(model).basis_tensor("mlp.c_fc.weight").data.mul_(0.5)
    get_block(model).clear_weight_cache()
    fresh = _run(model)
    assert builds[0] == 2 and not torch.allclose(fresh, before)
    get_block(model).ode.cache_weights = False
    torch.testing.assert_close(_run(model), fresh, rtol=0, atol=0)


# WeightFunction alone (no model): the eviction order, the stale entries, the stored layout and
# the factored low-rank terms of a grid, against direct evaluations.
_SHAPES = {"fc.weight": torch.Size([3, 2]), "fc.bias": torch.Size([3])}


def _fitted_wf(num_basis=4, num_layers=4, basis="hat", transposed=()):
    wf = WeightFunction(
        _SHAPES, basis, num_basis, num_layers, {}, lambda name: "mlp", transposed=transposed
    )
    g = torch.Generator().manual_seed(0)
    samples = {
        name: torch.randn(num_layers, *shape, generator=g) for name, shape in _SHAPES.items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wf.fit(samples, progress=False)
    return wf, samples


def test_the_grid_cache_evicts_the_least_recently_used_grid():
    wf, _ = _fitted_wf()
    assert wf.grid_cache_size == 4  # the documented default
    wf.grid_cache_size = 2
    with torch.no_grad():
        a = wf.grid_weights("a", [0.0])
        wf.grid_weights("b", [0.25])
        assert wf.grid_weights("a", [0.0]) is a  # a hit: served, and now the most recent
        wf.grid_weights("c", [0.5])  # evicts b, the least recently used, not a
        assert list(wf._grid_cache) == ["a", "c"]
        assert wf.grid_weights("a", [0.0]) is a


def test_the_default_cache_keeps_four_grids_and_a_size_below_one_keeps_one():
    wf, _ = _fitted_wf()
    with torch.no_grad():
        for key in "abcde":
            wf.grid_weights(key, [0.0])
        assert list(wf._grid_cache) == ["b", "c", "d", "e"]
        wf.grid_cache_size = 0  # max(1, size): the grid being built is always kept
        wf.grid_weights("f", [0.0])
        assert list(wf._grid_cache) == ["f"]


def test_a_parameter_change_drops_every_grid_of_the_old_state():
    wf, _ = _fitted_wf()
    with torch.no_grad():
        wf.grid_weights("a", [0.0])
        wf.grid_weights("b", [0.25])
        wf.basis_tensor("fc.weight").mul_(2.0)  # bumps the version: both entries are stale
        fresh = wf.grid_weights("c", [0.5])
        assert list(wf._grid_cache) == ["c"]
        torch.testing.assert_close(
            fresh[0]["fc.weight"], wf.weights_at([0.5])["fc.weight"][0], rtol=0, atol=0
        )


def test_cached_grids_store_transposed_weights_and_uncached_ones_do_not():
    wf, _ = _fitted_wf(transposed=["fc.weight"])
    exact = wf.weights_at([0.0, 0.375])
    with torch.no_grad():
        cached = wf.grid_weights("a", [0.0, 0.375])
        plain = wf.grid_weights("a", [0.0, 0.375], cache=False)
    for j in range(2):
        assert cached[j].transposed == frozenset({"fc.weight"}) and not plain[j].transposed
        torch.testing.assert_close(cached[j]["fc.weight"], exact["fc.weight"][j].mT, rtol=0, atol=0)
        assert cached[j]["fc.weight"].is_contiguous()
        torch.testing.assert_close(plain[j]["fc.weight"], exact["fc.weight"][j], rtol=0, atol=0)
        torch.testing.assert_close(cached[j]["fc.bias"], exact["fc.bias"][j], rtol=0, atol=0)


def test_a_grid_carries_only_the_live_low_rank_terms_and_they_add_the_full_update():
    wf, _ = _fitted_wf()
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(4, 3, 2, generator=g), torch.randn(4, 2, 2, generator=g)
    wf.set_low_rank({"fc.weight": [(b, a, 0.5)]}, state="adapter")
    times = [0.0, 0.375, 0.75]  # a node (k = 0), between nodes 1 and 2, the last node
    exact = wf.weights_at(times)  # W(t) with the full update s sum_k c_k B_k A_k
    x = torch.randn(5, 2, generator=g)
    with torch.no_grad():
        grid = wf.grid_weights("a", times)
    # Factored as [(k r), in] and [out, (k r)] over the k with c_k(t) != 0 only.
    assert [tuple(w.lora["fc.weight"][0][0].shape) for w in grid] == [(2, 2), (4, 2), (2, 2)]
    for j, w in enumerate(grid):
        want = x @ exact["fc.weight"][j].T + exact["fc.bias"][j]
        torch.testing.assert_close(w.linear("fc", x), want, rtol=1e-6, atol=1e-6)
    # The cache keeps the frozen weights without the update.
    with torch.no_grad():
        wf.set_low_rank()
        base = wf.weights_at(times)
    for j, w in enumerate(wf._grid_cache["a"][1]):
        assert not w.lora
        torch.testing.assert_close(w["fc.weight"], base["fc.weight"][j], rtol=0, atol=0)


def test_moving_the_parameters_empties_the_cache_and_keeps_the_apply_options():
    wf, _ = _fitted_wf()
    with torch.no_grad():
        wf.grid_weights("a", [0.0])
    wf.double()  # new storage: the old grid's weights are dropped, not kept until a new store
    assert len(wf._grid_cache) == 0
    # to_empty(recurse=False) passes its keyword through _apply: the basis (a child module) stays.
    before = wf.basis_tensor("fc.weight").data_ptr()
    wf.to_empty(device="cpu", recurse=False)
    assert wf.basis_tensor("fc.weight").data_ptr() == before


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_trainable_lora_factors_under_the_basis_leave_a_frozen_base_cacheable(factor):
    # peft hangs "<module>.lora_A.<adapter>.weight" under the basis; those enter a grid as
    # low-rank terms, so a trainable factor (either of the two) must not disable the cache.
    from odeify.weight_function import _set_param

    wf, _ = _fitted_wf()
    wf.requires_grad_(False)
    _set_param(wf.basis, f"fc.{factor}.default.weight", torch.nn.Parameter(torch.zeros(4, 1, 2)))
    assert torch.is_grad_enabled()
    first = wf.grid_weights("a", [0.0, 0.375])
    assert wf.grid_weights("a", [0.0, 0.375]) is first
    # An own parameter that trains does disable it (each call builds with gradients).
    wf.basis_tensor("fc.bias").requires_grad_(True)
    assert wf.grid_weights("a", [0.0, 0.375]) is not wf.grid_weights("a", [0.0, 0.375])


def test_a_low_rank_update_without_a_state_applies_and_a_state_alone_keys_the_cache():
    wf, _ = _fitted_wf()
    b, a = torch.ones(4, 3, 1), torch.ones(4, 1, 2)
    base = wf.weights_at([0.375])["fc.weight"]
    wf.set_low_rank({"fc.weight": [(b, a, 2.0)]})  # the default state ()
    # c @ (P + 2) against c @ P + 2 (the hat's c sums to 1): one float32 rounding at |W| ~ 2.
    torch.testing.assert_close(wf.weights_at([0.375])["fc.weight"], base + 2.0, rtol=0, atol=3e-7)
    # No factors, but a state (an adapter merged into the basis, which bumps no version): the
    # state alone decides whether a cached grid is still valid.
    with torch.no_grad():
        wf.set_low_rank(state="merged-1")
        first = wf.grid_weights("a", [0.0])
        assert wf.grid_weights("a", [0.0]) is first
        wf.set_low_rank(state="merged-2")
        assert wf.grid_weights("a", [0.0]) is not first


def test_an_emptied_low_rank_slot_holds_no_reference_to_the_block():
    import gc
    import weakref

    wf = WeightFunction(_SHAPES, "hat", 4, 4, {}, lambda name: "mlp")
    wf.set_low_rank({"fc.weight": [(torch.ones(4, 3, 1), torch.ones(4, 1, 2), 1.0)]})
    wf.set_low_rank()
    ref = weakref.ref(wf)
    del wf
    gc.collect()
    assert ref() is None  # the thread's slot dropped its entry, not kept an empty one


def test_the_time_units_take_the_basis_options_and_everything_the_device():
    group = {"fc.weight": "mlp", "fc.bias": "norm"}.get
    wf = WeightFunction(_SHAPES, "fourier", 5, 4, {"features": 3, "hidden": 7}, group)
    # A learned basis has one unit per weight group, each built with the options given.
    assert sorted(wf.time_basis) == ["mlp", "norm"]
    assert wf.group == {"fc.weight": "mlp", "fc.bias": "norm"}
    assert {tuple(u.lin1.weight.shape) for u in wf.time_basis.values()} == {(7, 2 * 3 + 1)}
    # device= reaches both the basis tensors and the time units (meta: nothing allocated).
    meta = WeightFunction(_SHAPES, "fourier", 5, 4, {}, group, device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert [tuple(p.shape) for p in meta.basis.parameters()] == [(5, 3, 2), (5, 3)]


def test_while_compiling_no_grid_is_cached(monkeypatch):
    # Under torch.compile the cache (a lock, data pointers, version counters) is not traced:
    # every call builds its grid. Stands in for a compile, which costs seconds on CPU.
    wf, _ = _fitted_wf()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert wf.grid_weights("a", [0.0]) is not wf.grid_weights("a", [0.0])
    assert len(wf._grid_cache) == 0


def test_weights_at_evaluates_only_the_names_asked_for():
    wf, _ = _fitted_wf()
    full = wf.weights_at([0.375])
    only = wf.weights_at([0.375], names=["fc.bias"])
    assert list(only) == ["fc.bias"]
    torch.testing.assert_close(only["fc.bias"], full["fc.bias"], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_model_caches_its_weights_in_its_own_layers_layout(make_gpt2, make_llama, family):
    # GPT-2's Conv1D projections are [in, out]: its cached grid keeps them so, contiguous, for
    # addmm to read as they are; Llama's nn.Linear weights stay [out, in].
    model = odeify(make_gpt2() if family == "gpt2" else make_llama(), progress=False).eval()
    block = get_block(model)
    conv1d = {f"attn.{p}.weight" for p in ("c_attn", "c_proj")} | {
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
    }
    expected = conv1d if family == "gpt2" else set()
    times = [0.0, 0.25, 0.5, 0.75]
    exact = block.weights_at(times)
    with torch.no_grad():
        cached = block.grid_weights(("sequential", tuple(times)), times)
    for j, weights in enumerate(cached):
        assert weights.transposed == expected
        for name in expected:
            assert weights[name].is_contiguous()
            torch.testing.assert_close(weights[name], exact[name][j].mT, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_terms_ride_on_a_transposed_cached_grid_in_the_basis_dtype(dtype):
    # GPT-2's Conv1D weights are cached as [in, out]; the factors stay [(k r), in], [out, (k r)]
    # in the factors' dtype (the hat's float32 coefficients must not promote them).
    wf, _ = _fitted_wf(transposed=["fc.weight"])
    wf.to(dtype)
    g = torch.Generator().manual_seed(2)
    b = torch.randn(4, 3, 2, generator=g).to(dtype)
    a = torch.randn(4, 2, 2, generator=g).to(dtype)
    wf.set_low_rank({"fc.weight": [(b, a, 0.5)]}, state="adapter")
    times = [0.0, 0.375]
    exact = wf.weights_at(times)
    x = torch.randn(5, 2, generator=g).to(dtype)
    with torch.no_grad():
        grid = wf.grid_weights("a", times)
    for j, w in enumerate(grid):
        assert w.transposed == frozenset({"fc.weight"})
        assert {t.dtype for pair in w.lora["fc.weight"] for t in pair} == {dtype}
        want = x.double() @ exact["fc.weight"][j].double().T + exact["fc.bias"][j].double()
        tol = 1e-6 if dtype == torch.float32 else 0.05  # bf16: 8 bits, sums of a few terms
        torch.testing.assert_close(w.linear("fc", x).double(), want, rtol=tol, atol=tol)
