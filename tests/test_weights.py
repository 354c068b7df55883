"""The block's functional ops on W(t) (odeify.weights) against the torch modules they stand for."""

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from odeify.weights import PerSampleWeights, Weights

GEN = torch.Generator().manual_seed(0)


def _per_sample(basis: dict, coeffs: torch.Tensor) -> PerSampleWeights:
    return PerSampleWeights({"g": coeffs}, basis.__getitem__, {name: "g" for name in basis})


def test_rms_norm_is_llamas_bit_for_bit_in_half_precision():
    # LlamaRMSNorm normalises in float32 and casts back to the input's dtype before the scale.
    norm = LlamaRMSNorm(8, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=GEN))
    x = torch.randn(2, 3, 8, generator=GEN).to(torch.bfloat16)
    got = Weights({"n.weight": norm.weight.detach()}).rms_norm("n", x, 1e-5)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, norm(x).detach())


def test_per_sample_layer_norm_is_each_samples_layer_norm():
    # A large eps (not the default 1e-5) and a norm without a bias, as well as one with.
    basis = {
        "ln.weight": torch.randn(3, 6, generator=GEN),
        "ln.bias": torch.randn(3, 6, generator=GEN),
        "nb.weight": torch.randn(3, 6, generator=GEN),
    }
    coeffs = torch.rand(2, 3, generator=GEN)
    x = torch.randn(2, 4, 6, generator=GEN)
    weights = _per_sample(basis, coeffs)
    with_bias, without = weights.layer_norm("ln", x, 0.5), weights.layer_norm("nb", x, 0.5)
    for b in range(2):
        w, bias, w_nb = (coeffs[b] @ basis[n] for n in ("ln.weight", "ln.bias", "nb.weight"))
        expected = F.layer_norm(x[b], (6,), w, bias, 0.5)
        torch.testing.assert_close(with_bias[b], expected, rtol=1e-6, atol=1e-6)
        expected = F.layer_norm(x[b], (6,), w_nb, None, 0.5)
        torch.testing.assert_close(without[b], expected, rtol=1e-6, atol=1e-6)


def test_layer_norm_takes_its_eps():
    w, b = torch.randn(6, generator=GEN), torch.randn(6, generator=GEN)
    x = torch.randn(2, 4, 6, generator=GEN)
    got = Weights({"ln.weight": w, "ln.bias": b}).layer_norm("ln", x, 0.5)
    torch.testing.assert_close(got, F.layer_norm(x, (6,), w, b, 0.5), rtol=0, atol=0)


def test_per_sample_rms_norm_is_each_samples_llama_norm_in_half_precision():
    # One-hot coefficients: sample b's scale is exactly basis row k_b, so each sample is
    # LlamaRMSNorm with that scale, bit for bit and in the input's dtype.
    basis = {"n.weight": torch.randn(3, 8, generator=GEN).to(torch.bfloat16)}
    coeffs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    x = torch.randn(2, 3, 8, generator=GEN).to(torch.bfloat16)
    got = _per_sample(basis, coeffs).rms_norm("n", x, 1e-5)
    assert got.dtype == torch.bfloat16
    for b, k in enumerate((1, 2)):
        norm = LlamaRMSNorm(8, eps=1e-5).to(torch.bfloat16)
        with torch.no_grad():
            norm.weight.copy_(basis["n.weight"][k])
        assert torch.equal(got[b], norm(x[b]).detach())


def test_a_transposed_weight_without_a_bias_is_x_times_it():
    # GPT-2's Conv1D layout [in, out]; a bias-free one (not in GPT-2, but allowed) is x @ W.
    w, x = torch.randn(6, 5, generator=GEN), torch.randn(2, 4, 6, generator=GEN)
    weights = Weights({"fc.weight": w}, transposed=frozenset({"fc.weight"}))
    torch.testing.assert_close(weights.linear("fc", x), x @ w, rtol=1e-6, atol=1e-6)


def test_low_rank_updates_add_b_a_to_the_weight():
    # Two rank-2 updates of one weight (two adapters): the layer is x (W + B1 A1 + B2 A2)^T + b.
    w, bias = torch.randn(5, 6, generator=GEN), torch.randn(5, generator=GEN)
    pairs = [(torch.randn(2, 6, generator=GEN), torch.randn(5, 2, generator=GEN)) for _ in "12"]
    x = torch.randn(2, 4, 6, generator=GEN)
    weights = Weights({"fc.weight": w, "fc.bias": bias}, lora={"fc.weight": pairs})
    merged = w + sum(b @ a for a, b in pairs)
    torch.testing.assert_close(
        weights.linear("fc", x), F.linear(x, merged, bias), rtol=1e-5, atol=1e-5
    )


def test_per_sample_linear_under_autocast_runs_in_the_autocast_dtype():
    # As F.linear does under autocast: bf16 out, each sample's own W_b = sum_k c_bk P_k.
    basis = {
        "fc.weight": torch.randn(3, 5, 6, generator=GEN),
        "fc.bias": torch.randn(3, 5, generator=GEN),
    }
    coeffs = torch.rand(2, 3, generator=GEN)
    x = torch.randn(2, 4, 6, generator=GEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _per_sample(basis, coeffs).linear("fc", x)
        no_bias = _per_sample({"fc.weight": basis["fc.weight"]}, coeffs).linear("fc", x)
    assert got.dtype == no_bias.dtype == torch.bfloat16
    torch.testing.assert_close(
        (got - no_bias).float(),
        (coeffs @ basis["fc.bias"]).unsqueeze(1).expand(2, 4, 5),
        rtol=0,
        atol=5e-2,
    )
    for b in range(2):
        w, bias = coeffs[b] @ basis["fc.weight"].flatten(1), coeffs[b] @ basis["fc.bias"]
        expected = F.linear(x[b], w.view(5, 6), bias)
        # bf16 keeps 3 significant digits of outputs of size about 3.
        torch.testing.assert_close(got[b].float(), expected, rtol=0, atol=5e-2)
