"""Training under CPU bf16 autocast (what ``Trainer(bf16=True)`` does on CPU): the ODE model at
N = L trains as the original trains under the same autocast, and per-sample grids train too."""

import copy

import pytest
import torch

from odeify import get_block, odeify
from odeify import steps as at_steps
from odeify.surgery import block_stack

IDS = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def _bf16_loss(model, counts=None):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if counts is None:
            loss = model(IDS, labels=IDS).loss
        else:
            with at_steps(model, counts):
                loss = model(IDS, labels=IDS).loss
    loss.backward()
    return loss.detach().float()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_autocast_training_equals_the_original_under_autocast(family, make_gpt2, make_llama):
    # eval(): no dropout, so both models see the same computation; gradients flow all the same.
    original = make_gpt2() if family == "gpt2" else make_llama()
    model = odeify(copy.deepcopy(original), progress=False)
    block = get_block(model)
    stock = _bf16_loss(original)
    ode = _bf16_loss(model)
    # The hat basis at the layer times copies each layer's weights, so the bf16 casts are the
    # stock model's; what differs is the order of a few fp32 accumulations.
    assert abs(ode - stock) < 1e-4
    for name in block.names:
        grads = [dict(layer.named_parameters())[name].grad for layer in block_stack(original)]
        expected = torch.stack([g.t() if block.family.is_transposed(name) else g for g in grads])
        got = block.basis_tensor(name).grad
        assert (
            torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.999
        )
        assert block.basis_tensor(name).dtype == torch.float32


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_autocast_trains_per_sample_grids(family, make_gpt2, make_llama):
    model = odeify(make_gpt2() if family == "gpt2" else make_llama(), progress=False)
    counts = torch.tensor([2, 3])
    with at_steps(model, counts):
        fp32 = model(IDS, labels=IDS).loss
    fp32.backward()
    expected = {n: p.grad.clone() for n, p in get_block(model).basis.named_parameters()}
    bf16 = _bf16_loss(model, counts)
    # bf16 keeps about 3 significant digits of a loss of about 4.7.
    assert abs(bf16 - fp32.detach()) < 0.05
    # The per-sample gradients under autocast point where the float32 ones do.
    for name, p in get_block(model).basis.named_parameters():
        cosine = torch.nn.functional.cosine_similarity(
            p.grad.flatten(), expected[name].flatten(), 0
        )
        assert cosine > 0.99, name
