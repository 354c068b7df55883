"""DiffEqFormer from scratch: odeify(fresh_model, basis="fourier", init="random")."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import odeify as ode
from odeify import get_block, odeify
from odeify.train.optim import adamw

IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt2(**overrides):
    config = dict(n_layer=4, n_embd=64, n_head=4, vocab_size=97, n_positions=32)
    config.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**config))


def _llama(**overrides):
    config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=32,
    )
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config))


def _diffeqformer(model, directions=6, features=16, hidden=12):
    return odeify(
        model,
        basis="fourier",
        init="random",
        num_basis=directions + 1,
        basis_kwargs={"features": features, "hidden": hidden},
    )


def test_gpt2_shapes_groups_and_the_paper_field():
    block = get_block(_diffeqformer(_gpt2()))
    assert (block.ode.scheme, block.ode.resolved_steps, block.ode.num_basis) == ("euler", 4, 7)
    assert block.basis_tensor("attn.c_attn.weight").shape == (7, 192, 64)  # [K, out, in]
    assert block.basis_tensor("mlp.c_proj.bias").shape == (7, 64)
    assert sorted(block.time_basis) == ["attn_out", "fc", "ln_1", "ln_2", "mlp_out", "qkv"]
    unit = block.time_basis["qkv"]
    assert unit.lin1.in_features == 2 * 16 + 1 and unit.lin1.out_features == 12  # S, width
    assert unit.lin2.out_features == 6  # E


def test_llama_groups_and_no_biases():
    block = get_block(_diffeqformer(_llama()))
    expected = ["down", "gate", "k", "norm_attn", "norm_mlp", "o", "q", "up", "v"]
    assert sorted(block.time_basis) == expected
    assert not any(name.endswith(".bias") for name in block.names)
    assert block.basis_tensor("self_attn.k_proj.weight").shape == (7, 32, 64)


@pytest.mark.parametrize("make", [_gpt2, _llama])
def test_norms_start_at_the_identity_and_biases_at_zero(make):
    block = get_block(_diffeqformer(make()))
    times = torch.linspace(0, 1, 9).tolist()
    weights = block.weights_at(times)
    for name in block.names:
        basis = block.basis_tensor(name)
        if basis.dim() == 2 and name.endswith(".weight"):  # a norm's gamma(t) = 1 + g(t) F_w
            assert torch.equal(basis[0], torch.ones_like(basis[0]))
            assert not basis[1:].any()
            assert torch.equal(weights[name], torch.ones_like(weights[name]))
        elif name.endswith(".bias"):  # b(t) = g(t) F_b, F_b = 0
            assert not basis.any() and not weights[name].any()


@pytest.mark.parametrize("make", [_gpt2, _llama])
def test_matrices_keep_the_scale_of_the_model_init(make):
    torch.manual_seed(1)
    model = make(n_embd=128) if make is _gpt2 else make(hidden_size=128, intermediate_size=256)
    stack = model.transformer.h if make is _gpt2 else model.model.layers
    own = {n: p.std().item() for n, p in stack[0].named_parameters() if p.dim() == 2}
    block = get_block(odeify(model, basis="fourier", init="random"))  # S = 128, E = 20
    num_layers = block.ode.num_layers
    weights = block.weights_at([i / num_layers for i in range(num_layers)])
    for name, std in own.items():
        # mean over the grid of each step's mean square: the model's own init variance
        mean_square = weights[name].pow(2).mean().item()
        assert mean_square == pytest.approx(std**2, rel=0.1), name
        # the steps' matrices differ, yet share a part (the constant P_0 and g's mean over t)
        per_step = weights[name].flatten(1)
        assert 0.3 < F.cosine_similarity(per_step[0], per_step[-1], dim=0) < 0.95
    if make is _gpt2:  # GPT-2's output projections start 1 / sqrt(2 L) smaller
        assert own["attn.c_proj.weight"] == pytest.approx(0.02 / (2 * num_layers) ** 0.5, rel=0.1)


def test_parameter_count_is_about_one_and_a_half_gpt_small_at_e20():
    with torch.device("meta"):
        small = GPT2LMHeadModel(GPT2Config())  # 124M: 12 layers, d = 768
        baseline = sum(p.numel() for p in small.parameters())
        converted = odeify(small, basis="fourier", num_basis=21, init="none", scheme="euler")
        total = sum(p.numel() for p in converted.parameters())
    assert baseline == pytest.approx(124.4e6, rel=0.01)
    assert total / baseline == pytest.approx(1.5, abs=0.05)


def test_loss_decreases_when_trained():
    torch.manual_seed(0)
    model = _diffeqformer(_gpt2(n_embd=32, n_head=2)).train()
    optimizer = adamw(model, lr=3e-3, weight_decay=0.1)
    losses = []
    for _ in range(30):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    units = get_block(model).time_basis
    assert all(unit.lin1.weight.grad is None for unit in units.values())  # zero_grad cleared them
    assert all(abs(unit.lin2.bias).sum() > 0 for unit in units.values())


def test_retargets_materialises_saves_and_loads(tmp_path):
    model = _diffeqformer(_gpt2()).eval()
    with torch.no_grad():
        at_l = model(IDS).logits
        with ode.steps(model, 8):
            at_2l = model(IDS).logits
        assert torch.equal(model(IDS, ode_steps=8).logits, at_2l)
        assert not torch.equal(at_l, at_2l) and torch.isfinite(at_2l).all()
        # materialize builds the sequential scheme: equal to this model run that way
        with ode.steps(model, 4, scheme="sequential"):
            sequential = model(IDS).logits
        plain = ode.materialize(model, steps=4)
        assert type(plain) is GPT2LMHeadModel
        torch.testing.assert_close(plain(IDS).logits, sequential, rtol=1e-5, atol=1e-5)
    ode.save_pretrained(model, tmp_path / "m")
    loaded = ode.from_pretrained(tmp_path / "m")
    assert get_block(loaded).ode == get_block(model).ode
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, at_l)


def test_random_init_needs_the_learned_unit():
    with pytest.raises(ValueError, match="use basis='fourier'"):
        odeify(_gpt2(), basis="hat", init="random")
