"""One model served from several threads: each request at its own depth, scheme and mode gets
exactly what it gets when it runs alone, and leaves the model as it found it."""

import threading

import pytest
import torch
from peft import get_peft_model

import odeify
from odeify import get_block
from odeify.lora import lora_config

IDS = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(0))
ROUNDS = 12  # per thread: enough interleaving to break shared state, a few seconds in all


def _forward(model, how: str, steps: int, scheme: str):
    with torch.no_grad():
        if how == "with":
            with odeify.steps(model, steps, scheme):
                return model(IDS, use_cache=False).logits
        if how == "call":
            return model(IDS, use_cache=False, ode_steps=steps, ode_scheme=scheme).logits
        with odeify.steps(model, steps, scheme):
            return model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)


def _serve(model, requests: list[tuple[str, int, str]]) -> list[int]:
    """Run every request in its own thread, ROUNDS times, all starting together; return the
    number of results that differ (bit for bit) from the request run alone."""
    expected = [_forward(model, *r) for r in requests]
    start, wrong, errors = threading.Barrier(len(requests)), [0] * len(requests), []

    def worker(j):
        try:
            start.wait()
            for _ in range(ROUNDS):
                wrong[j] += not torch.equal(_forward(model, *requests[j]), expected[j])
        except Exception as error:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return wrong


REQUESTS = {
    "with-steps": [("with", 2, "sequential"), ("with", 8, "sequential")],
    "per-call-steps": [("call", 2, "sequential"), ("call", 8, "sequential")],
    "per-call-scheme": [("call", 4, "euler"), ("call", 4, "rk4"), ("call", 3, "midpoint")],
    "generate": [("generate", 2, "sequential"), ("generate", 8, "sequential"), ("call", 4, "heun")],
}


@pytest.mark.parametrize("case", REQUESTS)
def test_concurrent_requests_at_other_depths_equal_serial_runs(make_gpt2, case):
    model = odeify.odeify(make_gpt2(), progress=False).eval()
    odeify.set_steps(model, 4)
    wrong = _serve(model, REQUESTS[case])
    assert wrong == [0] * len(REQUESTS[case])
    assert (get_block(model).ode.steps, get_block(model).ode.scheme) == (4, "sequential")


def test_concurrent_requests_through_a_lora_adapter_equal_serial_runs(make_llama):
    model = get_peft_model(odeify.odeify(make_llama(), progress=False), lora_config(r=2)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    assert _serve(model, [("call", 2, "sequential"), ("call", 6, "rk4")]) == [0, 0]


def test_with_steps_and_recording_are_local_to_the_thread(make_gpt2):
    model = odeify.odeify(make_gpt2(), progress=False).eval()
    block, seen = get_block(model), {}
    inside, done = threading.Event(), threading.Event()

    def other_thread():
        inside.wait()
        seen["steps"] = block.ode.resolved_steps
        with torch.no_grad():
            model(IDS, use_cache=False, ode_steps=3)
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with odeify.steps(model, 2), block.recording() as states, torch.no_grad():
        inside.set()
        done.wait()
        model(IDS, use_cache=False)
    thread.join()
    assert seen["steps"] == 4  # the other thread saw the model's own depth
    assert len(states) == 2  # and its 3 steps were not recorded here


def test_the_cache_keeps_grids_of_several_depths(make_gpt2, monkeypatch):
    model = odeify.odeify(make_gpt2(), progress=False).eval()
    block, builds = get_block(model), [0]
    original = block._combine

    def counting(*args):
        builds[0] += 1
        return original(*args)

    monkeypatch.setattr(block, "_combine", counting)
    with torch.no_grad():
        for _ in range(3):
            for n in (4, 2, 8):
                model(IDS, use_cache=False, ode_steps=n)
    assert builds[0] == 3  # one build per grid, then served from the cache
    block.grid_cache_size = 1
    block.clear_weight_cache()
    with torch.no_grad():
        for n in (4, 4, 2, 4):
            model(IDS, use_cache=False, ode_steps=n)
    assert builds[0] == 6 and len(block._grid_cache) == 1  # a size of one holds the last grid


def test_thread_local_values_belong_to_their_owner_kind_and_thread():
    from odeify import local

    a, b = object(), object()
    assert local.get(a, "steps") is None and local.get(a, "steps", "unset") == "unset"
    local.put(a, "steps", 3)
    local.put(a, "scheme", "rk4")
    try:
        assert (local.get(a, "steps"), local.get(a, "scheme"), local.get(b, "steps", 0)) == (
            3,
            "rk4",
            0,
        )
        seen = []
        other = threading.Thread(target=lambda: seen.append(local.get(a, "steps", "unset")))
        other.start()
        other.join()
        assert seen == ["unset"]
        with local.holding(a, "steps", 5):
            assert local.get(a, "steps") == 5
        assert local.get(a, "steps") == 3
    finally:
        local.put(a, "steps", None)
        local.put(a, "scheme", None)
    assert local.get(a, "steps", "unset") == "unset" and local.get(a, "scheme") is None
    local.put(b, "steps", None)  # removing what was never set is no error
    assert local.get(b, "steps", "unset") == "unset"
