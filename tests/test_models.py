"""Odeified models as transformers classes: saved folders name odeify's model type and class, load
through the Auto classes bit-exactly (and only with odeify imported), take the depth per call in
forward and generate, and carry a model card; folders of the earlier format still load."""

import inspect
import io
import json
import re
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import odeify
from odeify import get_block, steps
from odeify import odeify as convert
from odeify.cli import main
from odeify.models import OdeifyLlamaConfig, OdeifyLlamaForCausalLM, is_odeify_class, stock_class
from odeify.schedule import Schedule

IDS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))


def _ode(model, **kw):
    return convert(model, progress=False, **kw).eval()


def _rewrite(folder, edit):
    config = folder / "config.json"
    data = json.loads(config.read_text())
    edit(data)
    config.write_text(json.dumps(data))


# ------------------------------------------------------------------ conversion and classes
def test_conversion_switches_to_the_odeify_classes_and_keeps_the_stock_ones(make_llama):
    model = _ode(make_llama())
    assert type(model).__name__ == "OdeifyLlamaForCausalLM"
    assert isinstance(model, LlamaForCausalLM) and isinstance(model.config, LlamaConfig)
    assert type(model.model).__name__ == "OdeifyLlamaModel"
    assert type(model.config) is OdeifyLlamaConfig and model.config.model_type == "odeify-llama"
    # materialize gives the stock model back, config included
    plain = odeify.materialize(model, 3)
    assert type(plain) is LlamaForCausalLM and type(plain.config) is LlamaConfig
    assert plain.config.model_type == "llama" and not hasattr(plain.config, "odeify")


def test_a_converted_model_pickles_by_class_name(make_gpt2):
    model = _ode(make_gpt2())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert type(again) is type(model) and type(again.config) is type(model.config)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_other_heads_get_an_odeify_class_too(tmp_path):
    from transformers import GPT2ForSequenceClassification

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=97, pad_token_id=0)
    model = _ode(GPT2ForSequenceClassification(config))
    assert type(model).__name__ == "OdeifyGPT2ForSequenceClassification"
    odeify.save_pretrained(model, tmp_path / "m")
    loaded = odeify.from_pretrained(tmp_path / "m")
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


# ----------------------------------------------------------------- saving and Auto loading
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral", "qwen2", "qwen3"])
def test_auto_classes_load_the_ode_model_bit_exact(make_gpt2, make_llama, model_type, tmp_path):
    model = _ode(make_gpt2() if model_type == "gpt2" else make_llama(model_type))
    odeify.save_pretrained(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == f"odeify-{model_type}"
    assert saved["architectures"] == [type(model).__name__]
    assert type(model).__name__.startswith("Odeify")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    base = AutoModel.from_pretrained(tmp_path / "m")
    assert type(loaded) is type(model) and is_odeify_class(type(base))
    assert type(AutoConfig.from_pretrained(tmp_path / "m")) is type(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
        hidden = model.base_model(IDS).last_hidden_state
        assert torch.equal(base(IDS).last_hidden_state, hidden)
    assert get_block(loaded).ode == get_block(model).ode
    # device_map="auto" keeps whole what exists: the ODE block, not the stock layers
    assert loaded._no_split_modules == model._no_split_modules == {"ODEBlock"}
    # back to a stock model: stock classes, the stock model type, loadable without odeify
    plain = odeify.materialize(loaded, 2)
    assert type(plain) is stock_class(type(model)) and plain.config.model_type == model_type
    plain.save_pretrained(tmp_path / "plain")
    saved = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert saved["model_type"] == model_type and "odeify" not in saved


def test_a_learned_basis_loads_bit_exact_its_frequencies_recomputed(tmp_path):
    # The Fourier unit's frequencies are a non-persistent buffer: not in the checkpoint, and left
    # uninitialised by transformers' meta-device load unless the model class recomputes them.
    fresh = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=97)).eval()
    model = _ode(fresh, basis="fourier", num_basis=3, init="random")
    odeify.save_pretrained(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_bfloat16_loads_in_its_saved_dtype(make_llama, tmp_path):
    model = _ode(make_llama().to(torch.bfloat16))
    odeify.save_pretrained(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")
    assert loaded.dtype == torch.bfloat16
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in loaded.state_dict().items())
    # transformers keeps RoPE's frequencies in float32 on a bfloat16 load (as for a stock Llama),
    # where .to(bfloat16) rounded the saved model's: compare with them rebuilt the same way.
    rope = model.model.rotary_emb
    model.model.rotary_emb = type(rope)(config=model.config)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_plain_transformers_refuses_the_folder_naming_the_model_type(make_gpt2, tmp_path):
    odeify.save_pretrained(_ode(make_gpt2()), tmp_path / "m")
    script = (
        "import sys, transformers\n"
        f"try:\n    transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
        "except ValueError as error:\n    print(error)\n"
        "assert 'odeify' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "model type `odeify-gpt2`" in run.stdout


def test_odeify_from_pretrained_returns_the_odeify_class(make_gpt2, tmp_path):
    model = _ode(make_gpt2())
    odeify.save_pretrained(model, tmp_path / "m")
    loaded = odeify.from_pretrained(tmp_path / "m")
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


# --------------------------------------------------------------------- the earlier format
def _old_format(folder):
    """What save_pretrained wrote before odeify had its own classes: the stock model type."""

    def edit(config):
        config["model_type"] = config["model_type"].removeprefix("odeify-")
        config["architectures"] = [a.removeprefix("Odeify") for a in config["architectures"]]

    _rewrite(folder, edit)


def test_a_folder_of_the_earlier_format_loads_and_upgrades(make_gpt2, tmp_path, capsys):
    from odeify.train.data import char_tokenizer

    model = _ode(make_gpt2())
    tokenizer = char_tokenizer({"play": "to be, or not to be"})
    odeify.save_pretrained(model, tmp_path / "m", tokenizer=tokenizer)
    _old_format(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "gpt2"

    old = odeify.from_pretrained(tmp_path / "m")  # the checksum is verified: it still matches
    assert type(old) is type(model)
    with torch.no_grad():
        assert torch.equal(old(IDS).logits, model(IDS).logits)

    assert main(["upgrade", str(tmp_path / "m")]) == 0
    assert "odeify-gpt2" in capsys.readouterr().out
    upgraded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(upgraded) is type(model)
    with torch.no_grad():
        assert torch.equal(upgraded(IDS).logits, model(IDS).logits)
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"README.md", "checksum.json", "tokenizer_config.json"} <= names
    odeify.from_pretrained(tmp_path / "m")  # its new checksum verifies


def test_an_odeify_model_type_without_its_settings_is_refused(make_gpt2, tmp_path):
    odeify.save_pretrained(_ode(make_gpt2()), tmp_path / "m")
    _rewrite(tmp_path / "m", lambda c: c.pop("odeify"))
    refusal = (
        f"{tmp_path / 'm' / 'config.json'} has model type 'odeify-gpt2' but no 'odeify' section "
        "(the ODE settings): it was edited; restore it or convert the original model again"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(refusal)}$"):
        odeify.from_pretrained(tmp_path / "m")


# ------------------------------------------------------------------------------ model card
def test_the_model_card_describes_the_model_and_how_to_load_it(make_gpt2, tmp_path):
    model = _ode(make_gpt2(), scheme="rk4", steps=2)
    schedule = Schedule.uniform(2, 4, scheme="rk4").to_dict()
    get_block(model).ode.update(schedules={"2": schedule})
    card = {"base_model": "openai-community/gpt2", "perplexity": {"N = 2": 31.4159}}
    odeify.save_pretrained(model, tmp_path / "m", card=card)
    text = (tmp_path / "m" / "README.md").read_text()
    front = text.split("---")[1]
    assert "library_name: odeify" in front and "base_model: openai-community/gpt2" in front
    for row in (
        "| model type | `odeify-gpt2` (family gpt2) |",
        "| L (layers of the base model) | 4 |",
        "| basis | hat |",
        "| K (basis tensors per parameter) | 4 |",
        "| scheme | rk4 |",
        "| steps N | 2 |",
        "| calibrated schedules | N = 2 |",
        "| N = 2 | 31.42 |",
    ):
        assert row in text.splitlines(), row
    assert 'odeify.from_pretrained("m")' in text
    assert 'AutoModelForCausalLM.from_pretrained("m")' in text


def test_the_card_leaves_a_local_base_out_of_the_hub_metadata(make_gpt2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-gpt2").mkdir()
    odeify.save_pretrained(_ode(make_gpt2()), "m", card={"base_model": "local-gpt2"})
    text = (tmp_path / "m" / "README.md").read_text()
    assert "base_model:" not in text.split("---")[1]
    assert "local-gpt2 with its 4 gpt2 blocks" in text
    with pytest.raises(TypeError, match="a perplexity must be a number"):
        odeify.save_pretrained(_ode(make_gpt2()), "n", card={"perplexity": "low"})


# ---------------------------------------------------------------------------- depth per call
def test_forward_and_generate_take_the_depth_per_call(make_gpt2):
    model = _ode(make_gpt2())
    block = get_block(model)
    settings = block.ode.to_dict()
    seen = []
    block.register_forward_pre_hook(lambda module, args: seen.append(module.ode.resolved_steps))
    greedy = dict(max_new_tokens=4, do_sample=False, output_scores=True)
    greedy.update(return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        per_call = model.generate(IDS, ode_steps=2, ode_scheme="rk4", **greedy)
        logits = model(IDS, ode_steps=2, ode_scheme="rk4").logits
        default = model.generate(IDS, **greedy)
        with steps(model, 2, scheme="rk4"):
            inside = model.generate(IDS, **greedy)
            inside_logits = model(IDS).logits
    assert torch.equal(per_call.sequences, inside.sequences)
    assert all(torch.equal(a, b) for a, b in zip(per_call.scores, inside.scores, strict=True))
    assert torch.equal(logits, inside_logits)
    assert not torch.equal(per_call.scores[0], default.scores[0])  # the depth did change
    # The shared settings were never changed for the per-call runs (4 forwards, then 1).
    assert seen[:5] == [4] * 5 and block.ode.to_dict() == settings
    # per-sample counts travel the same way
    counts = torch.tensor([2, 8])
    with torch.no_grad():
        with steps(model, counts):
            expected = model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
        got = model.generate(
            IDS, ode_steps=counts, max_new_tokens=3, do_sample=False, pad_token_id=0
        )
    assert torch.equal(got, expected)
    names = inspect.signature(model.forward).parameters
    assert {"ode_steps", "ode_scheme", "ode_schedule", "logits_to_keep", "labels"} <= set(names)


def test_a_loaded_model_generates_at_a_per_call_depth(make_llama, tmp_path):
    model = _ode(make_llama())
    odeify.save_pretrained(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with steps(model, 6):
            expected = model.generate(IDS, **kw)
        assert torch.equal(loaded.generate(IDS, ode_steps=6, **kw), expected)


# ---------------------------------------------------------------------- fresh construction
def _llama_config(**kw):
    return OdeifyLlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        **kw,
    )


def test_a_model_built_from_a_config_is_odeified_with_its_settings():
    settings = {"family": "llama", "num_layers": 3, "basis": "chebyshev", "num_basis": 2}
    model = OdeifyLlamaForCausalLM(_llama_config(odeify=settings)).eval()
    ode = get_block(model).ode
    assert (ode.basis, ode.num_basis, ode.num_layers) == ("chebyshev", 2, 3)
    assert torch.isfinite(model(IDS).logits).all()
    default = OdeifyLlamaForCausalLM(_llama_config())  # no settings: odeify's defaults, fitted
    assert get_block(default).ode.basis == "hat" and get_block(default).ode.num_basis == 3
    assert (
        get_block(default).fit_residuals and max(get_block(default).fit_residuals.values()) < 1e-6
    )


def test_construction_on_the_meta_device_builds_the_block_without_fitting():
    with torch.device("meta"):
        model = OdeifyLlamaForCausalLM(_llama_config())
    block = get_block(model)
    assert all(p.device.type == "meta" for p in block.parameters())
    assert not block.fit_residuals  # nothing fitted: from_pretrained fills the tensors


# -------------------------------------------------------------------- odeify.models directly
def test_classes_are_made_by_name_on_first_use():
    from transformers import GPT2ForSequenceClassification

    import odeify.models as models

    assert models.OdeifyGPT2Config is models.odeify_config_class(GPT2Config)
    assert models.OdeifyGPT2Config.model_type == "odeify-gpt2"
    made = models.OdeifyGPT2ForSequenceClassification
    assert made is models.odeify_class(GPT2ForSequenceClassification)
    assert made.__name__ == "OdeifyGPT2ForSequenceClassification"
    for name in ("OdeifyNoSuchModel", "GPT2Config", "OdeifyAutoConfig", "Odeify"):
        message = f"module 'odeify.models' has no attribute '{name}'"
        with pytest.raises(AttributeError, match=f"^{message}$"):
            getattr(models, name)


def test_set_config_class_keeps_the_model_type_where_the_config_holds_it():
    from odeify.models import odeify_config_class, set_config_class

    built = LlamaConfig(hidden_size=64)  # model type from the class
    set_config_class(built, odeify_config_class(LlamaConfig))
    assert type(built) is OdeifyLlamaConfig and built.model_type == "odeify-llama"
    assert "model_type" not in vars(built) and built.hidden_size == 64
    read = LlamaConfig.from_dict({"model_type": "llama", "hidden_size": 64})
    read.model_type = "llama"  # as read from a file: an instance attribute
    set_config_class(read, OdeifyLlamaConfig)
    assert vars(read)["model_type"] == "odeify-llama" and type(read) is OdeifyLlamaConfig


def test_the_depth_keywords_join_the_forward_signature_and_reach_the_stock_forward():
    from odeify.models import _forward_with_depth

    def stock(self, ids, mask=None, **kwargs):
        """The stock forward."""
        return ids, mask, kwargs

    forward = _forward_with_depth(stock)
    assert forward.__name__ == "stock" and forward.__doc__ == "The stock forward."
    params = inspect.signature(forward).parameters
    assert list(params) == [
        "self",
        "ids",
        "mask",
        "ode_steps",
        "ode_scheme",
        "ode_schedule",
        "kwargs",
    ]
    for name in ("ode_steps", "ode_scheme", "ode_schedule"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is None
    got = forward(None, 1, ode_steps=2, ode_scheme=None, ode_schedule="s", labels=3)
    assert got == (1, None, {"labels": 3, "ode_steps": 2, "ode_schedule": "s"})
    assert forward(None, 1, mask=0) == (1, 0, {})

    def plain(self, ids):  # no **kwargs: the keywords go last
        return ids

    params = inspect.signature(_forward_with_depth(plain)).parameters
    assert list(params) == ["self", "ids", "ode_steps", "ode_scheme", "ode_schedule"]

    # A stock forward that names one already: it is not repeated.
    def named(self, ids, ode_steps=None, **kwargs):
        return ids

    params = inspect.signature(_forward_with_depth(named)).parameters
    assert list(params) == ["self", "ids", "ode_steps", "ode_scheme", "ode_schedule", "kwargs"]


def test_modules_are_visited_children_first():
    from torch import nn

    from odeify.models import _post_order

    inner = nn.Sequential(nn.Linear(1, 1), nn.ReLU())
    outer = nn.Sequential(inner, nn.Tanh())
    assert list(_post_order(outer)) == [inner[0], inner[1], inner, outer[1], outer]


def test_activation_checkpointing_reaches_the_ode_block_with_its_options(make_llama):
    model = _ode(make_llama()).train()
    stepper = get_block(model).stepper
    model.activation_checkpointing_enable(
        every_n_layers=3, activation_checkpointing_kwargs={"use_reentrant": True}
    )
    assert stepper.gradient_checkpointing and stepper.every == 3
    assert stepper._gradient_checkpointing_func.keywords == {"use_reentrant": True}
    model.activation_checkpointing_disable()
    assert not stepper.gradient_checkpointing
    model.activation_checkpointing_enable()
    assert stepper.gradient_checkpointing and stepper.every == 1


def test_odeify_classes_count_as_the_stock_ones_not_as_custom_code(make_gpt2):
    model = _ode(make_gpt2())
    assert type(model).is_custom_code() is GPT2LMHeadModel.is_custom_code() is False
    assert model._no_split_modules == {"ODEBlock"} and model.transformer._no_split_modules == {
        "ODEBlock"
    }


def test_registering_again_maps_every_family_to_its_classes():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    from odeify.models import odeify_class, odeify_config_class, register_auto_classes

    register_auto_classes()  # import registered them; again changes nothing
    for model_type in ("gpt2", "llama", "mistral", "qwen2", "qwen3"):
        stock = AutoConfig.for_model(model_type).__class__
        config = AutoConfig.for_model(f"odeify-{model_type}")
        assert type(config) is odeify_config_class(stock)
        for mapping in (MODEL_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING):
            assert mapping[type(config)] is odeify_class(mapping[stock])


def test_a_stock_plan_of_a_family_odeify_does_not_convert_gives_none():
    from transformers import MixtralConfig

    from odeify.models import tp_plan

    assert MixtralConfig.base_model_tp_plan and tp_plan(MixtralConfig) is None


def test_classes_made_for_names_not_made_before():
    import odeify.models as models

    made = models.OdeifyBertConfig  # nothing odeify converts made it before
    assert made.model_type == "odeify-bert" and made.__mro__[1] is transformers.BertConfig
    model = models.OdeifyGPT2ForTokenClassification
    assert model.__mro__[2] is transformers.GPT2ForTokenClassification
    with pytest.raises(
        AttributeError, match="^module 'odeify.models' has no attribute 'AbcdefGPT2Config'$"
    ):
        models.AbcdefGPT2Config  # noqa: B018 - six letters, then a transformers class: no prefix


def test_a_model_built_from_saved_settings_fits_silently(capsys):
    settings = {"family": "llama", "version": 1, "num_layers": 3, "basis": "legendre"}
    model = OdeifyLlamaForCausalLM(_llama_config(odeify=settings))
    assert get_block(model).ode.basis == "legendre"
    assert capsys.readouterr().err == ""


def test_attentions_are_recorded_per_step_after_conversion(make_llama):
    model = _ode(make_llama(attn_implementation="eager"))
    with torch.no_grad(), steps(model, 5):
        out = model(IDS, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 6 and len(out.attentions) == 5
    assert all(a.shape == (2, 4, 10, 10) for a in out.attentions)


def test_a_basis_tensor_the_checkpoint_lacks_is_fitted_to_freshly_initialised_layers(
    make_llama, tmp_path
):
    from safetensors.torch import load_file, save_file

    model = _ode(make_llama())
    odeify.save_pretrained(model, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.0.basis.input_layernorm.weight"
    saved = tensors.pop(name)
    assert not torch.equal(saved, torch.ones_like(saved))  # perturbed, so not the init
    save_file(tensors, weights, metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    state = loaded.state_dict()
    # A fresh norm weight is ones in every layer: the hat basis at K = L holds each layer's.
    assert torch.equal(state[name], torch.ones_like(saved))
    assert all(torch.equal(state[k], v) for k, v in tensors.items() if k in state)
