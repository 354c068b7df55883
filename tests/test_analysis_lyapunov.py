"""Per-token Lyapunov exponents on tiny GPT-2 and Llama models, against brute-force Jacobians."""

import json

import pytest
import torch

from odeify import get_block, odeify
from odeify.analysis import lyapunov, spectra
from odeify.analysis.benettin import random_subspace
from odeify.analysis.lyapunov import capture_call, diagonal_routing

pytestmark = pytest.mark.usefixtures("one_thread")


IDS = torch.tensor([5, 17, 3, 88, 41, 9, 60])


def _flow(model, ids, steps=None, scheme=None):
    """The true flow map x(0) -> x(1) over the whole sequence, and x(0)."""
    block = get_block(model)
    args, kwargs = capture_call(model, ids[None])
    with torch.no_grad():
        x0, run = block.bind(*args, ode_steps=steps, ode_scheme=scheme, **kwargs)

    def flow(x):
        for i in range(run.steps):
            x = block.step(x, run, i)
        return x

    return flow, x0.detach()


def _diagonal_blocks(model, ids, steps=None, scheme=None):
    """d x_k(1) / d x_k(0) for every token k, from the full Jacobian of the unmodified flow."""
    flow, x0 = _flow(model, ids, steps, scheme)
    jacobian = torch.autograd.functional.jacobian(flow, x0, vectorize=True)[
        0, :, :, 0
    ]  # [T, d, T, d]
    return torch.stack([jacobian[k, :, k] for k in range(len(ids))]).double()


CASES = [("gpt2", None, None), ("llama", None, None), ("llama", 2, "rk4"), ("gpt2", 3, "midpoint")]


@pytest.mark.parametrize(("family", "steps", "scheme"), CASES)
def test_benettin_pass_matches_the_true_flow_jacobian(make_gpt2, make_llama, family, steps, scheme):
    model = odeify(make_gpt2() if family == "gpt2" else make_llama(), progress=False)
    blocks = _diagonal_blocks(model, IDS, steps, scheme)
    lam = lyapunov(model, IDS, steps=steps, scheme=scheme, k=3, refine=0, seed=4, progress=False)
    # Without refinement: the QR exponents of D_k Q0 for the same seeded Q0, exactly.
    q0 = random_subspace((len(IDS),), blocks.shape[-1], 3, seed=4, dtype=torch.float64)
    r = torch.linalg.qr(blocks @ q0).R.diagonal(dim1=-2, dim2=-1).abs().log()
    expected = r.sort(-1, descending=True).values
    assert torch.allclose(lam.exponents, expected, atol=2e-4)
    assert lam.exponents.shape == (len(IDS), 3) and lam.steps == (steps or lam.steps)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_refined_exponents_are_log_singular_values(make_gpt2, make_llama, family):
    model = odeify(make_gpt2() if family == "gpt2" else make_llama(), progress=False)
    blocks = _diagonal_blocks(model, IDS)
    lam = lyapunov(model, IDS, k=2, refine=8, progress=False)
    expected = torch.linalg.svdvals(blocks).log()[:, :2]
    assert torch.allclose(lam.exponents, expected, atol=2e-3)
    # The residual (the last iteration's change) is of the order of the error left.
    assert ((lam.exponents - expected).abs() <= 2 * lam.residual + 1e-5).all()
    plain = lyapunov(model, IDS, k=2, refine=0, progress=False)
    assert (plain.largest <= lam.largest + 1e-4).all()  # a random subspace grows less


def test_routing_keeps_the_primal_and_restores_the_model(make_llama):
    model = odeify(make_llama(), progress=False)
    flow, x0 = _flow(model, IDS)
    implementation = model.config._attn_implementation
    with torch.no_grad():
        plain = flow(x0)
        with diagonal_routing(model.config):
            routed = flow(x0)
    assert torch.allclose(plain, routed, atol=1e-5)
    lyapunov(model, IDS, k=1, refine=0, progress=False)
    assert model.config._attn_implementation == implementation
    with pytest.raises(ValueError):
        lyapunov(model, IDS, k=0, progress=False)
    assert model.config._attn_implementation == implementation


def test_a_token_does_not_depend_on_later_tokens(make_llama):
    model = odeify(make_llama(), progress=False)
    full = lyapunov(model, IDS, k=2, refine=1, progress=False)
    prefix = lyapunov(model, IDS[:4], k=2, refine=1, progress=False)
    assert torch.allclose(full.exponents[:4], prefix.exponents, atol=1e-4)
    changed = IDS.clone()
    changed[2] = 70
    other = lyapunov(model, changed, k=2, refine=1, progress=False)
    assert torch.allclose(other.exponents[:2], full.exponents[:2], atol=1e-4)
    assert not torch.allclose(other.exponents[2:], full.exponents[2:], atol=1e-3)


def test_result_and_json(make_gpt2):
    model = odeify(make_gpt2(), progress=False)
    lam = lyapunov(model, IDS[None], k=3, refine=1, progress=False)
    assert (lam.exponents.diff(dim=-1) <= 0).all() and torch.equal(lam.largest, lam.exponents[:, 0])
    numbers = json.loads(json.dumps(lam.to_dict(tokens=[str(i) for i in IDS.tolist()])))
    assert numbers["token_ids"] == IDS.tolist() and len(numbers["exponents"][0]) == 3
    assert numbers["steps"] == 4 and numbers["scheme"] == "sequential"


def test_bad_input(make_gpt2, make_llama):
    plain = make_llama()
    with pytest.raises(ValueError, match="not odeified.*odeify\\(model\\)"):
        lyapunov(plain, IDS, progress=False)
    model = odeify(plain, progress=False)
    with pytest.raises(ValueError, match="empty"):
        lyapunov(model, torch.tensor([], dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="context is 64.*shorten"):
        lyapunov(model, torch.zeros(65, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="one sequence"):
        lyapunov(model, IDS.repeat(2, 1), progress=False)
    with pytest.raises(TypeError, match="integer token ids"):
        lyapunov(model, IDS.float(), progress=False)
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        lyapunov(model, torch.tensor([1, 200]), progress=False)
    with pytest.raises(ValueError, match="between 1 and the hidden size 32"):
        lyapunov(model, IDS, k=33, progress=False)
    with pytest.raises(ValueError, match="torchdiffeq.*native fixed-grid"):
        lyapunov(model, IDS, scheme="dopri5", progress=False)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        lyapunov(model, IDS, steps=0, progress=False)
    with pytest.raises(ValueError, match="model.eval"):
        lyapunov(model.train(), IDS, progress=False)


@pytest.mark.slow
def test_smollm2_gqa_spectra_and_exponents():
    from odeify.assets import load_smollm2

    original, tokenizer = load_smollm2()
    layers = spectra(original, progress=False)
    assert layers.qk.shape == (30, 9, 64)  # 9 query heads over 3 KV heads, head_dim 64
    model = odeify(original, progress=False)
    assert torch.allclose(spectra(model, times=30, progress=False).qk, layers.qk, atol=1e-4)
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids[0]
    lam = lyapunov(model, ids, k=2, refine=1, progress=False)
    assert lam.exponents.shape == (len(ids), 2) and lam.exponents.isfinite().all()
    prefix = lyapunov(model, ids[:3], k=2, refine=1, progress=False)
    assert torch.allclose(prefix.exponents, lam.exponents[:3], atol=1e-3)
