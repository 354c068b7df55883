"""transformers' activation checkpointing on the ODE block: ``activation_checkpointing_enable()``
checkpoints each solver step (the block's ``GradientCheckpointingLayer``), and a recomputed step
repeats the step of its forward: the depth, scheme and LoRA update resolved then, even when the
backward runs in another thread (as autograd's device threads do on CUDA), where this thread's
``odeify.steps`` and LoRA slot are not set."""

import threading

import pytest
import torch
from peft import get_peft_model
from transformers.modeling_layers import GradientCheckpointingLayer

import odeify
from odeify import get_block, lora_config

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
# A checkpointed step builds its own W(t) (one time) where the plain forward builds the grid's at
# once: the same sums, rounded by BLAS kernels that differ by CPU (AMD EPYC: 1.5e-7 relative).
STRICT = dict(rtol=1e-5, atol=1e-7)


def _model(make_llama, layers=3):
    return odeify.odeify(make_llama(num_hidden_layers=layers), progress=False).train()


def _loss(model, **kw):
    return model(IDS, labels=IDS, use_cache=False, **kw).loss


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same(got, expected):
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **STRICT, msg=name)


def test_the_switch_turns_on_a_checkpointing_layer_that_recomputes_each_step(make_llama):
    model = _model(make_llama)
    block = get_block(model)
    assert isinstance(block.stepper, GradientCheckpointingLayer)
    calls = []
    step = block.step
    block.step = lambda x, run, i: calls.append(i) or step(x, run, i)
    _loss(model).backward()
    assert calls == [0, 1, 2]  # off: each step once
    calls.clear()
    model.activation_checkpointing_enable()
    assert block.stepper.gradient_checkpointing and model.is_activation_checkpointing
    _loss(model).backward()
    assert sorted(calls) == [0, 0, 1, 1, 2, 2]  # on: each step again in backward
    model.activation_checkpointing_disable()
    assert not block.stepper.gradient_checkpointing


def test_every_n_layers_checkpoints_every_n_th_step(make_llama):
    model = _model(make_llama, layers=4)
    block = get_block(model)
    _loss(model).backward()
    expected = _grads(model)
    calls = []
    step = block.step
    block.step = lambda x, run, i: calls.append(i) or step(x, run, i)
    model.activation_checkpointing_enable(every_n_layers=2)
    _loss(model).backward()
    assert sorted(calls) == [0, 0, 1, 2, 2, 3]  # steps 0 and 2 recomputed, 1 and 3 kept
    _assert_same(_grads(model), expected)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("depth", ["default", "with steps", "per call"])
def test_checkpointed_gradients_equal_plain_ones(make_llama, depth, reentrant):
    model = _model(make_llama)

    def loss():
        if depth == "with steps":
            with odeify.steps(model, 2):
                return _loss(model)
        return _loss(model, ode_steps=5) if depth == "per call" else _loss(model)

    loss().backward()
    expected = _grads(model)
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    loss().backward()
    _assert_same(_grads(model), expected)


def test_a_backward_in_another_thread_recomputes_the_forward_depth(make_llama):
    # The forward runs at 2 of 3 steps inside odeify.steps; the backward (so the recompute) runs
    # in a thread where odeify.steps was never entered: re-reading the settings there would
    # recompute 3 steps, whose saved tensors differ from the forward's.
    model = _model(make_llama)
    with odeify.steps(model, 2):
        _loss(model).backward()
    expected = _grads(model)
    model.activation_checkpointing_enable()
    with odeify.steps(model, 2):
        loss = _loss(model)
    errors = []

    def backward():
        try:
            loss.backward()
        except Exception as error:  # surfaced below: a thread's exception is otherwise lost
            errors.append(error)

    thread = threading.Thread(target=backward)
    thread.start()
    thread.join()
    assert not errors, errors
    _assert_same(_grads(model), expected)


def test_a_lora_update_is_recomputed_from_its_forward_in_another_thread(make_llama):
    # The adapter's factors sit in a per-thread slot that the forward's post-hook empties: the
    # recompute (here in another thread) must use the factors of its forward.
    model = get_peft_model(_model(make_llama), lora_config(r=2, model=_model(make_llama)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.train()
    _loss(model).backward()
    expected = _grads(model)
    model.base_model.model.activation_checkpointing_enable()
    loss = _loss(model)
    thread = threading.Thread(target=loss.backward)
    thread.start()
    thread.join()
    got = _grads(model)
    assert any("lora_" in name for name in expected)
    _assert_same(got, expected)


def test_a_kv_cache_is_dropped_while_checkpointing(make_llama, monkeypatch):
    # A recomputed step would append its keys to the cache a second time in backward (the
    # cache would hold every token twice); like transformers' checkpointed layers, the block
    # runs without the cache while checkpointing. odeify's own checkpoint_steps setting leaves
    # the parent model passing its cache, so the block drops it, and says so (once a process:
    # warning_once, recorded here so that an earlier test's warning does not hide this one).
    model = _model(make_llama)
    _loss(model).backward()
    expected = _grads(model)
    get_block(model).ode.checkpoint_steps = True
    warned = []
    monkeypatch.setattr(odeify.block._logger, "warning_once", warned.append)
    out = model(IDS, labels=IDS, use_cache=True)
    out.loss.backward()
    assert out.past_key_values.get_seq_length() == 0
    assert warned == [
        "Caching is incompatible with activation checkpointing in the ODE block: running "
        "without past_key_values."
    ]
    _assert_same(_grads(model), expected)


def _saved_bytes(model) -> int:
    """Bytes autograd keeps for backward during one forward (the activations)."""
    seen = {}

    def pack(tensor):
        seen[(tensor.data_ptr(), tensor.shape, tensor.dtype)] = (
            tensor.numel() * tensor.element_size()
        )
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model)
    return sum(seen.values())


def test_checkpointing_keeps_a_fraction_of_the_activations(make_llama):
    # Measured, not timed: what the forward saves for backward. Unchecked, every step's
    # activations (and W(t) of every step) are kept; checkpointed, the steps' inputs only.
    model = _model(make_llama, layers=6)
    plain = _saved_bytes(model)
    model.activation_checkpointing_enable()
    checkpointed = _saved_bytes(model)
    assert checkpointed < plain / 3, (checkpointed, plain)
