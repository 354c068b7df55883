"""torch.compile friendliness: the native fixed-grid forward traces as one graph."""

import pytest
import torch

from odeify import get_block, odeify


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
