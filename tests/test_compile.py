"""torch.compile friendliness: the native fixed-grid forward traces as one graph, and
``odeify.compile`` compiles one solver step that every step count shares."""

import copy
from contextlib import nullcontext

import pytest
import torch

import odeify as odeify_api
from odeify import Schedule, get_block, odeify


def _block_call(model):
    """The ODE block and the exact arguments its parent passes it."""
    block, captured = get_block(model), {}
    handle = block.register_forward_pre_hook(
        lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True
    )
    with torch.no_grad():
        model(torch.randint(1, 97, (2, 8)), use_cache=False)
    handle.remove()
    return block, captured["args"], captured["kwargs"]


@pytest.mark.parametrize("scheme", ["sequential", "euler", "rk4"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_native_forward_has_no_graph_breaks(make_gpt2, make_llama, family, scheme):
    model = odeify(make_gpt2() if family == "gpt2" else make_llama(), progress=False)
    block, args, kwargs = _block_call(model)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(block)(*args, ode_scheme=scheme, ode_steps=3, **kwargs)
    assert explanation.graph_break_count == 0, [
        str(r.reason)[:200] for r in explanation.break_reasons
    ]
    assert explanation.graph_count == 1


def test_compiled_block_matches_eager(make_llama):
    model = odeify(make_llama(), progress=False)
    block, args, kwargs = _block_call(model)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(*args, **kwargs), block(*args, **kwargs), rtol=0, atol=0
        )


class _Counting:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return graph.forward


def _compiled_pair(make, **odeify_kw):
    model = odeify(make(), progress=False, **odeify_kw).eval()
    reference = copy.deepcopy(model)
    backend = _Counting()
    torch._dynamo.reset()
    assert odeify_api.compile(model, backend=backend) is model
    return model, reference, backend


IDS = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("scheme", ["sequential", "euler", "midpoint", "rk4"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_compiled_step_serves_every_step_count(make_gpt2, make_llama, family, scheme):
    # torch.compile(model) traces the loop unrolled: a graph per step count, and eager after
    # dynamo's recompile_limit (8). odeify.compile's step is traced once for all of them.
    model, reference, backend = _compiled_pair(make_gpt2 if family == "gpt2" else make_llama)
    with torch.no_grad():
        for n in range(1, 9):
            got = model(IDS, use_cache=False, ode_steps=n, ode_scheme=scheme).logits
            expected = reference(IDS, use_cache=False, ode_steps=n, ode_scheme=scheme).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"N = {n}")
    assert backend.graphs == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_calibrated_schedules_share_the_compiled_step(make_llama, dtype):
    # float64: the gains the compiled step is given as tensors stay float64 (1.4 is not a float32).
    model, reference, backend = _compiled_pair(make_llama)
    for m in (model, reference):
        m.to(dtype)
        block = get_block(m)
        for n, gains in ((2, [1.4, 1.6, 1.2, 1.7]), (4, [0.9] * 8)):
            times = [0.0, 0.4] if n == 2 else [0.0, 0.1, 0.37, 0.7]
            block.store_schedule(Schedule(times, gains, 3))
    with torch.no_grad():
        for n in (2, 5, 4):  # 5 has no calibrated schedule: the uniform grid
            with pytest.warns(UserWarning, match="no calibrated") if n == 5 else nullcontext():
                got = model(IDS, use_cache=False, ode_steps=n).logits
            expected = reference(IDS, use_cache=False, ode_steps=n).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"N = {n}")
    assert backend.graphs == 1


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_generation_at_new_step_counts_compiles_nothing(
    make_gpt2, make_llama, family, cache
):
    if family == "gpt2" and cache == "static":
        pytest.skip("the static cache is exercised on Llama")
    model, reference, backend = _compiled_pair(make_gpt2 if family == "gpt2" else make_llama)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    counts = []
    for n in (3, 5, 2, 7):
        got = model.generate(IDS, ode_steps=n, **kw)
        torch.testing.assert_close(got, reference.generate(IDS, ode_steps=n, **kw), msg=f"N={n}")
        counts.append(backend.graphs)
    # The first generation traces prefill and decode (and decode again once the cache length
    # is seen to vary); the KV-cache slot of each step is given to the step as its cache layer.
    assert counts[0] <= 3 and counts == [counts[0]] * 4


def test_a_compiled_model_grows_an_empty_cache_the_caller_gives(make_llama):
    # DynamicCache() made without a config has no layers: the compiled step adds its slot's.
    from transformers import DynamicCache

    model, reference, _ = _compiled_pair(make_llama)
    with torch.no_grad():
        for n in (2, 5):
            caches = DynamicCache(), DynamicCache()
            for ids in (IDS[:, :-1], IDS[:, -1:]):  # the prompt, then one token on its cache
                got = model(ids, past_key_values=caches[0], ode_steps=n).logits
                expected = reference(ids, past_key_values=caches[1], ode_steps=n).logits
                torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"N = {n}")
            assert len(caches[0].layers) == len(caches[1].layers) == n
            for mine, theirs in zip(*(c.layers for c in caches), strict=True):
                assert torch.equal(mine.keys, theirs.keys) and mine.keys.shape[-2] == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_checkpointed_training_gives_the_eager_gradients(make_llama, dtype):
    # float64: a checkpointed step builds W(t) at its own times, which must reach the basis in
    # float64 (times rounded to float32 move these gradients by up to 5e-8).
    model, reference, backend = _compiled_pair(make_llama)
    grads = []
    for m in (model, reference):
        m.to(dtype).train().activation_checkpointing_enable()
        for n in (2, 5):
            m(IDS, labels=IDS, use_cache=False, ode_steps=n).loss.backward()
        grads.append({k: p.grad for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    # The compiled graph and the eager step sum in different orders: float32 differs by ulps.
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for name in grads[1]:
        torch.testing.assert_close(
            grads[0][name], grads[1][name], **tol, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert backend.graphs == 1


def test_compiled_lora_steps_stop_compiling_after_two_step_counts(make_llama):
    from peft import get_peft_model

    model, reference, backend = _compiled_pair(make_llama)
    torch.manual_seed(1)
    peft_models = []
    for m in (model, reference):
        torch.manual_seed(1)
        peft = get_peft_model(m, odeify_api.lora_config(r=2))
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)  # a live update (B starts at zero)
        peft_models.append(peft)
    counts = []
    with torch.no_grad():
        for n in (2, 3, 5, 4, 6):
            got, expected = (m(IDS, use_cache=False, ode_steps=n).logits for m in peft_models)
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"N = {n}")
            counts.append(backend.graphs)
    # The factors are views of one tensor of the grid's times: the second step count makes its
    # length symbolic (and step 0, whose input needs no grad, has a graph of its own).
    assert counts[1:] == [counts[1]] * 4 and counts[1] <= 3


@pytest.mark.parametrize("switch", ["transformers", "checkpoint_steps"])
def test_per_sample_step_counts_run_eagerly_under_odeify_compile(make_llama, switch):
    # Eager, but still checkpointed by the switch that is on: each step runs again in backward.
    model, reference, backend = _compiled_pair(make_llama)
    counts = torch.tensor([2, 5])
    grads = []
    for m in (model, reference):
        m.train()
        if switch == "transformers":
            m.activation_checkpointing_enable()
        else:
            get_block(m).ode.checkpoint_steps = True
        block, calls = get_block(m), []
        step = block.step
        block.step = lambda x, run, i, step=step, calls=calls: calls.append(i) or step(x, run, i)
        out = m(IDS, labels=IDS, use_cache=False, ode_steps=counts)
        out.loss.backward()
        assert sorted(calls) == [i for i in range(5) for _ in range(2)], switch
        grads.append({k: p.grad for k, p in m.named_parameters() if p.grad is not None})
    assert backend.graphs == 0  # each sample's grid is indexed per step: nothing traced
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)
