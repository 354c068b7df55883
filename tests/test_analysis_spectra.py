"""QK / OV spectra per head over t: conventions, GQA, fused GPT-2 projections, bases, errors."""

import copy

import pytest
import torch

from odeify import odeify
from odeify.analysis import HeadShape, spectra
from odeify.analysis.spectra import head_products

pytestmark = pytest.mark.usefixtures("one_thread")


def _match(small: torch.Tensor, full: torch.Tensor, hd: int) -> None:
    """The hd eigenvalues of the small product are the nonzero eigenvalues of the d x d one."""
    full = full[full.abs().argsort(descending=True)]
    nonzero, zero = full[:hd], full[hd:]
    assert zero.abs().max() < 1e-8
    distance = (small[:, None] - nonzero[None, :]).abs()
    assert distance.min(1).values.max() < 1e-8 and distance.min(0).values.max() < 1e-8


def test_small_products_carry_the_nonzero_eigenvalues_of_the_head_matrices():
    shape = HeadShape(num_heads=4, num_kv_heads=2, head_dim=3)
    d = 10
    q = torch.randn(1, 12, d, dtype=torch.float64)  # [out, in]: rows of head h = W_Q^h transposed
    k, v = torch.randn(1, 6, d, dtype=torch.float64), torch.randn(1, 6, d, dtype=torch.float64)
    o = torch.randn(1, d, 12, dtype=torch.float64)
    products = head_products(q, k, v, o, shape)
    for h in range(4):
        kv = h // 2  # GQA: query head h reads key/value head h // (H / KV)
        w_q = q[0, 3 * h : 3 * h + 3].T  # d x hd, row-vector convention q^h = x W_Q^h
        w_k = k[0, 3 * kv : 3 * kv + 3].T
        w_v = v[0, 3 * kv : 3 * kv + 3].T
        w_o = o[0, :, 3 * h : 3 * h + 3].T  # hd x d
        _match(torch.linalg.eigvals(products["qk"][0, h]), torch.linalg.eigvals(w_q @ w_k.T), 3)
        _match(torch.linalg.eigvals(products["ov"][0, h]), torch.linalg.eigvals(w_v @ w_o), 3)


def _llama_weight(model, layer, name):
    return getattr(model.model.layers[layer].self_attn, name).weight


@pytest.mark.parametrize("odeified", [False, True])
def test_gqa_query_heads_read_their_own_kv_head(make_llama, odeified):
    model = make_llama()  # 4 query heads, 2 key/value heads, head_dim 8
    with torch.no_grad():
        for layer in range(3):
            _llama_weight(model, layer, "k_proj")[8:].zero_()  # kv head 1 serves q heads 2, 3
    if odeified:
        model = odeify(model, progress=False)
    s = spectra(model, times=[0.0, 1 / 3, 2 / 3], progress=False)
    radius = s.radius("qk")
    assert radius.shape == (3, 4)
    assert (radius[:, :2] > 1e-3).all() and (radius[:, 2:] < 1e-12).all()
    assert (s.radius("ov") > 1e-3).all()


def test_gpt2_fused_qkv_split(make_gpt2):
    model = make_gpt2()
    d = model.config.n_embd
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, 2 * d :].zero_()  # Conv1D [in, out]: the V columns
    s = spectra(model, progress=False)
    assert s.ov.abs().max() < 1e-12
    assert (s.radius("qk") > 1e-3).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_original_and_odeified_agree_at_layer_times(make_gpt2, make_llama, family):
    original = make_gpt2() if family == "gpt2" else make_llama()
    depth = original.config.num_hidden_layers
    before = spectra(original, progress=False)
    assert before.times.tolist() == [layer / depth for layer in range(depth)]
    for basis in ("hat", "chebyshev"):
        model = odeify(copy.deepcopy(original), basis=basis, progress=False)
        after = spectra(model, times=before.times.tolist(), chunk=2, progress=False)
        assert torch.allclose(after.qk, before.qk, atol=1e-5)
        assert torch.allclose(after.ov, before.ov, atol=1e-5)
    assert "discrete" in before.source and "chebyshev" in after.source


def test_shapes_curves_and_time_grids(make_llama):
    model = odeify(make_llama(), progress=False)
    s = spectra(model, times=16, progress=False)
    assert s.times.tolist() == [i / 16 for i in range(16)]
    assert s.qk.shape == s.ov.shape == (16, 4, 8) and s.qk.is_complex()
    # sorted by decreasing modulus within each head
    assert (s.qk.abs().diff(dim=-1) <= 1e-12).all()
    for kind in ("qk", "ov"):
        curves = s.summary(kind)
        assert set(curves) == {"radius", "mean_abs", "positive_real_fraction"}
        assert (curves["radius"] >= curves["mean_abs"]).all()
        assert (
            (curves["positive_real_fraction"] >= 0) & (curves["positive_real_fraction"] <= 1)
        ).all()
        assert torch.equal(curves["radius"], s.radius(kind).amax(-1))
    assert spectra(model, progress=False).qk.shape[0] == 64  # the default grid
    between = spectra(model, times=[0.5 / 3], progress=False)
    assert not torch.allclose(between.qk, s.qk[[0]]) and between.qk.shape == (1, 4, 8)
    numbers = s.to_dict()
    assert len(numbers["qk"]["radius_per_head"]) == 16 and numbers["num_kv_heads"] == 2


def test_bad_times(make_gpt2):
    original = make_gpt2()  # 4 layers
    with pytest.raises(ValueError, match="odeify the model to evaluate between layers"):
        spectra(original, times=[0.1], progress=False)
    assert spectra(original, times=2, progress=False).times.tolist() == [0.0, 0.5]
    with pytest.raises(ValueError, match="between layers"):
        spectra(original, times=3, progress=False)
    model = odeify(original, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        spectra(model, times=[0.5, 1.5], progress=False)
    with pytest.raises(ValueError, match="empty"):
        spectra(model, times=[], progress=False)
    with pytest.raises(ValueError, match="integer >= 1"):
        spectra(model, times=0, progress=False)
    with pytest.raises(ValueError, match="chunk"):
        spectra(model, chunk=0, progress=False)
