"""recipes/pretrain.py on tiny configs: end to end, two gloo processes (DDP, FSDP2) against one,
SIGKILL and resume against an unbroken run, and the errors raised before any work.

Runs that need their own process are forked from this one (see tests/_launch.py).
"""

import copy
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from _launch import RECIPES, argv, fork, join, recipe, records
from transformers import AutoModelForCausalLM, AutoTokenizer

import odeify
from odeify.train import data, shards

pretrain = recipe("pretrain")

TINY = {
    "corpus": "shakespeare:hamlet,macbeth,othello",
    "heldout": ["macbeth"],
    "tokenizer": "char",
    "d_model": 32,
    "n_layer": 2,
    "n_head": 2,
    "context": 64,
    "seq_len": 32,
    "batch_size": 4,
    "max_steps": 8,
    "warmup_steps": 1,
    "lr": 0.003,
    "time_directions": 3,
    "time_features": 8,
    "time_hidden": 8,
    "eval_every": 4,
    "eval_windows": 4,
    "eval_batch_size": 2,
    "final_windows": 8,
    "save_every": 4,
    "progress": False,
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A token cache filled once here, so forked runs only read it."""
    folder = tmp_path_factory.mktemp("tokens")
    docs = data.Documents(TINY["corpus"])
    split = data.Split(docs.names(), TINY["heldout"])
    tokenizer = data.load_tokenizer(TINY["tokenizer"], docs)
    for part in (split.train, split.held):
        shards.cached(docs, tokenizer, part, folder, progress=False)
    return folder


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fork(config: dict, world: int = 1, resume: bool = False) -> list:
    return fork(pretrain.main, [*argv(config), *(["--resume"] if resume else [])], world)


def _records(out: Path, event: str) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r for r in records if r["event"] == event}


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache):
    """The reference: one process, the whole global batch."""
    out = tmp_path_factory.mktemp("single")
    join(_fork({**TINY, "token_cache": str(cache), "out_dir": str(out)}))
    return out


def test_end_to_end_trains_evaluates_exports_and_retargets(tmp_path, cache, one_thread, capsys):
    config = {**TINY, "token_cache": str(cache), "out_dir": str(tmp_path / "run")}
    config.update(max_steps=12, step_augmentation=[1, 4], lr=0.01)
    summary = pretrain.main(argv(config))
    printed = capsys.readouterr().out
    assert "diffeqformer:" in printed and "baseline:" in printed and "perplexity" in printed

    params = summary["parameters"]
    assert params["diffeqformer"]["total"] > params["baseline"]["total"]
    train = _records(tmp_path / "run", "train")
    assert sorted(train) == list(range(1, 13))
    assert {r["solver_steps"] for r in train.values()} <= {1, 2, 3, 4}
    assert len({r["solver_steps"] for r in train.values()}) > 1  # augmentation draws
    assert train[12]["loss"] < train[1]["loss"] - 0.5
    evals = _records(tmp_path / "run", "eval")
    assert sorted(evals) == [4, 8, 12] and sorted(evals[12]["val_ppl"]) == ["1", "2", "4"]
    assert set(summary["final"]["perplexity"]) == {"1", "2", "4"}
    assert summary["tokens_per_s"] > 0 and summary["peak_memory_mib"] > 0
    assert (tmp_path / "run" / "ppl_vs_steps.png").stat().st_size > 0
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-12.pt", "step-8.pt"]  # keep-last-2, no temporary files

    model = odeify.from_pretrained(tmp_path / "run" / "model")
    block = odeify.get_block(model)
    assert (block.ode.scheme, block.ode.basis, block.ode.num_basis) == ("euler", "fourier", 4)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    ids = tokenizer("To be", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 5)
        assert tokenizer.decode(out[0]).startswith("To be")
        with odeify.steps(model, 4):
            logits = model(ids).logits
        # The exported model's 4-step grid, against the same grid in float64.
        wide = copy.deepcopy(model).double()
        torch.testing.assert_close(logits, wide(ids, ode_steps=4).logits.float(), rtol=0, atol=1e-4)
    plain = odeify.materialize(model, steps=3)
    assert plain.config.num_hidden_layers == 3


def test_baseline_is_the_same_config_without_odeify(tmp_path, cache, one_thread):
    config = {**TINY, "token_cache": str(cache), "out_dir": str(tmp_path), "ode": False}
    summary = pretrain.main(argv({**config, "max_steps": 2}))
    assert set(summary["final"]["perplexity"]) == {"2"}  # a fixed depth, L
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2
    total = sum(p.numel() for p in model.parameters())
    assert total == summary["parameters"]["baseline"]["total"]


@pytest.mark.parametrize(
    "world,mode,accum", [(2, "ddp", 1), (2, "fsdp", 1), (2, "ddp", 2), (1, "ddp", 2)]
)
def test_gloo_processes_and_accumulation_match_one_process(
    tmp_path, cache, single, world, mode, accum
):
    config = {**TINY, "token_cache": str(cache), "out_dir": str(tmp_path)}
    config.update(distributed=mode, grad_accum=accum)
    join(_fork(config, world=world))
    ours, reference = _records(tmp_path, "train"), _records(single, "train")
    assert sorted(ours) == sorted(reference) == list(range(1, 9))
    for step in reference:
        assert ours[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5, abs=1e-6)
    final, expected = _records(tmp_path, "final")[8], _records(single, "final")[8]
    for n, loss in expected["final"]["val_loss"].items():
        assert final["final"]["val_loss"][n] == pytest.approx(loss, rel=1e-5)
    # The checkpoint of the sharded run holds the full model: it resumes a single process.
    state = torch.load(tmp_path / "checkpoints" / "step-8.pt", weights_only=False)
    assert not any(hasattr(t, "device_mesh") for t in state["model"].values())


def test_sigkill_then_resume_reaches_the_unbroken_curve(tmp_path, cache, single):
    config = {**TINY, "token_cache": str(cache), "out_dir": str(tmp_path), "save_every": 2}
    (proc,) = _fork(config)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.is_alive():
        if metrics.exists() and any('"step": 5,' in line for line in metrics.open()):
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL and not (tmp_path / "summary.json").exists()
    killed_at = max(_records(tmp_path, "train"))
    assert 5 <= killed_at < 8

    join(_fork(config, resume=True))
    ours, reference = _records(tmp_path, "train"), _records(single, "train")
    assert sorted(ours) == list(range(1, 9))
    assert [ours[s]["loss"] for s in ours] == [reference[s]["loss"] for s in ours]
    assert ours[8]["tokens"] == reference[8]["tokens"]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"batchsize": 8}, ValueError, "unknown config keys \\['batchsize'\\]"),
        ({"corpus": "/no/such/corpus"}, FileNotFoundError, "/no/such/corpus"),
        ({"heldout": ["nonesuch"]}, ValueError, "held-out documents \\['nonesuch'\\]"),
        ({"seq_len": 65}, ValueError, "seq_len 65 does not fit the model's context of 64"),
        ({"batch_size": 3, "grad_accum": 2}, ValueError, "batch_size 3 does not split"),
        ({"step_augmentation": [4, 2]}, ValueError, "step_augmentation must be"),
        ({"ode": False, "step_augmentation": [1, 2]}, ValueError, "needs ode: true"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, change, error, match):
    cache = tmp_path / "cache"
    config = {**TINY, **change, "token_cache": str(cache), "out_dir": str(tmp_path / "run")}
    with pytest.raises(error, match=match):
        pretrain.main(argv(config))
    assert _files(tmp_path) == []  # nothing tokenised, nothing written


def test_a_run_folder_is_resumed_only_under_its_own_config(tmp_path, cache, single):
    config = {**TINY, "token_cache": str(cache), "out_dir": str(single)}
    before = _files(single)
    with pytest.raises(FileExistsError, match="pass --resume"):
        pretrain.main(argv(config))
    with pytest.raises(ValueError, match="another config \\(differs in \\['lr'\\]\\)"):
        pretrain.main([*argv({**config, "lr": 0.1}), "--resume"])
    assert _files(single) == before


@pytest.mark.parametrize("ode", [True, False])
def test_activation_checkpointing_gives_the_same_gradients(tmp_path, cache, ode, one_thread):
    # Equal gradient norms at step 1 and equal losses after the update: the same gradients.
    config = {**TINY, "token_cache": str(cache), "ode": ode, "max_steps": 2, "export": False}
    config.update(eval_every=100, final_windows=2)
    runs = []
    for remat in (False, True):
        out = tmp_path / str(remat)
        pretrain.main(argv({**config, "activation_checkpointing": remat, "out_dir": str(out)}))
        runs.append(_records(out, "train"))
    plain, remat = runs
    assert remat[1]["grad_norm"] == pytest.approx(plain[1]["grad_norm"], rel=1e-6)
    assert remat[2]["loss"] == pytest.approx(plain[2]["loss"], rel=1e-6)


def test_bf16_autocast(tmp_path, cache, one_thread, capsys):
    config = {**TINY, "token_cache": str(cache), "precision": "bf16", "max_steps": 2}
    base = {**config, "ode": False, "out_dir": str(tmp_path / "base"), "export": False}
    summary = pretrain.main(argv(base))
    assert "cpu, bf16" in capsys.readouterr().out
    # Two steps under bf16 autocast end where two float32 steps do, to bf16's 3 digits.
    fp32 = pretrain.main(argv({**base, "precision": "fp32", "out_dir": str(tmp_path / "fp32")}))
    for k, loss in summary["final"]["val_loss"].items():
        assert loss == pytest.approx(fp32["final"]["val_loss"][k], abs=0.05)
    with pytest.raises(ValueError, match="bf16 on CPU is not supported for the ODE model"):
        pretrain.main(argv({**config, "out_dir": str(tmp_path / "ode")}))
    assert not (tmp_path / "ode").exists()


def test_llama_family(tmp_path, cache, one_thread):
    config = {**TINY, "token_cache": str(cache), "out_dir": str(tmp_path), "family": "llama"}
    summary = pretrain.main(argv({**config, "max_steps": 2, "n_kv_head": 1}))
    model = odeify.from_pretrained(tmp_path / "model")
    assert type(model).__name__ == "OdeifyLlamaForCausalLM"
    assert model.config.num_key_value_heads == 1 and not model.config.tie_word_embeddings
    assert sorted(odeify.get_block(model).time_basis) == [
        "down",
        "gate",
        "k",
        "norm_attn",
        "norm_mlp",
        "o",
        "q",
        "up",
        "v",
    ]
    # Two steps from a near-uniform start: the loss of a uniform guess, ln V, to within 0.5.
    for k, loss in summary["final"]["val_loss"].items():
        assert abs(loss - math.log(model.config.vocab_size)) < 0.5
        assert summary["final"]["perplexity"][k] == pytest.approx(math.exp(loss), rel=1e-12)


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(RECIPES.joinpath("configs").glob("*.yaml")) if "smollm2" not in p.name],
    ids=lambda p: p.name,
)
def test_shipped_configs_are_valid(path):
    assert pretrain.main(["--config", str(path), "--check"]).out_dir


def test_a_finished_run_resumes_to_its_summary_and_a_moved_one_resumes(tmp_path, cache, single):
    moved = tmp_path / "moved"
    shutil.copytree(single, moved)
    config = {**TINY, "token_cache": str(cache), "out_dir": str(moved)}
    summary = (moved / "summary.json").read_text()
    metrics = (moved / "metrics.jsonl").read_text()
    assert pretrain.main([*argv(config), "--resume"]) == json.loads(summary)
    assert (moved / "summary.json").read_text() == summary  # tokens_per_s kept, not null
    assert (moved / "metrics.jsonl").read_text() == metrics  # no second "final" record
    (moved / "summary.json").unlink()  # killed before the end: the copy resumes and finishes
    resumed = pretrain.main([*argv(config), "--resume"])
    expected = json.loads(summary)["final"]["perplexity"]
    assert resumed["final"]["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert len([r for r in records(moved) if r.get("event") == "final"]) == 1
