"""Shared recipe machinery: configs, AdamW groups, schedule, checkpoints that resume exactly."""

import dataclasses

import pytest
import torch

from odeify import get_block, odeify
from odeify.train.checkpoints import Checkpoints
from odeify.train.config import load_config
from odeify.train.metrics import Metrics
from odeify.train.optim import adamw, warmup_cosine


@dataclasses.dataclass
class _Config:
    lr: float = 1e-3
    steps: int = 10


def test_config_from_yaml_with_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\n")
    assert load_config(_Config, path, {"steps": 3}) == _Config(lr=0.01, steps=3)
    path.write_text("lr: 0.01\nbatchsize: 4\n")
    with pytest.raises(ValueError, match="unknown config keys \\['batchsize'\\]"):
        load_config(_Config, path)
    with pytest.raises(FileNotFoundError):
        load_config(_Config, tmp_path / "missing.yaml")


def test_float_keys_take_yaml_exponents_and_ints(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-4\n")  # YAML 1.1 reads this as the string '3e-4'
    assert load_config(_Config, path).lr == 3e-4
    assert load_config(_Config, None, {"lr": 1}).lr == 1.0
    with pytest.raises(ValueError, match="'lr' takes a number, got 'fast'"):
        load_config(_Config, None, {"lr": "fast"})


def test_adamw_decays_matrices_but_not_norms_biases_or_their_bases(make_llama):
    model = odeify(make_llama(attention_bias=True), progress=False)
    optimizer = adamw(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    block = get_block(model)
    assert id(block.basis_tensor("self_attn.q_proj.weight")) in decayed
    assert id(block.basis_tensor("self_attn.q_proj.bias")) not in decayed
    assert id(block.basis_tensor("input_layernorm.weight")) not in decayed


def test_warmup_then_cosine():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup=4, total=14, min_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert (
        lrs[9] == pytest.approx(0.55)
        and lrs[14] == pytest.approx(0.1)
        and lrs[15] == pytest.approx(0.1)
    )


def test_checkpoints_resume_model_optimizer_and_random_state(tmp_path):
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    ckpt = Checkpoints(tmp_path, {"lr": 0.1}, keep=2)
    for step in (1, 2, 3):
        model(torch.randn(2, 3)).sum().backward()
        optimizer.step()
        ckpt.save(step, model, optimizer, extra={"tokens": step * 10})
    assert [p.name for p in ckpt.paths()] == ["step-2.pt", "step-3.pt"]
    assert not list(tmp_path.glob("*.tmp"))
    expected_next = torch.rand(3)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = torch.nn.Linear(3, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    step, extra = Checkpoints(tmp_path, {"lr": 0.1}).resume(fresh, fresh_opt)
    assert (step, extra) == (3, {"tokens": 30})
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in state)
    assert torch.equal(torch.rand(3), expected_next)
    assert fresh_opt.state_dict()["state"][0]["step"] == 3


def test_resume_under_another_config_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    Checkpoints(tmp_path, {"lr": 0.1}).save(1, model, optimizer)
    with pytest.raises(ValueError, match="another config.*\\['lr'\\]"):
        Checkpoints(tmp_path, {"lr": 0.2}).resume(model, optimizer)
    assert Checkpoints(tmp_path / "new", {"lr": 0.2}).resume(model, optimizer) == (0, {})


def test_check_reads_the_stamp_without_loading(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert Checkpoints(tmp_path, {"lr": 0.1}).check() == 0
    Checkpoints(tmp_path, {"lr": 0.1}).save(7, model, optimizer)
    assert Checkpoints(tmp_path, {"lr": 0.1}).check() == 7
    with pytest.raises(ValueError, match="another config.*\\['lr'\\]"):
        Checkpoints(tmp_path, {"lr": 0.2}).check()


def test_metrics_file(tmp_path):
    metrics = Metrics(tmp_path / "m.jsonl")
    metrics.log(step=1, loss=2.5)
    metrics.log(step=2, loss=2.0)
    assert [r["loss"] for r in metrics.read()] == [2.5, 2.0]
    assert all(0 <= r["time"] < 600 for r in metrics.read())
    with metrics.path.open("ab") as f:
        f.write(b'[1, 2]\n"text"\n{"step": 3, "note": "\xff"}\n')  # not records; a bad byte
    assert [r["step"] for r in metrics.read()] == [1, 2, 3]
    assert metrics.read()[-1]["note"] == "\ufffd"
    Metrics(metrics.path, active=False).resume(1)  # only the first rank trims
    assert len(metrics.read()) == 3


def test_metrics_time_is_seconds_since_start_to_the_millisecond(tmp_path, monkeypatch):
    import types

    import odeify.train.metrics as module

    now = [1000.0]
    monkeypatch.setattr(module, "time", types.SimpleNamespace(time=lambda: now[0]))
    metrics = Metrics(tmp_path / "deep" / "er" / "m.jsonl")  # folders made at the first record
    now[0] = 1001.23456
    metrics.log(step=1)
    assert metrics.read()[0]["time"] == 1.235
    with metrics.path.open("a") as f:
        f.write('{"step": 2, "lo\n{"step": 3}\n')  # a torn line with records after it
    assert [r["step"] for r in metrics.read()] == [1, 3]


def test_metrics_resume_keeps_the_run_up_to_the_checkpoint_and_survives_a_torn_line(tmp_path):
    metrics = Metrics(tmp_path / "m.jsonl")
    metrics.log(event="before", perplexity=3.0)  # no step: belongs to the run from its start
    for step in (1, 2, 3):
        metrics.log(step=step, loss=1.0 / step)
    metrics.log(event="after", perplexity=2.0)
    metrics.log(event="final", step=2)  # an end event goes even at the checkpoint step
    with metrics.path.open("a") as f:
        f.write('{"step": 4, "lo')  # a kill in the middle of a write
    assert [r.get("step") for r in metrics.read()] == [None, 1, 2, 3, None, 2]
    metrics.resume(2)
    assert [(r.get("event"), r.get("step")) for r in metrics.read()] == [
        ("before", None),
        (None, 1),
        (None, 2),
    ]
    assert metrics.path.read_text().endswith("}\n")  # whole lines only
    metrics.resume(0)  # no checkpoint: the run starts over
    assert metrics.read() == []
    Metrics(tmp_path / "none.jsonl", active=False).log(step=1)
    assert not (tmp_path / "none.jsonl").exists()


def test_adamw_decays_lora_factors_under_the_basis(make_llama):
    from peft import get_peft_model

    from odeify import lora_config

    model = get_peft_model(odeify(make_llama(), progress=False), lora_config(r=2))
    optimizer = adamw(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    factors = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert factors and all(id(p) in decayed for p in factors)
    assert len(optimizer.param_groups) == 1  # the frozen basis is not in the optimizer at all


def test_trainable_only_checkpoints_leave_the_frozen_part_out(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ckpt = Checkpoints(tmp_path, {"lr": 0.1}, trainable_only=True)
    path = ckpt.save(1, model, optimizer)
    assert set(torch.load(path, weights_only=False)["model"]) == {"1.weight", "1.bias"}
    trained = model[1].weight.detach().clone()
    frozen = model[0].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.zero_()
    assert ckpt.resume(model, optimizer)[0] == 1
    assert torch.equal(model[1].weight, trained) and torch.equal(model[0].weight, frozen)
    model[0].requires_grad_(True)  # another set of trainable tensors: refused
    with pytest.raises(ValueError, match="other trainable tensors"):
        ckpt.resume(model, optimizer)


def test_adamw_groups_in_full():
    # Every parameter lands in exactly one group by the rule (matrices decay; vectors,
    # `no_decay` names and frozen parameters do not), with the optimizer's settings as given.
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    optimizer = adamw(model, lr=0.5, weight_decay=0.25, no_decay=lambda name: name == "2.weight")
    named = {id(p): n for n, p in model.named_parameters()}
    groups = [
        ([named[id(p)] for p in g["params"]], g["weight_decay"], g["lr"], g["betas"])
        for g in optimizer.param_groups
    ]
    assert groups == [
        (["0.weight"], 0.25, 0.5, (0.9, 0.95)),
        (["0.bias", "1.weight", "1.bias", "2.weight"], 0.0, 0.5, (0.9, 0.95)),
    ]
    # No parameter to leave undecayed: the empty group is dropped, betas passed through.
    only = adamw(torch.nn.Linear(2, 2, bias=False), lr=1.0, weight_decay=0.5, betas=(0.5, 0.6))
    assert [(len(g["params"]), g["weight_decay"], g["betas"]) for g in only.param_groups] == [
        (1, 0.5, (0.5, 0.6))
    ]


def test_warmup_cosine_factor_against_its_formula():
    import math

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup=2, total=6)  # min_ratio defaults to 0.1
    factor = schedule.lr_lambdas[0]
    expected = [0.5, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * i / 4)) for i in range(5)]
    assert [factor(step) for step in range(7)] == pytest.approx(expected, rel=1e-15)
    assert factor(100) == pytest.approx(0.1, rel=1e-15)  # held at min_ratio past total
    # total = warmup: one step at the base rate, then min_ratio (no division by zero).
    flat = warmup_cosine(optimizer, warmup=3, total=3, min_ratio=0.2).lr_lambdas[0]
    assert [flat(step) for step in (2, 3, 4, 5)] == pytest.approx([1.0, 1.0, 0.2, 0.2], rel=1e-15)


def test_seed_everything_seeds_python_numpy_and_torch():
    import random

    import numpy as np

    from odeify.train.optim import seed_everything

    seed_everything(7)
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert drawn == (random.random(), np.random.rand(), torch.rand(1).item())


def test_open_run_checks_the_world_claims_the_folder_and_trims_metrics_on_resume(tmp_path):
    from odeify.train.run import open_run

    ckpt = Checkpoints(tmp_path / "checkpoints", {"lr": 0.1})
    worlds = []
    run = open_run(tmp_path, ckpt, False, worlds.append)
    assert (worlds, run.start, run.ctx.world, run.metrics.path, run.metrics.active) == (
        [1],
        0,
        1,
        tmp_path / "metrics.jsonl",
        True,
    )
    for step in (1, 2, 3):
        run.metrics.log(step=step)
    model = torch.nn.Linear(2, 2)
    ckpt.save(2, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(FileExistsError) as raised:
        open_run(tmp_path, ckpt, False, worlds.append)
    assert str(raised.value) == (
        f"{tmp_path} already holds a run; pass --resume to continue it or choose another out_dir"
    )
    resumed = open_run(tmp_path, ckpt, True, worlds.append)
    assert resumed.start == 2 and [r["step"] for r in resumed.metrics.read()] == [1, 2]
    # The world is checked before the claim (the refused call above checked it too) and before
    # the log is trimmed: a refusal there leaves step 3 in place.
    assert worlds == [1, 1, 1]
    resumed.metrics.log(step=3)
    with pytest.raises(ValueError, match="world"):
        open_run(tmp_path, ckpt, True, lambda world: (_ for _ in ()).throw(ValueError("world")))
    assert [r["step"] for r in resumed.metrics.read()] == [1, 2, 3]


def test_load_config_refusals_in_full(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(FileNotFoundError) as raised:
        load_config(_Config, missing)
    assert str(raised.value) == f"config file {missing} does not exist"
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError) as raised:
        load_config(_Config, path)
    assert str(raised.value) == f"{path} must hold a mapping of option: value, not list"
    path.write_text("lr: 0.5\nbatchsize: 4\n")
    with pytest.raises(ValueError) as raised:
        load_config(_Config, path)
    assert str(raised.value) == (
        f"unknown config keys ['batchsize'] in {path}; known keys: ['lr', 'steps']"
    )
    with pytest.raises(ValueError) as raised:
        load_config(_Config, None, {"b": 1, "a": 2})
    assert str(raised.value) == (
        "unknown config keys ['a', 'b'] in overrides; known keys: ['lr', 'steps']"
    )
    for bad in (True, "fast"):
        with pytest.raises(ValueError) as raised:
            load_config(_Config, None, {"lr": bad})
        assert str(raised.value) == f"config key 'lr' takes a number, got {bad!r}"


def test_load_config_reads_yaml_then_overrides_and_string_annotations(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")  # an empty file: the defaults
    assert load_config(_Config, path) == _Config()
    path.write_text("lr: 0.5\nsteps: 4\n")
    assert load_config(_Config, path, {"steps": 7}) == _Config(lr=0.5, steps=7)
    # A module with `from __future__ import annotations` gives the field type as the string "float".
    stringly = dataclasses.make_dataclass("S", [("lr", "float", 1.0), ("name", "str", "")])
    loaded = load_config(stringly, None, {"lr": "3e-4", "name": "7"})
    assert (loaded.lr, type(loaded.lr), loaded.name) == (3e-4, float, "7")
    # A float field given a float keeps it as it is.
    assert load_config(_Config, None, {"lr": 0.25}).lr == 0.25


def test_parse_overrides_reads_yaml_values_and_refuses_pairs_without_a_key():
    from odeify.train.config import parse_overrides

    assert parse_overrides([" lr =0.5", "ode=false", "names=[a, b]", "x=a=b", "empty="]) == {
        "lr": 0.5,
        "ode": False,
        "names": ["a", "b"],
        "x": "a=b",
        "empty": None,
    }
    for bad in ("lr", "=3"):
        with pytest.raises(ValueError) as raised:
            parse_overrides([bad])
        assert str(raised.value) == f"--set takes key=value, got {bad!r}"


def test_config_stamp_leaves_out_presentation_and_location():
    from odeify.train.config import config_stamp

    cls = dataclasses.make_dataclass(
        "R", [("lr", float, 0.1), ("progress", bool, True), ("out_dir", str, "runs/x")]
    )
    assert config_stamp(cls()) == {"lr": 0.1, "progress": True}
    assert config_stamp(cls(), ("progress",)) == {"lr": 0.1}


def test_launch_runs_or_checks_the_recipe_and_tears_down(tmp_path, monkeypatch):
    from odeify.train import config as config_module
    from odeify.train import distributed

    calls = []
    monkeypatch.setattr(distributed, "teardown", lambda: calls.append("teardown"))

    class Recipe:
        def __init__(self, cfg):
            calls.append(cfg)

        def run(self, resume):
            calls.append(("run", resume))
            if resume:
                raise RuntimeError("failed")
            return "done"

        def check(self):
            calls.append("check")

    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\n")
    argv = ["--config", str(path), "--set", "steps=3", "--set", "steps=4"]  # the last one wins
    assert config_module.launch(Recipe, _Config, argv) == "done"
    assert calls == [_Config(lr=0.5, steps=4), ("run", False), "teardown"]
    calls.clear()
    assert config_module.launch(Recipe, _Config, ["--check"]) == _Config()
    assert calls == [_Config(), "check"]  # nothing run, nothing to tear down
    calls.clear()
    with pytest.raises(RuntimeError, match="failed"):
        config_module.launch(Recipe, _Config, ["--resume"])
    assert calls == [_Config(), ("run", True), "teardown"]  # torn down on an error too
    # A recipe's own parser (with the shared flags) is used when given.
    parser = config_module.recipe_parser("r")
    parser.add_argument("--extra")
    assert config_module.launch(Recipe, _Config, ["--extra", "1"], parser=parser) == "done"
    assert parser.description == "r"


def test_launch_help_carries_the_description(capsys):
    from odeify.train.config import launch, recipe_parser

    def shown(**kwargs):
        with pytest.raises(SystemExit) as exited:
            launch(None, _Config, ["--help"], **kwargs)
        assert exited.value.code == 0
        return capsys.readouterr().out

    assert shown(description="pretrain a model") == recipe_parser("pretrain a model").format_help()
    assert "pretrain a model" in shown(description="pretrain a model")
    assert shown() == recipe_parser("").format_help()  # no description by default


def test_open_run_logs_metrics_on_the_main_process_only(tmp_path, monkeypatch):
    from odeify.train import run as run_module
    from odeify.train.distributed import Dist

    # A second torchrun process, without starting a process group.
    monkeypatch.setattr(run_module, "setup_distributed", lambda: Dist(rank=1, world=2))
    ckpt = Checkpoints(tmp_path / "checkpoints", {"lr": 0.1})
    worlds = []
    run = run_module.open_run(tmp_path, ckpt, False, worlds.append)
    assert (worlds, run.ctx.rank, run.metrics.active) == ([2], 1, False)
    run.metrics.log(step=1)
    assert not run.metrics.path.exists()


def test_recipe_parser_help_names_every_shared_flag():
    from odeify.train.config import recipe_parser

    # Whitespace collapsed: argparse wraps the help to the terminal's width.
    help_text = " ".join(recipe_parser("train it").format_help().split())
    for line in (
        "--config CONFIG YAML file of Config fields",
        "--set KEY=VALUE override a config key",
        "--resume continue the run in out_dir",
        "--check validate the config and stop",
        "train it",
    ):
        assert line in help_text
