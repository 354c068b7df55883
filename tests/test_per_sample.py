"""Per-sample step counts: every sample of a batch on its own grid, linear layers through
time_linear; each sample's output equals that sample run alone at its own step count."""

import pytest
import torch

from odeify import Schedule, get_block, odeify, set_steps, steps
from odeify.time_linear import time_linear_backend

IDS = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(0))
COUNTS = torch.tensor([2, 5, 3])


@pytest.fixture(params=["gpt2", "llama"])
def model(request, make_gpt2, make_llama):
    raw = make_gpt2() if request.param == "gpt2" else make_llama(num_hidden_layers=4)
    return odeify(raw, progress=False)


def _alone(model, scheme, **kw):
    with torch.no_grad():
        return torch.cat(
            [
                model(
                    IDS[b : b + 1], ode_steps=int(n), ode_scheme=scheme, use_cache=False, **kw
                ).logits
                for b, n in enumerate(COUNTS)
            ]
        )


@pytest.mark.parametrize("scheme", ["sequential", "euler", "midpoint", "rk4"])
def test_each_sample_equals_running_alone(model, scheme):
    with torch.no_grad():
        batch = model(IDS, ode_steps=COUNTS, ode_scheme=scheme, use_cache=False).logits
    torch.testing.assert_close(batch, _alone(model, scheme), rtol=0, atol=1e-5)


def test_the_triton_kernel_serves_the_model(model):
    """time_linear's Triton path (interpreter mode on CPU) inside the model, against the reference."""
    with torch.no_grad():
        reference = model(IDS, ode_steps=COUNTS, use_cache=False).logits
        with time_linear_backend("triton"):
            fused = model(IDS, ode_steps=COUNTS, use_cache=False).logits
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-4)


def test_generate_with_per_request_depth(model):
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), steps(model, COUNTS):
        batch = model.generate(IDS, **kw)
    for b, n in enumerate(COUNTS.tolist()):
        with torch.no_grad(), steps(model, n):
            assert torch.equal(model.generate(IDS[b : b + 1], **kw)[0], batch[b])


def test_equal_counts_take_the_shared_path(model):
    with torch.no_grad():
        for ids, counts in ((IDS, torch.tensor([3, 3, 3])), (IDS[:1], torch.tensor([3]))):
            torch.testing.assert_close(
                model(ids, ode_steps=counts).logits,
                model(ids, ode_steps=3).logits,
                rtol=0,
                atol=0,
            )


def test_a_float64_model_keeps_each_samples_times_and_gains_in_float64(make_llama):
    # Calibrated times (1/3, 2/3) and gains that float32 cannot hold: each sample as if alone,
    # to float64 rounding.
    model = odeify(make_llama(num_hidden_layers=6), progress=False).double()
    block = get_block(model)
    for layers in ([0, 3], [0, 2, 4]):
        gains = [1.0 + k / 30 for k in range(2 * len(layers))]
        block.store_schedule(Schedule.from_layers(layers, 6, gains=gains))
    counts = torch.tensor([2, 3])
    with torch.no_grad():
        batch = model(IDS[:2], ode_steps=counts, use_cache=False).logits
        alone = [
            model(IDS[b : b + 1], ode_steps=int(n), use_cache=False).logits
            for b, n in enumerate(counts)
        ]
    torch.testing.assert_close(batch, torch.cat(alone), rtol=0, atol=1e-12)


def _basis_grads(model, ids, counts) -> dict:
    block = get_block(model)
    model.zero_grad()
    model(ids, labels=ids, ode_steps=counts, use_cache=False).loss.backward()
    return {n: block.basis_tensor(n).grad.clone() for n in block.names}


def test_per_sample_gradients_are_the_mean_of_each_sample_alone(model):
    """Depth-robust training: each sample draws its own step count. The batch loss is the mean
    over samples of equal length, so its gradient is the mean of each sample's own gradient."""
    batch = _basis_grads(model, IDS, COUNTS)
    alone = [_basis_grads(model, IDS[b : b + 1], int(n)) for b, n in enumerate(COUNTS)]
    for name, grad in batch.items():
        expected = sum(g[name] for g in alone) / len(alone)
        # float32, summed in another order (per-sample time_linear vs one shared weight).
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)
        assert grad.abs().sum() > 0


def test_the_triton_backward_in_the_model_equals_the_reference(make_llama):
    """time_linear's Triton backward (interpreter mode on CPU) inside a model's forward and
    backward: the basis gradients of the PyTorch reference path, to float32 rounding (Llama
    only: the interpreter takes seconds per backward, and the kernels do not see the family)."""
    model = odeify(make_llama(num_hidden_layers=4), progress=False)
    reference = _basis_grads(model, IDS, COUNTS)
    with time_linear_backend("triton"):
        fused = _basis_grads(model, IDS, COUNTS)
    for name, grad in reference.items():
        torch.testing.assert_close(fused[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "counts,error,match",
    [
        (torch.tensor([2, 0, 3]), ValueError, ">= 1"),
        (torch.tensor([2, 3]), ValueError, "2 per-sample step counts for a batch of 3"),
        (torch.tensor([2.0, 3.0, 1.0]), TypeError, "integers"),
        (torch.tensor([[2, 3, 1]]), ValueError, "1-D"),
    ],
)
def test_bad_per_sample_counts(model, counts, error, match):
    with pytest.raises(error, match=match):
        model(IDS, ode_steps=counts, use_cache=False)


def test_adaptive_schemes_and_saved_settings_refuse_per_sample_counts(model):
    with pytest.raises(ValueError, match="native fixed-grid scheme"):
        model(IDS, ode_steps=COUNTS, ode_scheme="dopri5", use_cache=False)
    with pytest.raises(TypeError, match="set_steps saves one step count"):
        set_steps(model, COUNTS)


def test_a_cache_is_bound_to_its_per_sample_grid(model):
    with torch.no_grad():
        cache = model(IDS, ode_steps=COUNTS, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="filled at"):
            model(
                IDS[:, :1], ode_steps=torch.tensor([2, 5, 4]), past_key_values=cache, use_cache=True
            )
