"""odeify.surgery on tiny GPT-2 and Llama models: the block stack, odeified or not, the stock-model
builder, and the family declarations it reads (checked against the real modules)."""

import copy
import dataclasses

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel, Qwen2Config
from transformers.pytorch_utils import Conv1D

from odeify import adapters, get_block, materialize, odeify, save_pretrained, set_steps
from odeify.block import ODEBlock
from odeify.family import Family, Projection
from odeify.surgery import (
    block_stack,
    find_block,
    is_odeified,
    is_odeified_folder,
    layer_samples,
    layer_shapes,
    stock_model,
)
from odeify.train.distill import drop_layers

IDS = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=["gpt2", "llama"])
def stock(request, make_gpt2, make_llama):
    return make_gpt2() if request.param == "gpt2" else make_llama(num_hidden_layers=4)


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def test_block_stack_is_the_declared_attribute(stock):
    family = adapters.family_for(stock)
    assert block_stack(stock) is getattr(stock.base_model, family.stack)
    assert block_stack(stock.base_model) is block_stack(stock)
    odeify(stock, progress=False)
    (block,) = block_stack(stock)
    assert isinstance(block, ODEBlock) and find_block(stock) is block


def test_block_stack_refuses_a_model_without_one():
    model = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2))
    model.h = nn.Sequential()
    with pytest.raises(ValueError, match="no block stack at .h"):
        block_stack(model)


def test_is_odeified_on_models_and_folders(stock, tmp_path):
    assert not is_odeified(stock) and find_block(stock) is None
    stock.save_pretrained(tmp_path / "stock")
    model = odeify(copy.deepcopy(stock), progress=False)
    assert is_odeified(model)
    save_pretrained(model, tmp_path / "ode")
    assert is_odeified_folder(tmp_path / "ode") and is_odeified_folder(str(tmp_path / "ode"))
    assert not is_odeified_folder(tmp_path / "stock")
    assert not is_odeified_folder(tmp_path / "missing")


def test_layer_samples_are_the_layers_in_out_in_layout(stock):
    family, stack = adapters.family_for(stock), block_stack(stock)
    samples = layer_samples(stock, layers=[3, 1])
    shapes = layer_shapes(stock)
    for name, sample in samples.items():
        assert sample.shape == (2, *shapes[name])
        for row, layer in zip(sample, (3, 1), strict=True):
            p = stack[layer].get_parameter(name)
            assert torch.equal(row, p.t() if family.is_transposed(name) else p)
    with pytest.raises(ValueError, match="odeified"):
        layer_samples(odeify(stock, progress=False))


def test_materialize_at_l_is_the_original_to_the_bit(stock):
    plain = materialize(odeify(copy.deepcopy(stock), progress=False), steps=4)
    assert type(plain) is type(stock) and plain.config.to_dict() == stock.config.to_dict()
    _same_state(plain, stock)
    assert torch.equal(_logits(plain), _logits(stock))


def test_drop_layers_at_half_depth_is_materialize_at_half_depth(stock):
    dropped = drop_layers(stock, 2)
    plain = materialize(odeify(copy.deepcopy(stock), progress=False), steps=2)
    assert dropped.config.num_hidden_layers == 2
    _same_state(dropped, plain)


def test_stock_model_from_a_config_leaves_the_config_alone():
    config = Qwen2Config(
        hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2
    )
    config.architectures = ["Qwen2ForCausalLM"]
    config.odeify = {"num_layers": 3}
    skeleton = stock_model(config, 1)
    assert type(skeleton).__name__ == "Qwen2ForCausalLM"
    assert len(block_stack(skeleton)) == 1 and skeleton.config.num_hidden_layers == 1
    assert skeleton.config.layer_types == ["full_attention"]
    assert not hasattr(skeleton.config, "odeify")
    assert config.num_hidden_layers == 3 and len(config.layer_types) == 3 and config.odeify


def test_stock_model_checks_the_layer_state(stock):
    samples = layer_samples(stock)
    partial = lambda i: {n: s[i] for n, s in list(samples.items())[1:]}
    with pytest.raises(ValueError, match="layer 0 was given"):
        stock_model(stock, 2, partial)


# ----------------------------------------------------------------------- family declarations
def _declarations(family: Family) -> dict:
    return {f.name: getattr(family, f.name) for f in dataclasses.fields(Family)}


@pytest.mark.parametrize("missing", ["norms", "linears", "attention_layout", "stack"])
def test_an_adapter_missing_a_declaration_is_named(missing):
    fields = _declarations(adapters.FAMILIES["gpt2"])
    del fields[missing]
    with pytest.raises(TypeError, match=missing):
        Family(**fields)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"norms": ("ln_1",)}, r"groups names \['ln_2'\], not declared norms or linears"),
        ({"norms": ("ln_1", "ln_2", "ln_3")}, r"norms names \['ln_3'\], not modules in groups"),
        (
            {"linears": ("attn.c_attn", "mlp.c_fc", "mlp.c_proj", "ln_1")},
            r"\[.ln_1.\] are declared both norms and linears",
        ),
        ({"output_projections": ("ln_2",)}, r"output_projections names \['ln_2'\]"),
        ({"transposed": ("ln_1",)}, r"transposed names \['ln_1'\]"),
        (
            {
                "attention_layout": dataclasses.replace(
                    adapters.FAMILIES["gpt2"].attention_layout, o=Projection("attn.c_proj.bias")
                )
            },
            r"attention_layout names \['attn.c_proj.bias'\], not linear weights",
        ),
    ],
)
def test_an_inconsistent_adapter_is_refused(change, message):
    with pytest.raises(ValueError, match=f"gpt2 adapter: {message}"):
        dataclasses.replace(adapters.FAMILIES["gpt2"], **change)


def test_a_parameter_outside_the_groups_is_named():
    with pytest.raises(KeyError, match="'mlp.gate.weight' belongs to no weight group"):
        adapters.FAMILIES["gpt2"].group_of("mlp.gate.weight")


# Every model type of every family, built tiny; Qwen3 brings the per-head q/k norms.
MODEL_TYPES = [(f.name, t) for f in adapters.FAMILIES.values() for t in f.model_types]


def _tiny(model_type: str) -> nn.Module:
    if model_type == "gpt2":
        return GPT2Model(GPT2Config(n_layer=2, n_embd=16, n_head=2))
    import transformers

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    config = getattr(transformers, f"{names[model_type]}Config")(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    return getattr(transformers, f"{names[model_type]}Model")(config)


@pytest.mark.parametrize("family_name, model_type", MODEL_TYPES)
def test_declared_layout_matches_the_real_block(family_name, model_type):
    model = _tiny(model_type)
    family = adapters.family_for(model)
    assert family.name == family_name and model_type in family.model_types
    block = block_stack(model)[0]
    params = dict(block.named_parameters())
    for name in params:  # every block parameter is in a group, of a norm or a linear
        assert family.module_of(name) in (*family.norms, *family.linears)
    for prefix in family.groups:
        if prefix + ".weight" not in params:
            continue  # declared for another model type of the family (Qwen3's q/k norms)
        module = block.get_submodule(prefix)
        is_linear = isinstance(module, (nn.Linear, Conv1D))
        assert is_linear == (prefix in family.linears), prefix
        assert (prefix in family.transposed) == isinstance(module, Conv1D), prefix
    for projection in family.attention_layout.projections():
        assert projection.name in params
        assert params[projection.name].dim() == 2
    assert set(family.output_projections) <= {family.module_of(n) for n in params}


@pytest.mark.parametrize("family", adapters.FAMILIES.values(), ids=lambda f: f.name)
def test_every_declared_module_exists_in_some_model_type(family):
    present = set()
    for model_type in family.model_types:
        present |= {
            family.module_of(n) for n, _ in block_stack(_tiny(model_type))[0].named_parameters()
        }
    assert present == set(family.groups)


def test_layer_shapes_refuse_blocks_that_differ():
    model = LlamaModel(
        LlamaConfig(
            hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2
        )
    )
    model.layers[1].mlp.up_proj = nn.Linear(16, 8, bias=False)
    with pytest.raises(ValueError, match="block 1 has different parameters"):
        layer_shapes(model)


# odeify's and materialize's refusals in full (a partial match lets a mangled message pass), and
# the defaults odeify fills in.
def _error(call, error=ValueError):
    with pytest.raises(error) as raised:
        call()
    return str(raised.value)


def test_odeify_refusals_in_full(make_gpt2, tmp_path):
    base = make_gpt2()
    assert _error(lambda: materialize(base, steps=3)) == (
        "GPT2LMHeadModel is not odeified: call odeify(model) first"
    )
    assert _error(lambda: odeify(tmp_path, init="none")) == (
        "init='none' builds on a model in memory; a checkpoint path is fitted (init='fit'): load "
        "the model first for the other inits"
    )
    assert _error(lambda: odeify(base, dtype=torch.half, device="cpu"), TypeError) == (
        "odeify(model, device=...) applies when odeify is given a checkpoint path; for a model in "
        "memory, move or cast it with model.to(...) first"
    )
    assert _error(lambda: odeify(base, init="zeros")) == (
        "init must be one of ('fit', 'random', 'none'), got 'zeros'"
    )
    for bad in (0, True, 2.0):
        assert _error(lambda bad=bad: odeify(base, num_basis=bad)) == (
            f"num_basis (K) must be an integer >= 1, got {bad!r}"
        )
    assert _error(lambda: odeify(base, basis="chebyshev", init="random")) == (
        "init='random' builds DiffEqFormer's learned time units: use basis='fourier'. With the "
        "fixed basis 'chebyshev', init='fit' on a freshly built model fits its random layers"
    )
    odeified = odeify(base, progress=False)
    assert _error(lambda: odeify(odeified)) == (
        "this model is already odeified; use odeify.steps(...) to retarget it"
    )
    assert _error(lambda: set_steps(odeified, [2, 3]), TypeError) == (
        "set_steps saves one step count; use odeify.steps(...) for per-sample counts"
    )


def test_odeify_fills_in_the_defaults_and_keeps_the_training_mode(make_gpt2):
    fitted = get_block(odeify(make_gpt2().train(), progress=False))
    assert (fitted.ode.scheme, fitted.ode.num_basis, fitted.training) == ("sequential", 4, True)
    fresh = get_block(odeify(make_gpt2(), basis="fourier", init="random", progress=False))
    assert (fresh.ode.scheme, fresh.ode.num_basis, fresh.training) == ("euler", 21, False)


def test_odeify_saves_the_family_and_the_steps_it_is_given(make_gpt2, make_llama):
    model = odeify(make_gpt2(), steps=3, progress=False)
    assert (model.config.odeify["family"], model.config.odeify["steps"]) == ("gpt2", 3)
    assert get_block(model).ode.resolved_steps == 3
    assert odeify(make_llama(), progress=False).config.odeify["family"] == "llama"


def test_set_steps_saves_each_setting_it_is_given(make_gpt2):
    import odeify as ode

    model = odeify(make_gpt2(), progress=False)
    twin = copy.deepcopy(model)
    assert set_steps(model, 3, scheme="rk4", schedule="uniform") is model
    settings = get_block(model).ode
    assert (settings.steps, settings.scheme, settings.schedule) == (3, "rk4", "uniform")
    assert {k: model.config.odeify[k] for k in ("steps", "scheme", "schedule")} == {
        "steps": 3,
        "scheme": "rk4",
        "schedule": "uniform",
    }
    with torch.no_grad(), ode.steps(twin, 3, scheme="rk4"):
        assert torch.equal(model(IDS).logits, twin(IDS).logits)
    # A setting not given is left as it was.
    set_steps(model, scheme="heun")
    assert (settings.steps, settings.scheme, settings.schedule) == (3, "heun", "uniform")


def test_odeify_shows_the_fit_progress_unless_told_not_to(make_gpt2, capsys):
    odeify(make_gpt2())
    assert "fitting W(t)" in capsys.readouterr().err
    odeify(make_gpt2(), progress=False)
    assert "fitting W(t)" not in capsys.readouterr().err


def test_odeify_of_a_folder_fits_it_like_the_model_in_memory(make_gpt2, tmp_path, capsys):
    # The default init='fit' is the one a checkpoint path takes (streamed from disk), and every
    # setting reaches the streaming conversion.
    stock = make_gpt2()
    stock.save_pretrained(tmp_path / "stock")
    # cache_weights (not its default) goes through `**options`.
    settings = dict(basis="chebyshev", num_basis=3, scheme="rk4", steps=2, cache_weights=False)
    streamed = odeify(tmp_path / "stock", **settings)
    assert "converting" in capsys.readouterr().err
    in_memory = odeify(stock, progress=False, **settings)
    assert streamed.config.odeify == in_memory.config.odeify
    assert streamed.config.odeify["cache_weights"] is False
    with torch.no_grad():
        assert torch.equal(streamed(IDS).logits, in_memory(IDS).logits)
    with pytest.raises(ValueError) as raised:
        odeify(tmp_path / "stock", basis_kwargs={"x": 1}, progress=False)
    assert str(raised.value) == "basis 'hat' takes no options, got ['x']"
    quiet = odeify(tmp_path / "stock", progress=False, **settings)
    assert "converting" not in capsys.readouterr().err
    assert quiet.config.odeify == in_memory.config.odeify


def test_materialize_refuses_a_peft_model_in_full(make_gpt2):
    # peft is imported here, so `_refuse_peft_wrapper` sees it loaded (it looks in sys.modules).
    from peft import get_peft_model

    from odeify import lora_config

    model = odeify(make_gpt2(), progress=False)
    adapted = get_peft_model(model, lora_config(r=2, model=model))
    assert _error(lambda: materialize(adapted, steps=2), TypeError) == (
        "materialize takes the odeified transformers model, not a PeftModel: merge the adapter "
        "into W(t) first (materialize(peft_model.merge_and_unload(), steps)), or drop it "
        "(peft_model.get_base_model())"
    )
    # The unwrapped model, peft still loaded, is not refused.
    assert materialize(adapted.get_base_model(), steps=2).config.n_layer == 2


def test_odeify_refuses_each_loading_option_for_a_model_in_memory(make_gpt2):
    base = make_gpt2()
    for key in ("dtype", "device", "device_map", "revision", "cache_dir"):
        assert _error(lambda key=key: odeify(base, **{key: None}), TypeError) == (
            f"odeify(model, {key}=...) applies when odeify is given a checkpoint path; for a "
            "model in memory, move or cast it with model.to(...) first"
        )


def test_odeify_checks_the_config_scheme_and_steps_before_converting(make_gpt2):
    assert _error(lambda: odeify(make_gpt2(add_cross_attention=True), progress=False)) == (
        "GPT-2 with add_cross_attention=True is not supported: the cross-attention sublayer "
        "has no continuous-depth form in odeify. Convert a decoder-only GPT-2."
    )
    base = make_gpt2()
    assert _error(lambda: odeify(base, scheme="nope", progress=False)) == (
        "unknown scheme 'nope'. Native fixed-grid schemes: sequential, euler, midpoint, heun, "
        "rk4; torchdiffeq methods: dopri8, dopri5, bosh3, fehlberg2, adaptive_heun, euler, "
        "midpoint, heun2, heun3, rk4, explicit_adams, implicit_adams, fixed_adams (prefix "
        "'torchdiffeq:' to force one)"
    )
    assert _error(lambda: odeify(base, steps=0, progress=False)) == "steps must be >= 1, got 0"
    assert _error(lambda: odeify(base, steps=2, discrete_ends=1, progress=False)) == (
        "with discrete_ends = 1 a grid needs more than 2 steps (the 1 discrete layers at each "
        "end and at least one step between them), got 2"
    )
    assert not is_odeified(base)  # every refusal above came before the stack was replaced
    # K = 1, the smallest basis, is accepted.
    assert (
        get_block(odeify(base, basis="chebyshev", num_basis=1, progress=False)).ode.num_basis == 1
    )


def test_odeify_takes_num_layers_dtype_and_the_init_it_is_given(make_gpt2):
    # num_layers overrides the stack's depth (how io builds a saved model's block on a one-layer
    # skeleton), and the block is built in the stack's dtype.
    skeleton = get_block(odeify(make_gpt2(n_layer=1).double(), init="none", num_layers=4))
    assert skeleton.ode.num_layers == 4 and skeleton.config.n_layer == 1
    assert {skeleton.basis_tensor(n).dtype for n in skeleton.names} == {torch.float64}
    # ... and on the stack's device (meta: io's skeleton; a CPU default would allocate).
    on_meta = get_block(odeify(make_gpt2(n_layer=1).to("meta"), init="none"))
    assert {on_meta.basis_tensor(n).device.type for n in on_meta.names} == {"meta"}
    # init='random' sets the norm scales' constant term to 1 and the rest to 0.
    fresh = get_block(odeify(make_gpt2(), basis="fourier", init="random", progress=False))
    scale = fresh.basis_tensor("ln_1.weight")
    assert torch.equal(scale[0], torch.ones(32)) and not scale[1:].any()


def test_odeify_refuses_an_untested_transformers(make_gpt2, monkeypatch):
    import transformers

    monkeypatch.delenv("ODEIFY_UNTESTED_TRANSFORMERS", raising=False)
    monkeypatch.setattr(transformers, "__version__", "4.57.0")
    base = make_gpt2()
    assert _error(lambda: odeify(base, progress=False), RuntimeError).startswith(
        "odeify is tested with transformers "
    )
    assert not is_odeified(base)


def test_set_steps_refuses_every_per_sample_form(make_gpt2):
    model = odeify(make_gpt2(), progress=False)
    for counts in ([2, 3], (2, 3), torch.tensor([2, 3]), torch.tensor(2)):
        assert _error(lambda counts=counts: set_steps(model, counts), TypeError) == (
            "set_steps saves one step count; use odeify.steps(...) for per-sample counts"
        )
    assert get_block(model).ode.steps is None
