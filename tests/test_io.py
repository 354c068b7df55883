"""Save and load: safetensors plus the ODE settings in config.json; bit-exact round trips."""

import json
import re

import pytest
import torch
from _compare import assert_identical
from _hub_cache import cache_snapshot
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
    refusal = (
        f"{tmp_path / 'config.json'} has no 'odeify' section: it is a plain transformers "
        "checkpoint. Load it with AutoModelForCausalLM.from_pretrained and call odeify(model)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(refusal)}$"):
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
    # The meta device stands in for an accelerator: it is not where a plain load would put it.
    for where in ({"device": "meta"}, {"device": torch.device("meta")}, {"device_map": "meta"}):
        loaded = from_pretrained(saved, **where)
        assert {p.device for p in loaded.parameters()} == {torch.device("meta")}, where
    with pytest.raises(ValueError, match=r"^device 'cude' is not a torch device \(.+\)$"):
        from_pretrained(saved, device="cude")
    both = "pass device= (the whole model on one device) or device_map=, not both"
    with pytest.raises(ValueError, match=f"^{re.escape(both)}$"):
        from_pretrained(saved, device="cpu", device_map="cpu")


def test_from_pretrained_gives_the_saved_dtype_or_the_one_asked_for(make_gpt2, tmp_path):
    model = odeify(make_gpt2(), progress=False).to(torch.bfloat16)
    save_pretrained(model, tmp_path / "m")
    expected = model.state_dict()
    for dtype, loads in ((None, torch.bfloat16), ("float32", torch.float32)):
        state = from_pretrained(tmp_path / "m", dtype=dtype).state_dict()
        assert {t.dtype for t in state.values() if t.is_floating_point()} == {loads}, dtype
        assert all(torch.equal(state[k], expected[k].to(loads)) for k in expected)


def test_a_hub_id_loads_the_revision_asked_for_from_the_cache_given(make_gpt2, tmp_path):
    cache = tmp_path / "hub"
    for i, (ref, layers) in enumerate((("main", 4), ("v2", 2))):
        save_pretrained(odeify(make_gpt2(n_layer=layers), progress=False), tmp_path / ref)
        cache_snapshot(tmp_path / ref, cache, "someone/tiny-ode", commit=f"{i}" * 40, ref=ref)
    for revision, layers in ((None, 4), ("v2", 2), ("1" * 40, 2)):
        loaded = from_pretrained("someone/tiny-ode", revision=revision, cache_dir=cache)
        assert loaded.config.n_layer == layers, revision


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


# ------------------------------------------------------------------ odeify.checkpoint's reading
_TENSORS = {
    "f64": torch.arange(6, dtype=torch.float64).reshape(3, 2),
    "f32": torch.arange(12, dtype=torch.float32).reshape(4, 3),
    "f16": torch.ones(2, dtype=torch.float16),
    "bf16": torch.full((5, 1), 0.5, dtype=torch.bfloat16),
    "i64": torch.arange(4),
    "i32": torch.arange(3, dtype=torch.int32),
    "i16": torch.arange(2, dtype=torch.int16),
    "i8": torch.arange(2, dtype=torch.int8),
    "u8": torch.arange(2, dtype=torch.uint8),
    "bool": torch.tensor([True, False]),
}
# Listed out of order: the shards are read in sorted order.
_SHARDS = {
    "c.safetensors": ["f64", "f32", "bf16"],
    "b.safetensors": ["f16"],
    "a.safetensors": ["i64", "i32", "i16", "i8", "u8", "bool"],
}


def _sharded(folder, shards=_SHARDS):
    """safetensors shards written directly (not by odeify), with their index."""
    from safetensors.torch import save_file

    folder.mkdir()
    weight_map = {}
    for file, names in shards.items():
        save_file({n: _TENSORS[n] for n in names}, folder / file)
        weight_map.update(dict.fromkeys(names, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_a_checkpoint_reads_every_tensor_from_its_shard_by_name(tmp_path):
    from odeify.checkpoint import Checkpoint, floating_dtype, weight_files

    folder = _sharded(tmp_path / "c")
    assert weight_files(folder) == [
        folder / f for f in ("a.safetensors", "b.safetensors", "c.safetensors")
    ]
    with Checkpoint(folder) as tensors:
        assert len(tensors) == len(_TENSORS) and sorted(tensors) == sorted(_TENSORS)
        assert "f32" in tensors and "f8" not in tensors and 3 not in tensors
        for name, tensor in _TENSORS.items():
            assert tensors.shape(name) == tuple(tensor.shape)
            assert tensors.dtype(name) == tensor.dtype
            assert torch.equal(tensors[name], tensor) and tensors[name].dtype == tensor.dtype
        assert torch.equal(tensors.rows("f32", 1, 3), _TENSORS["f32"][1:3])
        assert floating_dtype(tensors) == torch.float16  # the integer shard comes first
        missing = re.escape(f"{folder} has no tensor 'f8'")
        for read in (
            tensors.shape,
            tensors.dtype,
            tensors.__getitem__,
            lambda n: tensors.rows(n, 0, 1),
        ):
            with pytest.raises(KeyError, match=missing):
                read("f8")
    assert len(tensors) == 0 and list(tensors) == []  # closed: the headers are forgotten
    with Checkpoint(_sharded(tmp_path / "ints", {"a.safetensors": ["i64", "bool"]})) as tensors:
        assert floating_dtype(tensors) is None


def test_the_weight_files_of_a_folder_or_what_is_missing(tmp_path):
    from safetensors.torch import save_file

    from odeify.checkpoint import Checkpoint, weight_files

    folder = _sharded(tmp_path / "c")
    save_file({"f16": _TENSORS["f16"]}, folder / "model.safetensors")
    assert weight_files(folder) == [folder / "model.safetensors"]  # the single file first
    (folder / "model.safetensors").unlink()
    (folder / "c.safetensors").unlink()
    message = f"{folder} is missing weight shards ['c.safetensors']"
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        weight_files(folder)
    (folder / "model.safetensors.index.json").unlink()
    message = (
        f"{folder} has no model.safetensors (files present: ['a.safetensors', 'b.safetensors'])"
    )
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        weight_files(folder)
    save_file({"f8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, folder / "model.safetensors")
    message = f"{folder}: f8 is stored as F8_E4M3, which odeify cannot read"
    with pytest.raises(ValueError, match=re.escape(message)):
        Checkpoint(folder).dtype("f8")


@pytest.mark.parametrize(
    "dtype, saved, loads",
    [
        (None, torch.bfloat16, torch.bfloat16),
        ("auto", torch.float16, torch.float16),
        ("auto", torch.int64, torch.float32),  # integer weights: float32, as transformers
        (None, None, torch.float32),
        ("float16", torch.bfloat16, torch.float16),
        ("torch.bfloat16", torch.float32, torch.bfloat16),
        (torch.float64, None, torch.float64),
    ],
)
def test_the_dtype_a_load_gives(dtype, saved, loads):
    from odeify.checkpoint import load_dtype

    assert load_dtype(dtype, saved) == loads


def test_parse_dtype_takes_names_and_torch_dtypes_only():
    from odeify.checkpoint import parse_dtype

    assert [parse_dtype(d) for d in (None, "auto", torch.float16, "float32", "torch.bfloat16")] == [
        None,
        "auto",
        torch.float16,
        torch.float32,
        torch.bfloat16,
    ]
    names = "'auto', 'float32', 'bfloat16', 'float16' (or a torch dtype)"
    for bad, shown in (("float8", "'float8'"), (16, "16"), ("torch.auto", "'torch.auto'")):
        with pytest.raises(ValueError, match=re.escape(f"dtype {shown} is not one of {names}")):
            parse_dtype(bad)
