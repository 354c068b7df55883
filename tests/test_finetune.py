"""recipes/finetune.py on tiny models: every form and method runs and reports, runs resume
exactly, step-adjusted training draws its step counts, and bad input fails before training."""

import json

import pytest
import torch
from _launch import RECIPES, argv, fork, interrupted_at, join, recipe, records

import odeify
from odeify.assets import gpt2_tokenizer, play_text
from odeify.train.sampler import StepSampler

finetune = recipe("finetune")

PLAYS = ("hamlet", "macbeth", "the-tempest", "othello")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A corpus of four play excerpts and a tiny Llama (3 layers) saved plain and odeified."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("finetune")
    corpus = root / "corpus"
    corpus.mkdir()
    for play in PLAYS:
        (corpus / f"{play}.txt").write_text(play_text(play)[:6000])
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "plain")
    tokenizer.save_pretrained(root / "plain")
    odeify.save_pretrained(odeify.odeify(model, progress=False), root / "ode", tokenizer=tokenizer)
    return root


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The summary of a one-step continuous LoRA run: what the model scores before training."""
    folder = tmp_path_factory.mktemp("reference")
    return _run(_config(assets, folder, max_steps=1))


def _run(settings: dict, resume: bool = False) -> dict:
    return finetune.main([*argv(settings), *(["--resume"] if resume else [])])


def _config(assets, tmp_path, **overrides) -> dict:
    settings = dict(
        model=str(assets / "ode"),
        corpus=str(assets / "corpus"),
        heldout=["othello", "the-tempest"],
        token_cache=str(assets / "tokens"),
        seq_len=32,
        batch_size=2,
        max_steps=4,
        warmup_steps=1,
        lr=1e-2,
        lora_r=2,
        eval_steps=[2, 3, 5],
        eval_windows=4,
        save_every=2,
        out_dir=str(tmp_path / "run"),
        progress=False,
    )
    settings.update(overrides)
    return settings


def test_continuous_lora_trains_saves_the_adapter_and_reports(assets, tmp_path):
    summary = _run(_config(assets, tmp_path))
    out = tmp_path / "run"
    for name in ("adapter/adapter_model.safetensors", "metrics.jsonl", "perplexity.png"):
        assert (out / name).exists(), name
    assert json.loads((out / "summary.json").read_text()) == summary
    # r (in + out) per basis tensor, K = 3, seven matrices: q 32x32, k/v 16x32, o 32x32, MLP 48x32
    per_k = 2 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 48) * 3)
    assert summary["trainable_parameters"] == 3 * per_k
    assert summary["adapter_bytes"] < 4 * 3 * per_k + 20_000
    assert summary["perplexity_after"]["3"] < summary["perplexity_before"]["3"]
    assert set(summary["perplexity_after"]) == {"2", "3", "5"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [1, 2, 3, 4]
    assert [r["event"] for r in records if "event" in r] == ["before", "after"]


@pytest.mark.parametrize(
    "form, method, extra",
    [
        ("discrete", "lora", {"materialize_steps": 3}),
        ("discrete", "full", {"materialize_steps": 2}),
        ("continuous", "full", {}),
        ("original", "lora", {"model_folder": "plain"}),
    ],
)
def test_every_form_and_method_runs_and_starts_from_the_same_model(
    assets, tmp_path, reference, form, method, extra
):
    folder = extra.pop("model_folder", "ode")
    cfg = _config(
        assets, tmp_path, model=str(assets / folder), form=form, method=method, max_steps=2, **extra
    )
    summary = _run(cfg)
    assert (tmp_path / "run" / ("adapter" if method == "lora" else "model")).is_dir()
    assert summary["perplexity_after"]["3"] < summary["perplexity_before"]["3"]
    # A converted model is exact at its own depth: every form starts where the original does.
    if cfg["form"] != "discrete" or cfg.get("materialize_steps") == 3:
        assert summary["perplexity_before"]["3"] == pytest.approx(
            reference["perplexity_before"]["3"], rel=1e-5
        )
    if method == "full":
        assert summary["trainable_parameters"] == summary["total_parameters"]
        if form == "discrete":  # the materialised 2-layer model, saved as a stock model
            saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
            assert saved["num_hidden_layers"] == 2 and "odeify" not in saved


def test_a_resumed_run_equals_an_unbroken_one(assets, tmp_path):
    unbroken = _run(_config(assets, tmp_path, out_dir=str(tmp_path / "a")))
    cfg = _config(assets, tmp_path, out_dir=str(tmp_path / "b"))
    with interrupted_at(2):
        _run(cfg)
    resumed = _run(cfg, resume=True)
    assert resumed["perplexity_after"] == unbroken["perplexity_after"]

    def losses(folder):
        lines = (tmp_path / folder / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line).get("loss") for line in lines]

    assert losses("a") == losses("b")


def test_step_adjusted_training_draws_its_step_counts_per_batch(assets, tmp_path):
    cfg = _config(assets, tmp_path, train_steps=[2, 5], max_steps=6)
    _run(cfg)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    drawn = [json.loads(line)["steps"] for line in lines if '"step"' in line]
    assert set(drawn) == {2, 5}
    sampler = StepSampler(3, 2, 5, weighting="uniform", full_every=0, choices=(2, 5))
    assert drawn == [sampler.draw(step)[0] for step in range(6)]  # a function of (seed, step)


def test_bad_input_fails_before_training(assets, tmp_path):
    with pytest.raises(ValueError, match="'qproj' matches no weight matrix.*'self_attn.q_proj'"):
        _run(_config(assets, tmp_path, lora_targets=["qproj"]))
    with pytest.raises(ValueError, match="r=64 is larger than the 32x32 weight"):
        _run(_config(assets, tmp_path, lora_r=64, out_dir=str(tmp_path / "r")))
    with pytest.raises(ValueError, match=r"held-out documents \['lear'\] are not in corpus"):
        _run(_config(assets, tmp_path, heldout=["lear"], out_dir=str(tmp_path / "h")))
    with pytest.raises(ValueError, match="train_steps needs form: continuous"):
        _run(_config(assets, tmp_path, form="discrete", train_steps=[2]))
    with pytest.raises(ValueError, match="form: original trains a model without conversion"):
        _run(_config(assets, tmp_path, form="original", out_dir=str(tmp_path / "o")))

    _run(_config(assets, tmp_path, max_steps=1, out_dir=str(tmp_path / "first")))
    with pytest.raises(ValueError, match="another base model"):
        _run(
            _config(
                assets,
                tmp_path,
                model=str(assets / "plain"),
                num_basis=2,  # K = 2 basis tensors; the adapter was trained with K = 3
                init_adapter=str(tmp_path / "first" / "adapter"),
                out_dir=str(tmp_path / "other"),
            )
        )
    with pytest.raises(FileExistsError, match="already holds a run"):
        _run(_config(assets, tmp_path, max_steps=1, out_dir=str(tmp_path / "first")))
    with pytest.raises(ValueError, match="another config"):
        _run(_config(assets, tmp_path, max_steps=2, out_dir=str(tmp_path / "first")), resume=True)


def test_two_gloo_processes_match_one(assets, tmp_path):
    """Each rank trains on its half of every batch and scores half of the windows."""
    settings = _config(assets, tmp_path, max_steps=2, out_dir=str(tmp_path / "one"))
    one = _run(settings)
    join(fork(finetune.main, argv({**settings, "out_dir": str(tmp_path / "two")}), world=2))
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for n, value in one["perplexity_after"].items():
        assert two["perplexity_after"][n] == pytest.approx(value, rel=1e-5)
    losses = [[r["loss"] for r in records(tmp_path / run) if "loss" in r] for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").exists()


def test_gradient_accumulation_equals_the_whole_batch_at_once(assets, tmp_path):
    """grad_accum = 2 trains on each step's batch in two halves: the run of grad_accum = 1."""
    settings = _config(assets, tmp_path, batch_size=4, max_steps=2)
    one = _run({**settings, "out_dir": str(tmp_path / "one")})
    two = _run({**settings, "grad_accum": 2, "out_dir": str(tmp_path / "two")})
    losses = [[r["loss"] for r in records(tmp_path / run) if "loss" in r] for run in ("one", "two")]
    assert len(losses[0]) == 2
    # The same sums in another order (two half-batch means, then their mean): float32 rounding.
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for n, value in one["perplexity_after"].items():
        assert two["perplexity_after"][n] == pytest.approx(value, rel=1e-5)
    assert one["perplexity_after"] != pytest.approx(one["perplexity_before"], rel=1e-3)


@pytest.mark.parametrize(
    "path",
    sorted(RECIPES.joinpath("configs").glob("*-smollm2-shakespeare.yaml")),
    ids=lambda p: p.name,
)
def test_shipped_configs_are_valid(path):
    assert finetune.main(["--config", str(path), "--check"]).out_dir
