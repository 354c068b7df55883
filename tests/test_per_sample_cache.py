"""Per-sample step counts with multi-stage schemes through the KV cache: what a per-request
server runs. Each sample's cached generation equals that sample generated alone without a
cache, logits and tokens."""

import pytest
import torch

from odeify import odeify, steps

PROMPTS = torch.randint(1, 97, (3, 6), generator=torch.Generator().manual_seed(1))
COUNTS = torch.tensor([2, 4, 3])


def _model(family, make_gpt2, make_llama):
    raw = make_gpt2() if family == "gpt2" else make_llama(num_hidden_layers=4)
    return odeify(raw, progress=False)


def _generate(model, ids, **kw):
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
            **kw,
        )
    return out.sequences, torch.stack(out.scores, 1)  # scores: [B, new tokens, vocab]


# Every multi-stage scheme, each family (GPT-2: learned positions; Llama: RoPE and grouped KV).
@pytest.mark.parametrize(
    "family,scheme", [("gpt2", "midpoint"), ("llama", "heun"), ("llama", "rk4")]
)
def test_cached_per_sample_generation_equals_each_sample_alone_uncached(
    family, scheme, make_gpt2, make_llama
):
    model = _model(family, make_gpt2, make_llama)
    with steps(model, COUNTS, scheme):
        tokens, scores = _generate(model, PROMPTS)
    for b, n in enumerate(COUNTS.tolist()):
        with steps(model, n, scheme):
            alone_tokens, alone_scores = _generate(model, PROMPTS[b : b + 1], use_cache=False)
        assert torch.equal(tokens[b], alone_tokens[0]), (scheme, b)
        # Same arithmetic in another order (a batched per-sample weight vs one weight, keys from
        # the cache vs recomputed): float32 rounding over 4 layers x up to 4 steps x 4 stages.
        torch.testing.assert_close(scores[b], alone_scores[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_per_sample_cache_filled_under_another_scheme_is_refused(family, make_gpt2, make_llama):
    model = _model(family, make_gpt2, make_llama)
    with torch.no_grad(), steps(model, COUNTS, "midpoint"):
        cache = model(PROMPTS, use_cache=True).past_key_values
    with (
        torch.no_grad(),
        steps(model, COUNTS, "heun"),
        pytest.raises(ValueError, match="filled at .* of 'midpoint'.*of 'heun'"),
    ):
        model(PROMPTS[:, :1], past_key_values=cache, use_cache=True)
