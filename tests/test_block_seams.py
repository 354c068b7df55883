"""The ODE block's named seams: no global hooks at import, the recording and capture modes, the
weight function's low-rank slot, and the ODE settings kept once, in the parent's config."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from _stacklevel import record_callers

import odeify as odeify_module
from odeify import get_block, odeify, set_steps, steps
from odeify.config import ODESettings
from odeify.weight_function import WeightFunction

IDS = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(0))


def test_importing_odeify_registers_no_global_hooks():
    script = textwrap.dedent(
        """
        import torch.nn.modules.module as m
        names = [n for n in dir(m) if n.startswith("_global_") and n.endswith(("hooks", "called",
                 "kwargs"))]
        before = {n: dict(getattr(m, n)) for n in names}
        import odeify, odeify.lora, odeify.lora_hooks, odeify.train.distill, odeify.analysis
        after = {n: dict(getattr(m, n)) for n in names}
        assert "_global_module_registration_hooks" in names and "_global_forward_hooks" in names
        changed = [n for n in names if before[n] != after[n]]
        assert not changed, changed
        print("ok", len(names))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_recording_gives_the_hidden_states_transformers_reports_at_n_equals_l(
    make_gpt2, make_llama, family
):
    model = odeify(make_gpt2() if family == "gpt2" else make_llama(), progress=False)
    block = get_block(model)
    with torch.no_grad(), block.recording() as states:
        hidden = model(IDS, use_cache=False, output_hidden_states=True).hidden_states
    assert len(states) == block.ode.num_layers == len(hidden) - 1
    for mine, theirs in zip(states[:-1], hidden[1:-1], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    final_norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
    with torch.no_grad():
        torch.testing.assert_close(final_norm(states[-1]), hidden[-1], rtol=0, atol=0)
    with (
        block.recording(),
        pytest.raises(RuntimeError, match="already being recorded"),
        block.recording(),
    ):
        pass


def test_recorded_states_stay_in_the_autograd_graph(make_llama):
    model = odeify(make_llama(), progress=False).train()
    block = get_block(model)
    with block.recording() as states:
        model(IDS, use_cache=False)
    states[1].pow(2).sum().backward()
    assert block.basis_tensor("mlp.down_proj.weight").grad.abs().sum() > 0


def test_capture_records_what_bind_makes_of_the_call_and_skips_the_integration(make_llama):
    model = odeify(make_llama(), progress=False)
    block = get_block(model)
    with torch.no_grad(), block.capture() as calls, block.recording() as states:
        model(IDS, use_cache=False, ode_steps=5, ode_scheme="rk4")
    assert len(calls) == 1 and states == []  # bound, never stepped
    call = calls[0]
    with torch.no_grad():
        x0, run = block.bind(*call.args, **call.kwargs)
    torch.testing.assert_close(call.x, x0, rtol=0, atol=0)
    assert (call.run.steps, call.run.solver, call.run.times) == (5, run.solver, run.times)
    assert call.run.index == run.index and len(call.run.weights) == len(run.weights)
    for mine, theirs in zip(call.run.weights, run.weights, strict=True):
        for name in block.names:
            torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=0)
    with torch.no_grad():  # stepping the captured run is the model's own integration
        x = call.x
        for i in range(call.run.steps):
            x = block.step(x, call.run, i)
        with block.recording() as states:
            model(IDS, use_cache=False, ode_steps=5, ode_scheme="rk4")
    torch.testing.assert_close(x, states[-1], rtol=0, atol=0)


def test_the_low_rank_slot_adds_to_the_basis_and_keys_the_grid_cache(make_gpt2):
    block = get_block(odeify(make_gpt2(), progress=False))
    assert isinstance(block, WeightFunction)
    name = "mlp.c_fc.weight"
    k, rows, cols = block.basis_tensor(name).shape
    b, a = torch.randn(k, rows, 2), torch.randn(k, 2, cols)
    plain = block.weights_at([0.5])[name]
    with torch.no_grad():
        cached = block.grid_weights("grid", [0.5])
        assert block.grid_weights("grid", [0.5]) is cached  # same grid, same state: reused
        block.set_low_rank({name: [(b, a, 0.5)]}, state="adapter")
        adapted = block.weights_at([0.5])[name]
        lifted = block.grid_weights("grid", [0.5])
        block.set_low_rank()
    c = block.coefficients([0.5])["shared"]
    expected = plain + torch.einsum("nk,kor->nor", c, 0.5 * b @ a)
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-5)
    assert lifted is not cached and name in lifted[0].lora  # factors ride beside the grid
    torch.testing.assert_close(block.weights_at([0.5])[name], plain, rtol=0, atol=0)


def test_a_deep_copy_keeps_its_own_lora_hooks(make_llama):
    model = odeify(make_llama(), progress=False)
    twin = copy.deepcopy(model)
    for m in (model, twin):
        block = get_block(m)
        assert len(block._forward_pre_hooks) == 1 and len(block._forward_hooks) == 1
    (hook,) = get_block(twin)._forward_pre_hooks.values()
    assert hook.__self__ is not next(iter(get_block(model)._forward_pre_hooks.values())).__self__


def test_the_ode_settings_live_once_in_the_parent_config(make_gpt2, tmp_path):
    model = odeify(make_gpt2(), progress=False)
    block = get_block(model)
    assert isinstance(block.ode, ODESettings) and "odeify" not in vars(block)
    set_steps(model, 3, scheme="heun")
    assert (model.config.odeify["steps"], model.config.odeify["scheme"]) == (3, "heun")
    assert (block.ode.steps, block.ode.scheme, block.ode.resolved_steps) == (3, "heun", 3)
    block.ode.cache_weights = False  # an assignment is an update of the config's dict
    assert model.config.odeify["cache_weights"] is False
    model.config.odeify["rtol"] = 1e-5  # and the view reads the dict, no second copy
    assert block.ode.rtol == 1e-5
    with steps(model, 5, "rk4"):  # this thread's view changes; the saved settings do not
        assert (block.ode.steps, block.ode.scheme) == (5, "rk4")
        assert model.config.odeify["steps"] == 3
    assert (block.ode.steps, block.ode.scheme) == (3, "heun")
    for bad, error in (({"scheme": "warp"}, ValueError), ({"steps": 0}, ValueError)):
        with pytest.raises(error):
            block.ode.update(**bad)
    with pytest.raises(ValueError, match="unknown odeify settings"):
        block.ode.warp_drive = True
    assert (block.ode.steps, block.ode.scheme) == (3, "heun")  # refused changes change nothing

    odeify_module.save_pretrained(model, tmp_path / "m")
    loaded = odeify_module.from_pretrained(tmp_path / "m")
    assert get_block(loaded).ode == block.ode
    assert loaded.config.odeify == model.config.odeify
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(IDS, use_cache=False).logits, model(IDS, use_cache=False).logits
        )


def test_the_low_rank_update_outlives_the_forward_for_a_recomputed_step(make_llama):
    """A checkpointed per-sample step is recomputed in backward, after the forward has emptied
    the slot; it must see the same LoRA update the forward saw."""
    from peft import get_peft_model

    from odeify import lora_config

    base, grads = make_llama(), []
    for remat in (False, True):
        model = odeify(copy.deepcopy(base), progress=False, checkpoint_steps=remat)
        model = get_peft_model(model, lora_config(r=2))
        torch.manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_" in name:
                    p.normal_(0, 0.5)
        model.train()
        model(IDS, labels=IDS, use_cache=False, ode_steps=torch.tensor([2, 3])).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if ".lora_B" in n})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-3, atol=1e-5)


# The block's refusals, each with its full message (a partial match lets a mangled one pass).
def _block(make_gpt2, **kw):
    return get_block(odeify(make_gpt2(**kw), progress=False))


def test_a_second_capture_is_refused(make_gpt2):
    block = _block(make_gpt2)
    with block.capture(), pytest.raises(RuntimeError) as error, block.capture():
        pass
    assert str(error.value) == "this model's ODE block is already capturing its calls"
    with block.capture() as calls:  # left cleanly: capturing again works
        assert calls == []


def test_cross_attention_inputs_are_refused(make_gpt2):
    block = _block(make_gpt2)
    x = torch.zeros(1, 3, 32)
    with pytest.raises(ValueError) as error:
        block(hidden_states=x, encoder_hidden_states=x)
    assert str(error.value) == (
        "odeified models have no cross-attention; do not pass encoder_hidden_states"
    )


def test_a_given_schedule_must_match_the_run(make_gpt2):
    from odeify.schedule import Schedule
    from odeify.schemes import resolve_solver

    block = _block(make_gpt2)
    sequential = resolve_solver("sequential")
    given = Schedule.uniform(2, 4, "sequential")
    assert block.schedule_for(sequential, 2, given) is given
    with pytest.raises(ValueError) as error:
        block.schedule_for(sequential, 3, given)
    assert str(error.value) == (
        "the schedule given has 2 steps of 'sequential'; the run has 3 steps of 'sequential'"
    )
    with pytest.raises(ValueError) as error:
        block.schedule_for(resolve_solver("euler"), 2, given)
    assert str(error.value) == (
        "the schedule given has 2 steps of 'sequential'; the run has 2 steps of 'euler'"
    )
    with pytest.raises(ValueError) as error:
        block.schedule_for(sequential, 2, "fastest")
    assert str(error.value) == (
        "ode_schedule must be a Schedule or one of ('calibrated', 'uniform'), got 'fastest'"
    )


def test_per_sample_refusals_in_full(make_gpt2):
    ids = IDS[:, :3]
    model = odeify(make_gpt2(), progress=False)
    with pytest.raises(ValueError) as error, torch.no_grad():
        model(ids, use_cache=False, ode_steps=torch.tensor([2, 3]), ode_scheme="dopri5")
    assert (
        str(error.value) == "per-sample step counts need a native fixed-grid scheme, not 'dopri5'"
    )
    with pytest.raises(ValueError) as error, torch.no_grad():
        model(ids, use_cache=False, ode_steps=torch.tensor([2, 3, 4]))
    assert str(error.value) == "got 3 per-sample step counts for a batch of 2"
    scaled = odeify(make_gpt2(scale_attn_by_inverse_layer_idx=True), progress=False)
    with pytest.raises(ValueError) as error, torch.no_grad():
        scaled(ids, use_cache=False, ode_steps=torch.tensor([2, 3]))
    assert str(error.value) == (
        "per-sample step counts are not supported with scale_attn_by_inverse_layer_idx"
    )
    # Equal counts are one grid for the batch, which that model runs.
    with torch.no_grad():
        same = scaled(ids, use_cache=False, ode_steps=torch.tensor([4, 4])).logits
        torch.testing.assert_close(same, scaled(ids, use_cache=False).logits, rtol=0, atol=0)


def test_the_block_repr_names_its_settings(make_gpt2):
    block = _block(make_gpt2)
    assert block.extra_repr() == ("family=gpt2, L=4, basis=hat, K=4, scheme=sequential, steps=4")


def test_selected_hidden_states_are_the_stock_models_at_n_equals_l(make_gpt2):
    # output_hidden_states=[1, 3] keeps those states and puts None for the others (transformers'
    # own selection, which the block's recording follows): the stock model's, bit for bit.
    base = make_gpt2()
    with torch.no_grad():
        want = base(IDS, output_hidden_states=[1, 3], use_cache=False).hidden_states
        got = odeify(base, progress=False)(IDS, output_hidden_states=[1, 3], use_cache=False)
    assert [s is None for s in got.hidden_states] == [True, False, True, False, True]
    assert [s is None for s in want] == [True, False, True, False, True]
    for mine, theirs in zip(got.hidden_states, want, strict=True):
        if theirs is not None:
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_torchdiffeq_steps_see_their_times(make_gpt2):
    # GPT-2's scale_attn_by_inverse_layer_idx scales attention by 1 / (t L + 1): torchdiffeq's
    # Euler on the same grid is the native Euler only if each evaluation gets its own time.
    model = odeify(make_gpt2(scale_attn_by_inverse_layer_idx=True), progress=False)
    with torch.no_grad():
        native = model(IDS, use_cache=False, ode_scheme="euler", ode_steps=4).logits
        bridged = model(IDS, use_cache=False, ode_scheme="torchdiffeq:euler", ode_steps=4).logits
    torch.testing.assert_close(bridged, native, rtol=0, atol=0)


def _claim_error(cache, grid, slots=2, tokens=1):
    from odeify.block import _claim_cache

    with pytest.raises(ValueError) as error:
        _claim_cache(cache, grid, slots, tokens)
    return str(error.value)


def test_claiming_a_kv_cache_counts_tokens_and_replicates_its_layers():
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    from odeify.block import _claim_cache

    cache = Cache(layers=[DynamicLayer()])  # no layer class to replicate: the block copies
    _claim_cache(cache, ("rk4", 2, "uniform"), 8, 5)
    assert len(cache.layers) == 8 and cache._odeify == (("rk4", 2, "uniform"), 5)
    assert len({id(layer) for layer in cache.layers}) == 8
    _claim_cache(cache, ("rk4", 2, "uniform"), 8, 1)  # the next token, same grid
    assert len(cache.layers) == 8 and cache._odeify == (("rk4", 2, "uniform"), 6)
    # Claimed but never filled (no tokens yet): another grid may still take it.
    empty = DynamicCache()
    _claim_cache(empty, ("rk4", 2, "uniform"), 8, 0)
    _claim_cache(empty, ("euler", 3, "uniform"), 3, 4)
    assert empty._odeify == (("euler", 3, "uniform"), 4) and empty.layers == []
    assert _claim_error(Cache(layers=[]), ("euler", 3, "uniform")) == (
        "past_key_values has no layers to replicate; pass a DynamicCache()"
    )


def test_a_kv_cache_of_another_grid_is_refused_in_full():
    from transformers.cache_utils import DynamicCache

    from odeify.block import _claim_cache

    stock = DynamicCache()
    stock.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), 0)  # one token is enough
    assert _claim_error(stock, ("rk4", 2, "uniform")) == (
        "past_key_values already holds keys that odeify did not write (e.g. from the original "
        "model); pass past_key_values=None to start a new cache"
    )
    adaptive = DynamicCache()
    _claim_cache(adaptive, ("dopri5", None, None), 0, 3)
    assert _claim_error(adaptive, ("dopri5", None, None)) == (
        "scheme 'dopri5' is integrated by torchdiffeq, which keeps no KV cache: call "
        "generate(..., use_cache=False) or use a native fixed-grid scheme"
    )
    filled = DynamicCache()
    _claim_cache(filled, ("rk4", 2, "uniform"), 8, 3)
    assert _claim_error(filled, ("rk4", 2, "calibrated")) == (
        "this KV cache was filled under another schedule of 2 steps of 'rk4' (calibrated or "
        "uniform, see odeify.steps(..., schedule=)); its keys belong to that grid's times. Start "
        "a new cache (past_key_values=None) or restore it."
    )
    assert _claim_error(filled, ("euler", 3, "uniform")) == (
        "this KV cache was filled at 2 steps of 'rk4' but the model now runs 3 steps of "
        "'euler'; a cache holds one slot per step and stage, so it is valid for one grid only. "
        "Start a new cache (past_key_values=None) or restore the steps."
    )
    assert "now runs adaptive steps of 'dopri5'" in _claim_error(filled, ("dopri5", None, None))


@pytest.mark.parametrize("adjoint", [False, True])
def test_torchdiffeq_gets_the_method_grid_tolerances_and_trainable_parameters(
    make_gpt2, monkeypatch, adjoint
):
    import odeify.block as block_module

    calls = []

    def spy(name):
        real = getattr(block_module, name)

        def wrapper(field, x, t, **kwargs):
            calls.append((name, t.tolist(), kwargs))
            return real(field, x, t, **kwargs)

        monkeypatch.setattr(block_module, name, wrapper)

    spy("odeint")
    spy("odeint_adjoint")
    model = odeify(make_gpt2(), progress=False)
    block = get_block(model)
    block.ode.update(rtol=2e-3, atol=3e-4, adjoint=adjoint)
    block.basis_tensor("ln_1.weight").requires_grad_(False)
    with torch.no_grad():
        model(IDS, use_cache=False, ode_scheme="dopri5")
        model(IDS, use_cache=False, ode_scheme="torchdiffeq:euler", ode_steps=4)
    name = "odeint_adjoint" if adjoint else "odeint"
    assert [c[:2] for c in calls] == [(name, [0.0, 1.0])] * 2
    dopri5, euler = (c[2] for c in calls)
    params = dopri5.pop("adjoint_params", None)
    euler.pop("adjoint_params", None)
    assert dopri5 == {"method": "dopri5", "rtol": 2e-3, "atol": 3e-4}
    assert euler == {"method": "euler", "options": {"step_size": 0.25}}
    if adjoint:  # the parameters that train, the frozen one left out
        trainable = [p for p in block.parameters() if p.requires_grad]
        assert len(params) == len(trainable) == len(list(block.parameters())) - 1
        assert all(a is b for a, b in zip(params, trainable, strict=True))


def test_schedule_for_serves_a_stored_schedule_of_its_scheme_and_warns_once_otherwise(
    make_gpt2, monkeypatch
):
    import warnings

    from odeify.schedule import Schedule
    from odeify.schemes import resolve_solver

    block = _block(make_gpt2)
    sequential, euler = resolve_solver("sequential"), resolve_solver("euler")
    odd = Schedule([0.0, 0.3], [1.0, 0.7, 1.6, 1.2], 4)  # 2 sequential steps, 2 gains each
    block.ode.update(schedules={"2": odd.to_dict()})
    assert block.schedule_for(sequential, 2).key == odd.key
    assert block.schedule_for(sequential, 2, "uniform").key == Schedule.uniform(2, 4).key
    with pytest.warns(UserWarning) as record:
        stored_for_another = block.schedule_for(euler, 2)
        block.schedule_for(euler, 2)  # said once per (scheme, N)
        block.schedule_for(sequential, 3)
    assert stored_for_another.key == Schedule.uniform(2, 4, "euler").key
    tail = "; running the uniform grid. Calibrate it with odeify.calibrate(model, steps=[...])."
    assert [str(w.message) for w in record] == [
        "no calibrated 'euler' schedule for 2 steps (calibrated: 2)" + tail,
        "no calibrated 'sequential' schedule for 3 steps (calibrated: 2)" + tail,
    ]
    eulers = Schedule([0.0, 0.3], [0.4, 0.6], 4, "euler")  # one step size per step
    block.ode.update(schedules={"2": eulers.to_dict()})
    assert block.schedule_for(euler, 2).key == eulers.key
    # Saved before schedules named their scheme: a sequential one.
    unnamed = {k: v for k, v in odd.to_dict().items() if k != "scheme"}
    block.ode.update(schedules={"2": unnamed})
    assert block.schedule_for(sequential, 2).key == odd.key
    # Several calibrated counts are listed in numeric order (10 after 2, as text it would come
    # first); the warning names schedule_for's caller.
    block.ode.update(schedules={"10": Schedule.uniform(10, 4).to_dict(), "2": odd.to_dict()})
    callers = record_callers(monkeypatch, 2)
    with pytest.warns(UserWarning) as record:
        block.schedule_for(sequential, 1)
    assert [str(w.message) for w in record] == [
        "no calibrated 'sequential' schedule for 1 steps (calibrated: 2, 10)" + tail
    ]
    assert [(w.filename, w.lineno) for w in record] == callers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert block.schedule_for(sequential, 4).key == Schedule.uniform(4, 4).key  # N = L
        block.ode.update(schedules={}, discrete_ends=1)
        assert block.schedule_for(sequential, 3).key == Schedule.discrete_ends(3, 4, 1).key


def test_torchdiffeq_claims_a_kv_cache_for_no_slots_and_counts_its_tokens(make_gpt2):
    from transformers.cache_utils import Cache

    block = _block(make_gpt2)
    cache = Cache(layers=[])  # nothing to replicate: fine for a run that needs no slot
    with torch.no_grad():
        block(hidden_states=torch.randn(1, 3, 32), past_key_values=cache, ode_scheme="dopri5")
    assert cache._odeify == (("dopri5", None, None), 3)


def test_an_adaptive_solver_refuses_half_precision_in_full(make_gpt2):
    block = _block(make_gpt2)
    with pytest.raises(ValueError) as error, torch.no_grad():
        block(hidden_states=torch.randn(1, 3, 32, dtype=torch.bfloat16), ode_scheme="dopri5")
    assert str(error.value) == (
        "the adaptive solver 'dopri5' cannot run a torch.bfloat16 model: its step-size control "
        "underflows ('underflow in dt'); use model.float() or a fixed-grid scheme"
    )


def test_per_sample_counts_follow_the_schedule_choice(make_gpt2):
    from odeify.schedule import Schedule

    model = odeify(make_gpt2(), progress=False)
    odd = Schedule([0.0, 0.3], [1.0, 0.7, 1.6, 1.2], 4)  # a stored schedule for 2 steps
    get_block(model).ode.update(schedules={"2": odd.to_dict()})

    def logits(ids, counts, **kw):
        with torch.no_grad():
            return model(ids, use_cache=False, ode_steps=counts, **kw).logits

    both = logits(IDS, torch.tensor([2, 4]), ode_schedule="uniform")
    alone = logits(IDS[:1], 2, ode_schedule="uniform")
    calibrated = logits(IDS[:1], 2)
    # Per-sample runs go through time_linear: the same sums in another order (float32).
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)
    assert (alone - calibrated).abs().max() > 1e-2  # the choice matters at 2 steps


def test_the_layer_keywords_the_block_consumes_do_not_reach_attention(make_llama, monkeypatch):
    # An attention function registered with transformers need not take the layer call's own
    # use_cache or encoder_attention_mask: the block hands attention only what is left.
    from odeify.adapters import llama

    model = odeify(make_llama(), progress=False)
    model.set_attn_implementation("eager")
    seen, attend = [], llama.eager_attention_forward

    def recording(*args, **kwargs):
        seen.append(sorted(kwargs))
        return attend(*args, **kwargs)

    monkeypatch.setattr(llama, "eager_attention_forward", recording)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), use_cache=True)
    assert seen and all("use_cache" not in s and "encoder_attention_mask" not in s for s in seen)


def test_a_torchdiffeq_scheme_reports_the_block_s_input_and_its_end(make_llama):
    # torchdiffeq picks its own evaluation times: the states between them are no layers' outputs,
    # so transformers gets the block's input and the end of the integration.
    model = odeify(make_llama(), progress=False)
    with torch.no_grad():
        ours = model(IDS, use_cache=False, output_hidden_states=True, ode_scheme="euler")
        theirs = model(
            IDS, use_cache=False, output_hidden_states=True, ode_scheme="torchdiffeq:euler"
        )
    assert len(theirs.hidden_states) == 2
    torch.testing.assert_close(theirs.hidden_states[0], ours.hidden_states[0], rtol=0, atol=0)
    # The same Euler steps, summed in torchdiffeq's order: float32 rounding apart.
    torch.testing.assert_close(
        theirs.hidden_states[1], ours.hidden_states[-1], rtol=1e-5, atol=1e-5
    )
