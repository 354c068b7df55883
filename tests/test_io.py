"""Save and load: safetensors plus the ODE settings in config.json; bit-exact round trips."""

import json

import pytest
import torch
from _compare import assert_identical
from transformers import AutoModelForCausalLM

import odeify as ode
from odeify import from_pretrained, get_block, odeify, save_pretrained, set_steps

IDS = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("basis", ["hat", "fourier"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_round_trip_is_bit_exact(make_gpt2, make_llama, tmp_path, family, basis):
    model = odeify(make_gpt2() if family == "gpt2" else make_llama(), basis=basis, progress=False)
    set_steps(model, 5, scheme="rk4")
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert_identical(model.eval(), loaded, IDS)
    assert get_block(loaded).ode == get_block(model).ode
    assert (
        type(loaded) is type(model)
        and loaded.config.num_hidden_layers == model.config.num_hidden_layers
    )


def test_transformers_save_pretrained_round_trips_too(make_llama, tmp_path):
    # Loaded in bf16 as transformers loads it (RoPE frequencies stay float32, which a model cast
    # with .to(torch.bfloat16) would not have), so the round trip can be bit-exact.
    make_llama(tie_word_embeddings=True).save_pretrained(tmp_path / "stock")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", dtype=torch.bfloat16)
    model = odeify(stock, progress=False)
    model.save_pretrained(tmp_path / "ode")
    loaded = from_pretrained(tmp_path / "ode")
    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_identical(model, loaded, IDS)


def test_save_refuses_to_overwrite_and_leaves_the_folder_alone(make_gpt2, tmp_path):
    model = odeify(make_gpt2(), progress=False)
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(FileExistsError, match="not a model checkpoint.*force=True"):
        save_pretrained(model, tmp_path, overwrite=True)
    save_pretrained(model, tmp_path, overwrite=True, force=True)
    assert not (tmp_path / "keep.txt").exists() and from_pretrained(tmp_path) is not None


@pytest.fixture
def saved(make_gpt2, tmp_path):
    save_pretrained(odeify(make_gpt2(), progress=False), tmp_path / "m")
    return tmp_path / "m"


def test_missing_weights_are_named(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*config.json"):
        from_pretrained(saved)


def test_missing_config_is_named(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(saved)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_pretrained(tmp_path / "nowhere")


def _edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_another_format_version_is_refused(saved):
    _edit_config(saved, lambda c: c["odeify"].update(version=99))
    with pytest.raises(ValueError, match="format version 99.*reads version 1"):
        from_pretrained(saved)


def test_unknown_settings_are_refused(saved):
    _edit_config(saved, lambda c: c["odeify"].update(warp_drive=True))
    with pytest.raises(ValueError, match="unknown odeify settings.*warp_drive"):
        from_pretrained(saved)


def test_plain_checkpoint_points_to_odeify(make_gpt2, tmp_path):
    make_gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="plain transformers checkpoint.*odeify\\(model\\)"):
        from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config_are_refused(saved):
    _edit_config(saved, lambda c: c["odeify"].update(num_basis=3))
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|does not match"):
        from_pretrained(saved)


def test_public_api_hangs_off_the_function():
    for name in (
        "steps",
        "set_steps",
        "materialize",
        "from_pretrained",
        "save_pretrained",
        "get_block",
    ):
        assert getattr(odeify, name) is getattr(ode, name)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_torch_save_round_trips_a_whole_odeified_model(family, make_gpt2, make_llama, tmp_path):
    # Pickling the whole module (torch.save(model)) needs every function the family holds to be
    # importable by name: a lambda in an adapter made it fail.
    model = odeify(make_gpt2() if family == "gpt2" else make_llama(), progress=False)
    torch.save(model, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    ids = torch.randint(0, 97, (2, 7))
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_fit_residuals_survive_save_and_load(make_gpt2, tmp_path):
    # K = 2 < L = 4: an inexact fit, so every residual is a number that can be lost or changed.
    model = odeify(make_gpt2(), basis="chebyshev", num_basis=2, progress=False)
    residuals = get_block(model).fit_residuals
    assert len(residuals) == len(get_block(model).names) and min(residuals.values()) > 1e-3
    save_pretrained(model, tmp_path / "m")
    assert get_block(from_pretrained(tmp_path / "m")).fit_residuals == residuals


def test_a_saved_folder_holds_the_model_card_and_its_files(make_gpt2, tmp_path):
    from odeify.card import model_card

    model = odeify(make_gpt2(), progress=False)
    card = {"base_model": "openai-community/gpt2", "perplexity": 21.25}
    save_pretrained(model, tmp_path / "gpt2-ode", card=card)
    names = sorted(p.name for p in (tmp_path / "gpt2-ode").iterdir())
    assert names == [
        "README.md",
        "checksum.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    # The card names the folder and carries what the caller measured.
    text = (tmp_path / "gpt2-ode" / "README.md").read_text()
    assert text == model_card(model, "gpt2-ode", card) and "Perplexity: 21.25" in text


def test_from_pretrained_puts_the_model_on_the_device_given(saved):
    loaded = from_pretrained(saved, device="cpu")
    assert {p.device for p in loaded.parameters()} == {torch.device("cpu")}
    with pytest.raises(ValueError, match=r"^device 'cude' is not a torch device \(.+\)$"):
        from_pretrained(saved, device="cude")


def test_the_saved_architecture_picks_the_class(saved, tmp_path):
    # A base model (no LM head) comes back as itself, not as the family's causal LM; a config
    # naming no architecture, or one transformers lacks, falls back to the causal LM.
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=97, n_positions=64)
    base = odeify(GPT2Model(config).eval(), progress=False)
    save_pretrained(base, tmp_path / "base")
    loaded = from_pretrained(tmp_path / "base")
    assert type(loaded) is type(base) and type(loaded).__name__ == "OdeifyGPT2Model"
    with torch.no_grad():
        assert torch.equal(loaded(IDS).last_hidden_state, base(IDS).last_hidden_state)
    for architectures in (None, ["OdeifyNoSuchModel"]):
        _edit_config(saved, lambda c, a=architectures: c.update(architectures=a))
        assert type(from_pretrained(saved)).__name__ == "OdeifyGPT2LMHeadModel"


def test_the_tokenizer_is_saved_beside_the_model(make_gpt2, tmp_path):
    from transformers import AutoTokenizer

    from odeify.train.data import char_tokenizer

    tokenizer = char_tokenizer({"play": "to be, or not to be"})
    save_pretrained(odeify(make_gpt2(), progress=False), tmp_path / "m", tokenizer=tokenizer)
    again = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert again("not to be")["input_ids"] == tokenizer("not to be")["input_ids"]
    assert again.get_vocab() == tokenizer.get_vocab()
