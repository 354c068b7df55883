"""The big-model path: streaming conversion from safetensors shards, HF-style loading arguments
(dtype, device_map, hub ids offline), and the CLI's --device / --dtype."""

import json
import re

import pytest
import torch
from _compare import assert_identical
from _hub_cache import cache_snapshot
from _stacklevel import record_callers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import odeify.streaming as streaming
from odeify import from_pretrained, get_block, odeify, save_pretrained
from odeify.cli import main

IDS = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))
FLOAT32_ULP = 2.0**-23  # float32's relative spacing: one rounding apart at most


def _save_sharded(model, folder):
    """save_pretrained into two safetensors shards (and their index)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=size // 2 + 1)
    shards = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) >= 2
    return folder


@pytest.fixture
def stock(make_gpt2, make_llama, tmp_path, request):
    family = getattr(request, "param", "llama")
    model = make_gpt2() if family == "gpt2" else make_llama()
    return _save_sharded(model, tmp_path / f"{family}-stock")


def _in_memory(folder, **kwargs):
    dtype = kwargs.pop("dtype", "auto")
    return odeify(
        AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), progress=False, **kwargs
    )


def _assert_same_model(a, b):
    assert type(a) is type(b) and a.config.odeify == b.config.odeify
    assert_identical(a, b, IDS)


# ------------------------------------------------------------------------ streaming conversion
@pytest.mark.parametrize("stock", ["gpt2", "llama"], indirect=True)
def test_streaming_hat_conversion_is_the_in_memory_one_bit_for_bit(stock):
    streamed = odeify(stock, progress=False)
    _assert_same_model(streamed, _in_memory(stock))
    assert not streamed.training and set(get_block(streamed).fit_residuals.values()) == {0.0}


@pytest.mark.parametrize("num_basis", [2, None])
@pytest.mark.parametrize("stock", ["gpt2", "llama"], indirect=True)
def test_streaming_smooth_fit_is_the_same_solve(stock, num_basis, monkeypatch):
    # A few rows per solve, so every parameter is solved in several blocks (GPT-2's Conv1D
    # weights in blocks of columns of the [out, in] basis).
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 2048)
    kwargs = dict(basis="chebyshev", num_basis=num_basis)
    streamed, memory = odeify(stock, progress=False, **kwargs), _in_memory(stock, **kwargs)
    sa, sb = streamed.state_dict(), memory.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        # Both solve the same float64 least squares (cond(C) is small at L = 4) and round once
        # to float32: at most one float32 rounding apart.
        bound = torch.maximum(sa[key].abs(), sb[key].abs()) * FLOAT32_ULP
        assert ((sa[key] - sb[key]).abs() <= bound).all(), key
    fits = get_block(streamed).fit_residuals, get_block(memory).fit_residuals
    assert fits[0].keys() == fits[1].keys()
    assert all(abs(fits[0][k] - fits[1][k]) < 1e-6 for k in fits[0])
    if num_basis == 2:  # K < L compresses: a real residual, measured like the in-memory fit's
        assert max(fits[0].values()) > 0.1


def test_streaming_keeps_the_checkpoint_dtype_or_casts(make_llama, tmp_path):
    folder = _save_sharded(make_llama().to(torch.bfloat16), tmp_path / "bf16")
    streamed = odeify(folder, progress=False)
    assert streamed.dtype == torch.bfloat16
    _assert_same_model(streamed, _in_memory(folder))
    cast = odeify(folder, dtype="float32", progress=False)
    _assert_same_model(cast, _in_memory(folder, dtype=torch.float32))


def test_streaming_ties_the_head_to_the_embeddings(make_llama, tmp_path):
    folder = _save_sharded(make_llama(tie_word_embeddings=True), tmp_path / "tied")
    streamed = odeify(folder, progress=False)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    _assert_same_model(streamed, _in_memory(folder))


def test_a_checkpoint_missing_a_layer_tensor_is_refused(stock):
    shard = sorted(stock.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(n for n in tensors if ".layers." in n)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks tensors the config implies.*from_pretrained"):
        odeify(stock, progress=False)


def test_string_sources_that_cannot_stream_say_what_to_do(stock, make_gpt2, tmp_path):
    with pytest.raises(ValueError, match="init='random' builds on a model in memory"):
        odeify(stock, basis="fourier", init="random")
    with pytest.raises(TypeError, match="dtype=.*checkpoint path.*model.to"):
        odeify(make_gpt2(), dtype=torch.bfloat16)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        odeify(tmp_path / "nowhere")
    converted = tmp_path / "ode"
    save_pretrained(odeify(stock, progress=False), converted)
    with pytest.raises(ValueError, match="already odeified: load it with odeify.from_pretrained"):
        odeify(converted)
    for weights in stock.glob("model*"):
        weights.unlink()
    (stock / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="reads safetensors.*AutoModelForCausalLM"):
        odeify(stock)


# --------------------------------------------------------------------- loading arguments, hub
@pytest.fixture
def saved(stock, tmp_path):
    model = odeify(stock, progress=False)
    return save_pretrained(model, tmp_path / "saved"), model


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "torch.bfloat16"])
def test_from_pretrained_casts_as_transformers_does(saved, dtype):
    folder, _ = saved
    loaded = from_pretrained(folder, dtype=dtype)
    assert loaded.dtype == torch.bfloat16
    _assert_same_model(loaded, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    "placement",
    [{"device_map": "cpu"}, {"device_map": "auto"}, {"device_map": {"": "cpu"}}, {"device": "cpu"}],
)
def test_from_pretrained_places_the_model(saved, placement):
    folder, model = saved
    loaded = from_pretrained(folder, **placement)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    _assert_same_model(loaded, model)


def test_from_pretrained_refuses_bad_arguments(saved):
    folder, _ = saved
    with pytest.raises(ValueError, match="dtype 'float8' is not one of 'auto', 'float32'"):
        from_pretrained(folder, dtype="float8")
    with pytest.raises(ValueError, match="device= .* or device_map=, not both"):
        from_pretrained(folder, device="cpu", device_map="auto")


def test_hub_ids_resolve_from_the_cache_offline(stock, saved, tmp_path):
    cache = tmp_path / "hub"
    cache_snapshot(stock, cache, "someone/tiny-stock")
    cache_snapshot(saved[0], cache, "someone/tiny-ode")
    _assert_same_model(odeify("someone/tiny-stock", cache_dir=cache, progress=False), saved[1])
    _assert_same_model(from_pretrained("someone/tiny-ode", cache_dir=cache), saved[1])


def test_a_hub_id_that_is_not_cached_says_it_is_offline(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a cached hub.*OFFLINE"):
        from_pretrained("someone/not-downloaded", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a cached hub.*OFFLINE"):
        odeify("someone/not-downloaded", cache_dir=tmp_path)


# ------------------------------------------------------------------------------------- the CLI
def _user_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


@pytest.fixture
def gpt2_folder(make_gpt2, tmp_path):
    """A small GPT-2 with a character tokenizer of its vocabulary, and a corpus file."""
    from odeify.train.data import char_tokenizer

    folder = _save_sharded(make_gpt2(n_positions=64), tmp_path / "gpt2")
    char_tokenizer([TEXT]).save_pretrained(folder)
    (tmp_path / "corpus.txt").write_text(TEXT * 4)
    return folder


def test_cli_convert_streams_a_folder_in_the_dtype_asked(gpt2_folder, tmp_path, monkeypatch):
    import odeify.loading

    # A transformers folder is streamed: the stock model is never loaded whole.
    monkeypatch.setattr(odeify.loading, "load_model", lambda *a, **k: pytest.fail("loaded whole"))
    out = tmp_path / "out"
    argv = ["convert", str(gpt2_folder), str(out), "--dtype", "bfloat16", "--device", "cpu"]
    assert main(argv) == 0
    loaded = from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    _assert_same_model(loaded, _in_memory(gpt2_folder, dtype=torch.bfloat16))


def test_cli_eval_and_generate_take_device_and_dtype(gpt2_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(gpt2_folder), str(out)]) == 0
    placement = ["--device", "cpu", "--dtype", "bfloat16"]
    corpus = ["--corpus", str(tmp_path / "corpus.txt"), "--seq-len", "32", "--max-windows", "1"]
    assert main(["eval", str(out), "--steps", "4", *corpus, *placement]) == 0
    assert (
        main(["generate", str(out), "--prompt", "To be", "--max-new-tokens", "2", *placement]) == 0
    )
    assert "tokens at 4 steps" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["convert", "eval", "generate"])
@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--device", "cude", "'cude' is not a torch device"),
        ("--dtype", "float8", "takes one of auto, float32, bfloat16, float16, got 'float8'"),
    ],
)
def test_cli_bad_device_or_dtype_is_a_usage_error(command, flag, value, match, capsys):
    argv = {"convert": ["convert", "M", "out"], "eval": ["eval", "M"]}.get(
        command, ["generate", "M", "--prompt", "x"]
    )
    assert match in _user_error([*argv, flag, value], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cli_cuda_without_a_gpu_is_refused_before_loading(capsys):
    err = _user_error(["eval", "no/such/model", "--device", "cuda"], capsys)
    assert "torch sees no CUDA device" in err


# ------------------------------------------------------------------------- odeify.hub directly
@pytest.mark.parametrize(
    "source, hub",
    [
        ("HuggingFaceTB/SmolLM2-135M", True),
        ("gpt2", True),
        ("owner/name.v1_b-2", True),
        ("./model", False),
        (".hidden", False),
        ("owner/../name", False),
        ("owner..name", False),
        ("model.gguf", False),
        ("/tmp/model", False),
        ("a/b/c", False),
        ("owner/na me", False),
    ],
)
def test_what_reads_as_a_hub_id(source, hub):
    from odeify.hub import is_hub_id

    assert is_hub_id(source) is hub


def test_resolve_asks_the_hub_only_for_a_hub_id_and_only_for_checkpoint_files(
    tmp_path, monkeypatch
):
    import huggingface_hub

    import odeify.hub as hub

    calls = []

    def download(repo, **kwargs):
        calls.append((repo, kwargs))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert hub.resolve(tmp_path) == tmp_path  # on disk: itself, even though never a hub id
    assert hub.resolve(tmp_path / "nowhere") == tmp_path / "nowhere"  # a path, not an id
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    assert hub.resolve("~/models") == tmp_path / "models"
    assert hub.resolve("owner/model", revision="v2", cache_dir=tmp_path) == tmp_path / "snapshot"
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "README.md"]
    options = {"revision": "v2", "cache_dir": tmp_path, "allow_patterns": patterns}
    assert calls == [("owner/model", options)]


def test_resolve_says_why_the_hub_gave_nothing(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from odeify.hub import resolve

    class Refused(HfHubHTTPError):
        def __init__(self, message):  # no HTTP response to build one from here
            Exception.__init__(self, message)

    def raising(error):
        def download(*args, **kwargs):
            raise error

        return download

    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(Refused("401: gated repo")))
    message = "'owner/model' is not a local folder, and the hub refused it: 401: gated repo"
    with pytest.raises(FileNotFoundError, match=re.escape(message)) as refused:
        resolve("owner/model")
    assert refused.value.__suppress_context__
    unreachable = LocalEntryNotFoundError("connection timed out")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(unreachable))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    message = (
        "'owner/model' is neither a local folder nor a cached hub model, and the hub could not "
        "be reached (connection timed out)"
    )
    with pytest.raises(FileNotFoundError, match=re.escape(message) + "$"):
        resolve("owner/model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = (
        "'owner/model' is neither a local folder nor a cached hub model, and HF_HUB_OFFLINE is "
        "set, so the hub is not asked: download it once online, or pass the folder it is in"
    )
    with pytest.raises(FileNotFoundError, match=re.escape(message) + "$") as offline:
        resolve("owner/model")
    assert offline.value.__suppress_context__


# ------------------------------------------------------- streaming: what a checkpoint may hold
def _rewrite(folder, edit):
    """Edit the tensors of a single-file checkpoint: ``edit(tensors)`` in place."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


IN_MEMORY = "odeify(AutoModelForCausalLM.from_pretrained(folder))"


def test_streaming_names_the_tensors_a_checkpoint_lacks_or_has_wrong(make_llama, tmp_path):
    folder = tmp_path / "stock"
    make_llama().save_pretrained(folder)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    names += ["model.layers.0.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]
    names += ["model.embed_tokens.weight"]
    _rewrite(folder, lambda t: [t.pop(n) for n in names])
    # In the block's parameter order, layer by layer, then the rest; the first six.
    missing = [*names[:4], "model.embed_tokens.weight", "model.norm.weight"]
    message = (
        f"{folder} lacks tensors the config implies: {missing}. If its keys follow another "
        f"naming, convert it in memory: {IN_MEMORY}"
    )
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        odeify(folder, progress=False)
    make_llama().save_pretrained(folder)

    def shrink(tensors):
        for n in [*names[:3], "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]:
            tensors[n] = tensors[n][:-1].contiguous()

    _rewrite(folder, shrink)
    wrong = ["model.layers.1.mlp.down_proj.weight is (31, 48), the config implies (32, 48)"]
    wrong = [f"{n} is (47, 32), the config implies (48, 32)" for n in names[:3]] + wrong
    message = f"{folder} does not match its config: " + "; ".join(wrong)
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        odeify(folder, progress=False)
    make_llama().save_pretrained(folder)  # a tensor outside the stack only
    _rewrite(folder, lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1]}))
    message = (
        f"{folder} does not match its config: model.norm.weight is (31,), the config implies (32,)"
    )
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        odeify(folder, progress=False)


def test_streaming_skips_tensors_that_belong_to_nothing_and_says_so(
    make_llama, tmp_path, monkeypatch
):
    folder = tmp_path / "stock"
    stock = make_llama()
    stock.save_pretrained(folder)
    extra = [f"model.extra.{i}" for i in range(5)]
    ignored = [
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "h.0.attn.bias",
        "h.0.attn.masked_bias",
    ]
    _rewrite(folder, lambda t: t.update({n: torch.zeros(2) for n in extra + ignored}))
    message = (
        f"{folder}: 5 checkpoint tensors belong to nothing in the model and are skipped: "
        f"{extra[:4]}"
    )
    callers = record_callers(monkeypatch, 3)  # 1: the plan that warns, 2: convert, 3: its caller
    with pytest.warns(UserWarning, match=re.escape(message) + "$") as caught:
        streamed = odeify(folder, progress=False)
    (skipped,) = [w for w in caught if "belong to nothing" in str(w.message)]
    assert (skipped.filename, skipped.lineno) in callers
    _assert_same_model(streamed, odeify(stock, progress=False))


def test_streaming_a_base_model_checkpoint_or_into_a_base_model(make_llama, tmp_path):
    from transformers import AutoModel

    tied = make_llama(tie_word_embeddings=True)
    base, whole = tmp_path / "base", tmp_path / "whole"
    tied.model.save_pretrained(base)  # keys without the head's "model." prefix
    tied.save_pretrained(whole)
    _config(base, architectures=["LlamaForCausalLM"], tie_word_embeddings=True)
    streamed = odeify(base, progress=False)
    assert type(streamed).__name__ == "OdeifyLlamaForCausalLM"
    _assert_same_model(streamed, odeify(tied, progress=False))
    _config(whole, architectures=["LlamaModel"])  # the head's keys carry the prefix
    streamed = odeify(whole, progress=False)
    memory = odeify(AutoModel.from_pretrained(whole), progress=False)
    assert type(streamed).__name__ == "OdeifyLlamaModel" and type(memory) is type(streamed)
    with torch.no_grad():
        assert torch.equal(streamed(IDS).last_hidden_state, memory(IDS).last_hidden_state)
    for architectures in (None, ["NoSuchForCausalLM"]):  # the causal LM, as transformers loads it
        _config(whole, architectures=architectures)
        streamed = odeify(whole, dtype="bfloat16", progress=False)
        assert type(streamed).__name__ == "OdeifyLlamaForCausalLM"
        assert {p.dtype for p in streamed.parameters()} == {torch.bfloat16}


def test_streaming_refuses_a_folder_without_a_config(make_llama, tmp_path):
    folder = tmp_path / "stock"
    make_llama().save_pretrained(folder)
    (folder / "config.json").unlink()
    message = f"{folder} has no config.json; is it a model folder?"
    with pytest.raises(FileNotFoundError, match=re.escape(message) + "$"):
        odeify(folder, progress=False)
    message = f"{tmp_path / 'none'} does not exist (nor is it a hub id)"
    with pytest.raises(FileNotFoundError, match=re.escape(message) + "$"):
        odeify(tmp_path / "none", progress=False)


def test_streaming_a_learned_basis_makes_its_time_units_as_odeify_does(make_gpt2, tmp_path):
    folder = tmp_path / "stock"
    make_gpt2().save_pretrained(folder)
    torch.manual_seed(3)
    options = dict(basis="fourier", num_basis=3, basis_kwargs={"hidden": 5})
    streamed = odeify(folder, progress=False, **options)
    block = get_block(streamed)
    # The in-memory fit with the same time units: the same basis.
    stock = AutoModelForCausalLM.from_pretrained(folder)
    layers = list(stock.transformer.h)
    memory = _in_memory(folder, **options)
    get_block(memory).time_basis.load_state_dict(block.time_basis.state_dict())
    samples = {
        name: torch.stack(
            [
                p.t() if block.family.is_transposed(name) else p
                for p in (layer.get_parameter(name) for layer in layers)
            ]
        )
        for name in block.names
    }
    get_block(memory).fit(samples, progress=False)
    sa, sb = streamed.state_dict(), memory.state_dict()
    for key in sa:
        # The same float64 least squares, rounded once to float32 (as the smooth fit above).
        bound = torch.maximum(sa[key].abs(), sb[key].abs()) * FLOAT32_ULP
        assert ((sa[key] - sb[key]).abs() <= bound).all(), key


def test_a_smooth_fit_measures_its_residual_in_the_checkpoints_dtype(make_llama, tmp_path):
    folder = tmp_path / "bf16"
    make_llama().to(torch.bfloat16).save_pretrained(folder)
    # K = L: exact in float64, so the residual is W(t_l) rounded to bfloat16, as in memory.
    streamed = get_block(odeify(folder, basis="chebyshev", progress=False)).fit_residuals
    memory = get_block(_in_memory(folder, basis="chebyshev")).fit_residuals
    assert streamed.keys() == memory.keys()
    assert all(abs(streamed[k] - memory[k]) < 1e-6 for k in streamed)
    assert max(streamed.values()) > 1e-3  # bfloat16's rounding, not float64's


def test_a_parameter_of_zeros_fits_with_no_residual(make_gpt2, tmp_path):
    folder = tmp_path / "stock"
    stock = make_gpt2()
    for layer in stock.transformer.h:
        torch.nn.init.zeros_(layer.attn.c_attn.bias)
    stock.save_pretrained(folder)
    residuals = get_block(
        odeify(folder, basis="chebyshev", num_basis=2, progress=False)
    ).fit_residuals
    assert residuals["attn.c_attn.bias"] == 0.0 and residuals["attn.c_proj.bias"] > 0.1


def test_streaming_shows_its_progress_only_when_asked(make_gpt2, tmp_path, capsys):
    folder = tmp_path / "stock"
    make_gpt2().save_pretrained(folder)
    capsys.readouterr()
    odeify(folder, progress=False)
    assert capsys.readouterr().err == ""
    odeify(folder, progress=True)
    err = capsys.readouterr().err
    # A bar over the 12 parameters, not left behind: no line of it stays.
    assert "converting:   0%|          | 0/12" in err and "\n" not in err
