"""Depth adaptation (recipes/adapt_depth.py) on tiny models: the sampler, the recipe end to end
with resume, and bad input failing before any training. The library it trains with
(odeify.train.distill) is tested in tests/test_distill.py, the FLOP budget in tests/test_cost.py."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _launch import argv, fork, interrupted_at, join, records
from _launch import recipe as load_recipe

import odeify
from odeify.assets import gpt2_tokenizer, play_text
from odeify.train.cost import CostModel
from odeify.train.sampler import StepSampler

recipe = load_recipe("adapt_depth")

PLAYS = ("hamlet", "macbeth", "othello")


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ the library
def test_sampler_draws_are_a_pure_function_of_seed_and_step():
    sampler = StepSampler(num_layers=12, low=4, high=24, draws=2, full_every=3, seed=1)
    for step in range(30):
        counts = sampler.draw(step)
        assert counts == sampler.draw(step)
        anchor = step % 3 == 0
        assert len(counts) == 2 + anchor and (counts[0] == 12 or not anchor)
        assert all(4 <= n <= 24 for n in counts)
    other = StepSampler(num_layers=12, low=4, high=24, draws=2, full_every=3, seed=2)
    assert [sampler.draw(s) for s in range(30)] != [other.draw(s) for s in range(30)]
    # Known values: a run resumed by a later odeify must draw what the unbroken run drew, so
    # the random stream (seed, 6, step) is part of the format of every recorded run.
    drawn = [sampler.draw(s) for s in range(6)]
    assert drawn == [[12, 5, 21], [10, 16], [18, 10], [12, 8, 19], [7, 16], [12, 6]]


def test_inverse_weighting_spends_equal_compute_per_step_count():
    inverse = StepSampler(num_layers=10, low=5, high=40, full_every=0)
    values, probs = inverse.support()
    np.testing.assert_allclose(probs * values, (probs * values)[0])  # P(N) N is constant
    drawn = np.array([inverse.draw(s)[0] for s in range(2000)])
    uniform = StepSampler(num_layers=10, low=5, high=40, full_every=0, weighting="uniform")
    assert drawn.mean() < np.mean([uniform.draw(s)[0] for s in range(2000)]) - 5


def test_sampler_support_and_edge_ranges():
    values, probs = StepSampler(num_layers=4, low=2, high=4).support()
    assert values.tolist() == [2, 3, 4]
    np.testing.assert_allclose(probs, [6 / 13, 4 / 13, 3 / 13], rtol=1e-15)  # 1 / N, normalised
    _, probs = StepSampler(num_layers=4, low=2, high=4, weighting="uniform").support()
    np.testing.assert_allclose(probs, [1 / 3] * 3, rtol=1e-15)
    values, probs = StepSampler(num_layers=4, low=2, high=4, choices=(8, 2, 8)).support()
    assert values.tolist() == [2, 8]
    np.testing.assert_allclose(probs, [0.8, 0.2], rtol=1e-15)
    # A one-count range, N = 1 and no draws (N = L only) are all valid.
    assert StepSampler(num_layers=1, low=1, high=1).draw(0) == [1, 1]
    assert StepSampler(num_layers=6, low=3, high=3, full_every=0).draw(5) == [3]
    assert StepSampler(num_layers=6, low=2, high=12, draws=0).draw(5) == [6]
    # N = 1 is a step count like any other (the lowest a choice may be).
    assert StepSampler(num_layers=6, low=2, high=12, choices=(3, 1)).choices == (1, 3)


def test_sampler_draws_only_the_chosen_counts():
    sampler = StepSampler(num_layers=30, low=15, high=60, draws=3, choices=(60, 15, 20), seed=3)
    drawn = [n for s in range(200) for n in sampler.draw(s)[1:]]
    assert set(drawn) == {15, 20, 60} and sampler.choices == (15, 20, 60)
    assert drawn.count(15) > drawn.count(60)  # inverse weighting: equal compute per count


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(low=9, high=4), "the step range is empty: low = 9 > high = 4"),
        (dict(choices=(4, 0)), "choices must be step counts >= 1, got [4, 0]"),
        (dict(choices=(2.5,)), "choices must be step counts >= 1, got [2.5]"),
        (dict(choices=(True,)), "choices must be step counts >= 1, got [True]"),
        (dict(low=0), "low must be an integer >= 1, got 0"),
        (dict(high=True), "high must be an integer >= 1, got True"),
        (dict(weighting="log"), "weighting must be one of ('inverse', 'uniform'), got 'log'"),
        (dict(draws=0, full_every=0), "draws = 0 and full_every = 0 train at no step count at all"),
        (dict(draws=-1), "draws and full_every must be >= 0, got -1 and 1"),
    ],
)
def test_sampler_refuses_bad_input(kwargs, match):
    settings = dict(num_layers=6, low=2, high=12) | kwargs
    with pytest.raises(ValueError, match=f"^{re.escape(match)}$"):
        StepSampler(**settings)


# ------------------------------------------------------------------------------- the recipe
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Three play excerpts and a tiny stock Llama (4 layers) with the GPT-2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapt")
    corpus = root / "corpus"
    corpus.mkdir()
    for play in PLAYS:
        (corpus / f"{play}.txt").write_text(play_text(play)[:5000])
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a fresh init has near-identical layers: give depth something to do
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.3 / p.shape[-1] ** 0.5)
    model.save_pretrained(root / "plain")
    tokenizer.save_pretrained(root / "plain")
    odeify.save_pretrained(odeify.odeify(model, progress=False), root / "ode", tokenizer=tokenizer)
    return root


def _config(assets, out, **overrides):
    settings = dict(
        model=str(assets / "plain"),
        corpus=str(assets / "corpus"),
        heldout=["othello"],
        token_cache=str(assets / "tokens"),
        seq_len=32,
        batch_size=2,
        max_steps=4,
        warmup_steps=1,
        lr=3e-3,
        hidden=1.0,
        lm=0.1,
        eval_steps=[2, 4, 8],
        curve_steps=[2, 4],
        eval_every=2,
        eval_windows=3,
        curve_windows=2,
        save_every=2,
        out_dir=str(out),
        progress=False,
        threads=1,
    )
    settings.update(overrides)
    return settings


def _run(settings: dict, resume: bool = False) -> dict:
    return recipe.main([*argv(settings), *(["--resume"] if resume else [])])


def _compare(runs: list[str], out: str, names: list[str] | None = None) -> str:
    return recipe.main(["--compare", *runs, "--out", out, *(["--names", *names] if names else [])])


@pytest.fixture(scope="module")
def adapted(assets, tmp_path_factory):
    """A finished four-step adaptation run: (results, run folder)."""
    out = tmp_path_factory.mktemp("adapted") / "run"
    return _run(_config(assets, out)), out


def test_recipe_adapts_reports_and_saves(adapted):
    results, out = adapted
    for name in ("metrics.jsonl", "report.md", "perplexity.png", "perplexity_flops.png"):
        assert (out / name).exists(), name
    assert json.loads((out / "results.json").read_text()) == results
    assert set(results["after"]) == {"2", "4", "8"} and results["layers"] == 4
    assert results["before"]["4"]["kl"] < 1e-10  # the converted model is the original at N = L
    assert results["after"]["2"]["kl"] < results["before"]["2"]["kl"]
    assert results["materialize_check"]["max_abs_logit_diff"] < 1e-4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["parts"][0]["steps"] == 4 for r in steps)  # N = L anchors every step
    assert steps[-1]["flops"] == pytest.approx(results["train_flops"])
    events = [(r["event"], r.get("step")) for r in records if "event" in r]
    assert events == [("before", None), ("curve", 2), ("curve", 4), ("after", None)]
    assert "| 8 |" in (out / "report.md").read_text()


@pytest.mark.parametrize("m", [1, 3, 7])
def test_the_adapted_model_materialises_at_any_depth(adapted, m):
    model = odeify.from_pretrained(adapted[1] / "model").eval()
    plain = odeify.materialize(model, steps=m)
    assert plain.config.num_hidden_layers == m and type(plain).__name__ == "LlamaForCausalLM"
    ids = torch.randint(1, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(ids, use_cache=False).logits,
            model(ids, use_cache=False, ode_steps=m).logits,
            rtol=0,
            atol=1e-4,
        )


@pytest.mark.parametrize("train", ["full", "lora"])
def test_resume_continues_exactly(assets, adapted, tmp_path, train):
    overrides = dict(train="lora", lora_r=2) if train == "lora" else {}
    cfg = _config(assets, tmp_path / "run", **overrides)
    with interrupted_at(2):
        _run(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        _run(cfg)
    resumed = _run(cfg, resume=True)
    unbroken, out = adapted
    if train == "lora":
        out = tmp_path / "unbroken"
        unbroken = _run(_config(assets, out, **overrides))
    assert resumed["after"] == unbroken["after"]
    assert resumed["train_flops"] == unbroken["train_flops"]

    def losses(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["parts"] for x in lines if '"parts"' in x]

    assert losses(tmp_path / "run") == losses(out)
    with pytest.raises(ValueError, match="another config.*lr"):
        _run(_config(assets, tmp_path / "run", lr=1e-3), resume=True)


def test_baseline_gets_the_same_budget_and_compare_tabulates(assets, adapted, tmp_path):
    results, out = adapted
    budget = results["train_flops"]
    drop = _run(
        _config(
            assets,
            tmp_path / "drop",
            mode="drop",
            keep_layers=2,
            max_steps=None,
            budget_flops=budget,
            eval_steps=None,
            curve_steps=None,
        )
    )
    assert drop["student_layers"] == 2 and set(drop["after"]) == {"2"}
    cost = CostModel(**drop["cost_model"])
    assert drop["train_flops"] <= budget < drop["train_flops"] + cost.train_step(64, [2])
    assert drop["optimizer_steps"] > results["optimizer_steps"]  # cheaper steps, more of them
    table = _compare([str(out), str(tmp_path / "drop")], str(tmp_path / "cmp"))
    assert "(a) layer dropping to M = 2" in table and "depth adaptation" in table
    plots = ("perplexity.png", "perplexity_flops.png", "perplexity_after.png")
    for name in ("report.md", *plots, "perplexity_budget.png"):
        assert (tmp_path / "cmp" / name).exists(), name
    named = _compare([str(out), str(tmp_path / "drop")], str(tmp_path / "named"), ["C", "a"])
    assert "| C | 4 |" in named and "| a | 2 |" in named  # short names in the rows
    assert "- a: (a) layer dropping to M = 2" in named  # and what each stands for
    with pytest.raises(ValueError, match="2 names for 1 runs"):
        _compare([str(out)], str(tmp_path / "bad"), ["C", "a"])
    again = _compare([str(out), str(out)], str(tmp_path / "twice"))  # same label twice
    assert f"every 1), {results['train_flops'] / 1e15:.2g} PFLOP | 4 |" in again


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(mode="drop"), ValueError, "keep_layers"),
        (dict(keep_layers=2), ValueError, "set mode: drop"),
        (dict(budget_flops=1e9), ValueError, "exactly one of max_steps and budget_flops"),
        (dict(budget_flops="lots", max_steps=None), ValueError, "budget_flops takes a number"),
        (dict(low=8, high=2), ValueError, "step range is empty"),
        (dict(weighting="log"), ValueError, "weighting"),
        (dict(basis="spline"), ValueError, "basis must be"),
        (dict(kl=0.0, hidden=0.0, lm=0.0), ValueError, "not all zero"),
        (dict(autocast="fp8"), ValueError, "autocast"),
        (dict(eval_steps=[0]), ValueError, "eval_steps"),
        (dict(heldout=["lear"]), ValueError, "lear.*not in corpus"),
        (dict(heldout=list(PLAYS)), ValueError, "every document is held out"),
        (dict(mode="drop", keep_layers=9), ValueError, "exceeds the depth"),
        (dict(train="qlora"), ValueError, "train must be one of"),
        (dict(train="lora", lora_r=0), ValueError, "lora_r must be"),
        (dict(discrete_ends=-1), ValueError, "discrete_ends must be >= 0"),
        (dict(mode="drop", keep_layers=2, discrete_ends=1), ValueError, "mode: ode"),
        (dict(discrete_ends=1, low=2, high=8), ValueError, "can draw 2; raise low"),
        (dict(discrete_ends=1, low=3, high=8), ValueError, "eval_steps / curve_steps ask for 2"),
        (dict(choices=[2, 8], low=2), ValueError, "not both"),
        (dict(choices=[0]), ValueError, "choices must be integers"),
        (dict(model="/no/such/model"), FileNotFoundError, "neither 'smollm2' nor a folder"),
    ],
)
def test_bad_input_fails_before_training(assets, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        _run(_config(assets, tmp_path / "run", **overrides))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_odeified_model_and_unknown_keys_are_refused(assets, tmp_path):
    with pytest.raises(ValueError, match="odeified model.*stock model"):
        _run(_config(assets, tmp_path / "run", model=str(assets / "ode")))
    with pytest.raises(ValueError, match="unknown config keys \\['stepz'\\]"):
        recipe.main(["--set", "stepz=3"])


def test_lora_adaptation_trains_only_adapters_and_saves_the_merged_model(assets, tmp_path):
    out = tmp_path / "lora"
    results = _run(_config(assets, out, train="lora", lora_r=2, lr=1e-2, choices=[2], max_steps=10))
    from transformers import LlamaForCausalLM

    stock = odeify.odeify(LlamaForCausalLM.from_pretrained(assets / "plain"), progress=False)
    block = odeify.get_block(stock)
    full = sum(block.basis_tensor(n).numel() for n in block.names)
    assert 0 < results["trainable_parameters"] < full / 4 and results["train"] == "lora"
    assert results["cost_model"]["train_factor"] == 2.0  # frozen weights: no weight gradients
    assert results["after"]["2"]["kl"] < results["before"]["2"]["kl"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged = odeify.from_pretrained(out / "model").eval()  # a plain odeified model, LoRA merged
    moved = odeify.get_block(merged)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert any(not torch.equal(moved.basis_tensor(n), block.basis_tensor(n)) for n in block.names)
    assert results["materialize_check"]["max_abs_logit_diff"] < 1e-4


def test_discrete_ends_adaptation_keeps_the_end_layers_discrete(assets, tmp_path):
    out = tmp_path / "ends"
    settings = dict(discrete_ends=1, choices=[3], eval_steps=[3, 4, 8], curve_steps=[3])
    results = _run(_config(assets, out, lr=1e-3, max_steps=8, **settings))
    assert results["discrete_ends"] == 1 and "1 discrete at each end" in results["label"]
    assert results["before"]["4"]["kl"] < 1e-10  # still the original at N = L
    assert results["after"]["3"]["kl"] < results["before"]["3"]["kl"]
    model = odeify.from_pretrained(out / "model").eval()
    assert odeify.get_block(model).ode.discrete_ends == 1
    assert results["materialize_check"]["max_abs_logit_diff"] < 1e-4


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parents[1] / "recipes" / "configs").glob("adapt-*.yaml")),
    ids=str,
)
def test_shipped_configs_are_valid(path):
    assert recipe.main(["--config", str(path), "--check"]).out_dir


def test_two_gloo_processes_match_one(assets, adapted, tmp_path):
    """Each rank distils on its half of every batch and scores its share of the windows."""
    results, out = adapted
    join(fork(recipe.main, argv(_config(assets, tmp_path / "two")), world=2))
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    for n, value in results["after"].items():
        assert two["after"][n]["perplexity"] == pytest.approx(value["perplexity"], rel=1e-4)
    parts = [[r["parts"] for r in records(run) if "parts" in r] for run in (out, tmp_path / "two")]
    for ours, reference in zip(parts[1], parts[0], strict=True):
        for mine, theirs in zip(ours, reference, strict=True):
            assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-7)
