"""Continuous LoRA through peft on odeified models: the update is a function of t, standard peft
calls work, the weight cache follows the adapters, and bad input gets clear errors."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

import odeify as odeify_module
from odeify import get_block, lora_config, materialize, odeify, steps
from odeify.lora import load_adapter

IDS = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model, adapter="default"):
    """Fresh LoRA has B = 0 (no update); random factors make every adapter visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name or f"lora_A.{adapter}." in name:
                p.normal_(0, 0.5)
    return model


def _logits(model, n=None, scheme=None):
    with torch.no_grad():
        if n is None:
            return model(IDS, use_cache=False).logits
        with steps(model, n, scheme):
            return model(IDS, use_cache=False).logits


@pytest.fixture
def ode_llama(make_llama):
    return odeify(make_llama(), progress=False)


def test_update_is_per_layer_lora_at_the_layers_and_blends_between_them(make_llama):
    plain = make_llama()
    ode = odeify(copy.deepcopy(plain), progress=False)
    base_mid = get_block(ode).weights_at([0.5 / 3])
    continuous = get_peft_model(ode, lora_config(r=2, model=ode))
    per_layer = _randomize(get_peft_model(plain, lora_config(r=2, model=plain)))
    layer_params = dict(per_layer.named_parameters())
    with torch.no_grad():  # dB_k of basis tensor k = the LoRA factors of layer k
        for name, p in continuous.named_parameters():
            if ".lora_" not in name:
                continue
            module, side = name.split("basis.")[1].split(".lora_")[0], name.split(".lora_")[1][0]
            layers = [
                layer_params[
                    f"base_model.model.model.layers.{k}.{module}.lora_{side}.default.weight"
                ]
                for k in range(3)
            ]
            p.copy_(torch.cat(layers) if side == "A" else torch.stack(layers, -1).flatten(1))
    torch.testing.assert_close(_logits(continuous), _logits(per_layer), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_logits(continuous), _logits(make_llama()))

    # Training sees the same update: the factors' gradients are the per-layer LoRA gradients.
    for model in (continuous, per_layer):
        model(IDS, labels=IDS, use_cache=False).loss.backward()
    for name, p in continuous.named_parameters():
        if ".lora_" in name:
            module, side = name.split("basis.")[1].split(".lora_")[0], name.split(".lora_")[1][0]
            grads = [
                layer_params[
                    f"base_model.model.model.layers.{k}.{module}.lora_{side}.default.weight"
                ].grad
                for k in range(3)
            ]
            expected = torch.cat(grads) if side == "A" else torch.stack(grads, -1).flatten(1)
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)

    # Halfway between layers 0 and 1 the update is the mean of theirs: dW(t) = sum_k c_k(t) dB_k.
    merged = continuous.merge_and_unload()
    deltas = {
        k: per_layer.base_model.model.model.layers[k].self_attn.q_proj.get_delta_weight("default")
        for k in (0, 1)
    }
    mid = get_block(merged).weights_at([0.5 / 3])["self_attn.q_proj.weight"][0]
    expected = base_mid["self_attn.q_proj.weight"][0] + (deltas[0] + deltas[1]) / 2
    torch.testing.assert_close(mid, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unload_leaves_an_odeified_model_that_still_retargets(
    make_llama, make_gpt2, family
):
    model = odeify(make_llama() if family == "llama" else make_gpt2(), progress=False)
    num_layers = get_block(model).ode.num_layers
    adapted = _randomize(get_peft_model(model, lora_config(r=2, model=model)))
    grids = [(num_layers, None), (2, None), (5, None), (3, "rk4")]
    before = {grid: _logits(adapted, *grid) for grid in grids}
    counts = torch.tensor([2, 5])  # per-sample step counts read the basis step by step
    with torch.no_grad():
        per_sample = adapted(IDS, ode_steps=counts, use_cache=False).logits
    merged = adapted.merge_and_unload()
    assert type(merged).__name__.endswith("LMHeadModel" if family == "gpt2" else "ForCausalLM")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    # Unmerged, the update runs factored (W x + B (A x)); merged, as (W + BA) x. With these large
    # random factors both round to within 7e-5 of a float64 run on the RK4 grid, not closer.
    for grid in grids:
        torch.testing.assert_close(_logits(merged, *grid), before[grid], rtol=1e-4, atol=3e-4)
    with torch.no_grad():
        merged_per_sample = merged(IDS, ode_steps=counts, use_cache=False).logits
    torch.testing.assert_close(merged_per_sample, per_sample, rtol=1e-4, atol=1e-5)
    plain = materialize(merged, steps=5)
    torch.testing.assert_close(_logits(plain), before[(5, None)], rtol=1e-4, atol=1e-5)


def test_training_moves_only_the_adapter_and_any_step_count_still_runs(ode_llama):
    untrained = copy.deepcopy(ode_llama)
    model = get_peft_model(ode_llama, lora_config(r=2))
    basis = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for i in range(8):
        with steps(model, (3, 2, 5)[i % 3]):  # step-adjusted: a different grid per batch
            loss = model(IDS, labels=IDS, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[6] < losses[0]
    assert all(torch.equal(p, basis[n]) for n, p in model.named_parameters() if n in basis)
    model.eval()
    # The trained adapter acts on every grid as its merged update W + BA does, and moved the output.
    merged = copy.deepcopy(model).merge_and_unload()
    for n, scheme in ((3, None), (7, None), (2, "heun")):
        trained = _logits(model, n, scheme)
        torch.testing.assert_close(trained, _logits(merged, n, scheme), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(trained, _logits(untrained, n, scheme), atol=1e-3)


def test_adapter_saves_alone_and_loads_onto_an_odeified_base(ode_llama, tmp_path):
    odeify_module.save_pretrained(ode_llama, tmp_path / "base")
    model = _randomize(get_peft_model(ode_llama, lora_config(r=2)))
    expected = {n: _logits(model, n) for n in (3, 5)}
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (tmp_path / "base" / "model.safetensors").stat().st_size / 5

    for load in (PeftModel.from_pretrained, load_adapter):
        loaded = load(odeify_module.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        for n in (3, 5):
            torch.testing.assert_close(_logits(loaded, n), expected[n], rtol=0, atol=0)


def test_several_adapters_switch_and_disable_with_the_weight_cache_on(ode_llama):
    base = _logits(ode_llama)
    model = _randomize(get_peft_model(ode_llama, lora_config(r=2)))
    model.add_adapter("other", lora_config(r=2))
    _randomize(model, "other")
    model.eval()
    first = _logits(model)
    model.set_adapter("other")
    second = _logits(model)
    assert not torch.allclose(first, second) and not torch.allclose(second, base)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model), first, rtol=0, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model), first, rtol=0, atol=0)


def test_changing_lora_weights_invalidates_the_weight_cache(ode_llama):
    model = _randomize(get_peft_model(ode_llama, lora_config(r=2))).eval()
    before = _logits(model)
    assert get_block(model)._grid_cache  # eval: W(t) was cached
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).mul_(-1)
    after = _logits(model)
    get_block(model).ode.cache_weights = False
    torch.testing.assert_close(after, _logits(model), rtol=0, atol=0)
    assert not torch.allclose(before, after)

    get_block(model).ode.cache_weights = True
    model.train()
    model(IDS, labels=IDS, use_cache=False).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.eval()
    stepped = _logits(model)
    get_block(model).ode.cache_weights = False
    torch.testing.assert_close(stepped, _logits(model), rtol=0, atol=0)
    assert not torch.allclose(stepped, after)


def test_config_without_a_model_targets_every_family_and_copies_take_lora(make_llama, make_gpt2):
    for model in (odeify(make_llama(), progress=False), odeify(make_gpt2(), progress=False)):
        exact = lora_config(r=2, model=model).target_parameters
        wrapped = _randomize(get_peft_model(copy.deepcopy(model), lora_config(r=2)))
        assert not torch.allclose(_logits(wrapped), _logits(model))
        hit = {
            n.split("basis.")[1].split(".lora_A")[0]
            for n, _ in wrapped.named_parameters()
            if ".lora_A" in n
        }
        assert {f"basis.{h}.weight" for h in hit} == set(exact)


def test_lora_config_fields(ode_llama, make_llama, make_gpt2):
    # alpha defaults to 2 r; names resolve to the model's matrices, in the block's order.
    # Without a model: every supported family's linears, as paths through the block's basis.
    paths = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "mlp.down_proj"]
    paths += ["mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj"]
    paths += ["self_attn.q_proj", "self_attn.v_proj"]
    assert (lora_config().r, lora_config().lora_alpha, lora_config(r=1).r) == (8, 16, 1)
    config = lora_config(r=4)
    assert (config.r, config.lora_alpha) == (4, 8)
    assert config.target_modules == set()  # None would make peft add its default modules
    assert lora_config(r=2, model=ode_llama).target_modules == set()
    assert config.target_parameters == [f"basis.{path}.weight" for path in paths]
    config = lora_config(r=4, alpha=3.0, targets="q_proj", init_lora_weights=False)
    assert config.lora_alpha == 3.0
    assert config.target_parameters == ["basis.self_attn.q_proj.weight"]
    assert config.init_lora_weights is False  # other LoraConfig fields pass through
    config = lora_config(
        r=2, targets=["q_proj", "mlp.up_proj"], model=ode_llama, init_lora_weights=False
    )
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (2, 4, False)
    assert config.target_parameters == ["basis.self_attn.q_proj.weight", "basis.mlp.up_proj.weight"]
    assert lora_config(r=32, targets="q_proj", model=ode_llama).r == 32  # r = min(32, 32) fits
    stock = lora_config(r=2, targets=["q_proj", "up_proj"], model=make_llama(), lora_dropout=0.1)
    assert stock.target_modules == {"self_attn.q_proj", "mlp.up_proj"}
    assert (stock.r, stock.lora_alpha, stock.lora_dropout) == (2, 4, 0.1)
    assert lora_config(r=3, model=make_gpt2()).target_modules == {
        "attn.c_attn",
        "attn.c_proj",
        "mlp.c_fc",
        "mlp.c_proj",
    }


def test_bad_targets_and_ranks_are_refused_with_what_exists(ode_llama, make_llama):
    with pytest.raises(ValueError, match="'qproj' matches no weight matrix.*self_attn.q_proj"):
        lora_config(r=2, targets=["qproj"], model=ode_llama)
    with pytest.raises(ValueError, match="no weight matrix.*mlp.down_proj"):
        lora_config(r=2, targets=["input_layernorm"], model=make_llama())
    with pytest.raises(
        ValueError, match="r=40 is larger than the 32x32 weight of self_attn.q_proj"
    ):
        lora_config(r=40, targets="q_proj", model=ode_llama)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match=f"LoRA rank r must be an integer >= 1, got {bad}"):
            lora_config(r=bad)
    with pytest.raises(ValueError, match="'qproj' matches no weight matrix of the ODE block"):
        lora_config(r=2, targets=["qproj"], model=ode_llama)
    with pytest.raises(ValueError, match="matches no weight matrix of LlamaForCausalLM's layers"):
        lora_config(r=2, targets=["input_layernorm"], model=make_llama())
    with pytest.raises(ValueError, match="'qproj' matches no weight matrix of any supported"):
        lora_config(r=2, targets=["qproj"])  # without a model: against every family's linears


def test_a_continuous_adapter_is_refused_by_peft_on_a_stock_model(make_llama, tmp_path):
    # Its targets run through the ODE block's basis, which a stock model does not have: peft
    # raises instead of loading it as a no-op beside a warning about missing keys.
    get_peft_model(odeify(make_llama(), progress=False), lora_config(r=2)).save_pretrained(
        tmp_path / "a"
    )
    with pytest.raises(ValueError, match="target_parameters"):
        PeftModel.from_pretrained(make_llama(), tmp_path / "a")


def test_an_adapter_for_another_base_is_refused(make_llama, tmp_path):
    small = odeify(make_llama(), progress=False)
    get_peft_model(small, lora_config(r=2)).save_pretrained(tmp_path / "a")
    deeper = odeify(make_llama(num_hidden_layers=4), progress=False)
    with pytest.raises(ValueError, match="another base model.*number of basis tensors K"):
        load_adapter(deeper, tmp_path / "a")
    with pytest.raises(ValueError, match="continuous adapter.*onto an odeified model"):
        load_adapter(make_llama(), tmp_path / "a")
    wide = odeify(make_llama(hidden_size=48), progress=False)
    with pytest.raises(
        ValueError, match=r"down_proj.lora_B.weight is \[32, 6\] in the adapter but \[48, 6\] here"
    ):
        load_adapter(wide, tmp_path / "a")


def test_generation_with_an_unmerged_adapter_matches_the_merged_model(ode_llama):
    model = _randomize(get_peft_model(ode_llama, lora_config(r=2))).eval()
    with torch.no_grad(), steps(model, 5):
        adapted = model.generate(input_ids=IDS[:1], max_new_tokens=6, do_sample=False)
        with model.disable_adapter():
            plain = model.generate(input_ids=IDS[:1], max_new_tokens=6, do_sample=False)
    assert not torch.equal(adapted, plain)  # the adapter changes what is generated
    merged = model.merge_and_unload()
    with torch.no_grad(), steps(merged, 5):
        expected = merged.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(adapted, expected)


def test_materialize_of_an_unmerged_peft_model_says_to_merge_first(ode_llama):
    adapted = _randomize(get_peft_model(ode_llama, lora_config(r=2, model=ode_llama)))
    expected = _logits(adapted, 2)
    with pytest.raises(TypeError) as raised:
        materialize(adapted, steps=2)
    assert str(raised.value) == (
        "materialize takes the odeified transformers model, not a PeftModel: merge the adapter "
        "into W(t) first (materialize(peft_model.merge_and_unload(), steps)), or drop it "
        "(peft_model.get_base_model())"
    )
    # What the message says to do keeps the adapter's update.
    plain = materialize(adapted.merge_and_unload(), steps=2)
    torch.testing.assert_close(_logits(plain), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_auto_peft_model_loads_the_adapter_onto_the_ode_base(ode_llama, tmp_path, task_type):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    odeify_module.save_pretrained(ode_llama, tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = _randomize(get_peft_model(base, lora_config(r=2, task_type=task_type)))
    expected = {n: _logits(model, n) for n in (3, 5)}
    model.save_pretrained(tmp_path / "adapter")

    if task_type is None:
        # Without a task type peft records the base model's class and imports its module only
        # from libraries it is told to trust: odeify's classes live in odeify.models.
        with pytest.raises(ValueError, match="odeify.models"):
            AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    allow = {} if task_type else {"import_allowlist": ["odeify"]}
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", **allow)
    assert type(loaded.get_base_model()).__name__ == "OdeifyLlamaForCausalLM"
    for n in (3, 5):
        torch.testing.assert_close(_logits(loaded, n), expected[n], rtol=0, atol=0)
    merged = loaded.merge_and_unload()
    assert type(merged).__name__ == "OdeifyLlamaForCausalLM"
    torch.testing.assert_close(_logits(merged, 3), expected[3], rtol=1e-5, atol=1e-5)


def test_load_adapter_says_in_full_what_does_not_fit(make_llama, make_gpt2, tmp_path):
    small = odeify(make_llama(), progress=False)
    get_peft_model(small, lora_config(r=2)).save_pretrained(tmp_path / "a")
    stock = make_llama()
    get_peft_model(stock, lora_config(r=2, model=stock)).save_pretrained(tmp_path / "s")
    gpt2 = make_gpt2()
    get_peft_model(gpt2, lora_config(r=2, model=gpt2)).save_pretrained(tmp_path / "g")
    fits = "An adapter fits only the architecture, depth and (for a continuous adapter) the number"
    fits += " of basis tensors K it was trained on."
    cases = [
        (
            small,
            "s",
            f"{tmp_path / 's'} holds a per-layer adapter; load it onto the stock transformers "
            "model it was trained on (or materialise first), not onto this "
            f"{type(small).__name__}",
        ),
        (
            make_llama(),
            "a",
            f"{tmp_path / 'a'} holds a continuous adapter (on ODE basis tensors); load it onto an "
            "odeified model (odeify.from_pretrained or odeify(model)), not onto this "
            "LlamaForCausalLM",
        ),
        (
            make_llama(hidden_size=48),
            "s",
            f"{tmp_path / 's'} was saved for another base model (an unnamed model): 33 of its 42 "
            "tensors do not fit this LlamaForCausalLM, e.g. base_model.model.model.layers.0.mlp."
            f"down_proj.lora_B.weight is [32, 2] in the adapter but [48, 2] here. {fits}",
        ),
        (  # Conv1D: A is [r, in], in = the weight's first axis
            make_gpt2(n_embd=48),
            "g",
            f"{tmp_path / 'g'} was saved for another base model (an unnamed model): 32 of its 32 "
            "tensors do not fit this GPT2LMHeadModel, e.g. base_model.model.transformer.h.0.attn."
            f"c_attn.lora_A.weight is [2, 32] in the adapter but [2, 48] here. {fits}",
        ),
    ]
    for model, folder, message in cases:
        with pytest.raises(ValueError) as error:
            load_adapter(model, tmp_path / folder)
        assert str(error.value) == message
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")  # no weights file
    with pytest.raises(FileNotFoundError, match="is not a peft adapter folder"):
        load_adapter(make_llama(), tmp_path / "half")


def test_load_adapter_takes_a_rank_pattern_and_peft_options(make_llama, tmp_path):
    # A per-module rank (q_proj at 4, the rest at 2) is no mismatch; kwargs reach peft.
    stock = make_llama()
    config = lora_config(r=2, model=stock, rank_pattern={"q_proj": 4})
    get_peft_model(stock, config).save_pretrained(tmp_path / "p")
    loaded = load_adapter(make_llama(), tmp_path / "p", adapter_name="mine")
    assert list(loaded.peft_config) == ["mine"]
    a = loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_A["mine"].weight
    assert tuple(a.shape) == (4, 32)


def test_upgrade_makes_an_old_leaf_target_adapter_refused_on_a_stock_model(make_llama, tmp_path):
    # Adapters written before targets ran through the basis name leaves ("q_proj.weight"), which
    # also match a stock model's weights: peft loads them there as a silent no-op.
    import json

    from odeify.cli import main

    stock = make_llama()
    ode = odeify(copy.deepcopy(stock), progress=False)
    model = _randomize(get_peft_model(ode, lora_config(r=2, model=ode)))
    expected = _logits(model, 2)
    model.save_pretrained(tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    current = sorted(config["target_parameters"])
    config["target_parameters"] = sorted(
        t.rpartition(".")[0].split(".")[-1] + ".weight" for t in current
    )
    config_file.write_text(json.dumps(config))
    silent = PeftModel.from_pretrained(copy.deepcopy(stock), tmp_path / "a")  # the old hazard
    torch.testing.assert_close(_logits(silent), _logits(stock), rtol=0, atol=0)

    assert main(["upgrade", str(tmp_path / "a")]) == 0
    assert sorted(json.loads(config_file.read_text())["target_parameters"]) == current
    with pytest.raises(ValueError, match="target_parameters"):
        PeftModel.from_pretrained(copy.deepcopy(stock), tmp_path / "a")
    base = odeify(copy.deepcopy(stock), progress=False)
    loaded = PeftModel.from_pretrained(base, tmp_path / "a")
    torch.testing.assert_close(_logits(loaded, 2), expected, rtol=0, atol=0)
    assert odeify_module.lora.upgrade_adapter(tmp_path / "a") == current  # already current


def test_a_plain_lora_config_on_an_odeified_model_says_to_use_lora_config(ode_llama):
    from peft import LoraConfig

    with pytest.raises(ValueError, match=r"not an nn.Linear: for LoRA use odeify.lora_config"):
        get_peft_model(ode_llama, LoraConfig(r=2, target_modules=["q_proj"]))
