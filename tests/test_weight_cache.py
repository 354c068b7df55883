"""The weight cache: W(t) of the current grid is built once outside training and rebuilt exactly
when a parameter or the grid changes; in training, gradients reach the basis."""

import pytest
import torch

from odeify import get_block, odeify, steps

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
