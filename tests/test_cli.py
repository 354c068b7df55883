"""The odeify command: convert, eval (table, PNG, JSON), generate, and its errors."""

import argparse
import json
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from odeify import cli, from_pretrained, get_block
from odeify.assets import gpt2_tokenizer
from odeify.cli import build_parser, main


@pytest.fixture
def source(tmp_path):
    """A small GPT-2 with the real GPT-2 tokenizer, saved as a plain transformers folder."""
    folder = tmp_path / "gpt2-small"
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=128)).save_pretrained(
        folder
    )
    gpt2_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def converted(source, tmp_path, capsys):
    out = tmp_path / "gpt2-ode"
    assert main(["convert", str(source), str(out)]) == 0
    capsys.readouterr()
    return out


def test_convert_writes_a_loadable_model_and_reports_the_fit(source, tmp_path, capsys):
    converted = tmp_path / "out"
    assert main(["convert", str(source), str(converted)]) == 0
    printed = capsys.readouterr().out
    assert "max relative residual" in printed and "saved to" in printed
    model = from_pretrained(converted)
    assert get_block(model).ode.num_layers == 3
    assert (converted / "tokenizer.json").exists() or (converted / "vocab.json").exists()
    card = (converted / "README.md").read_text()  # the model card names what it came from
    assert f"{source} with its 3 gpt2 blocks" in card and "max relative fit residual: " in card


def _user_error(argv, capsys) -> str:
    """A user error: status 2 and one line ``odeify: error: ...`` on stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("odeify: error: ")
    return errors[0]


def test_convert_refuses_to_overwrite(converted, source, capsys):
    assert "--overwrite" in _user_error(["convert", str(source), str(converted)], capsys)
    assert (
        main(
            [
                "convert",
                str(source),
                str(converted),
                "--overwrite",
                "--basis",
                "chebyshev",
                "--num-basis",
                "2",
            ]
        )
        == 0
    )
    assert get_block(from_pretrained(converted)).ode.num_basis == 2


def test_eval_prints_a_table_and_writes_plot_and_json(converted, tmp_path, capsys):
    plot, report = tmp_path / "ppl.png", tmp_path / "ppl.json"
    args = ["eval", str(converted), "--steps", "1,3,6", "--seq-len", "64", "--max-windows", "2"]
    assert main([*args, "--plot", str(plot), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "     3" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(report.read_text())
    assert set(results["steps"]) == {"1", "3", "6"} and all(
        v > 1 for v in results["steps"].values()
    )


def test_eval_of_a_plain_model_converts_in_memory_and_shows_the_original(source, capsys):
    assert main(["eval", str(source), "--steps", "3", "--seq-len", "32", "--max-windows", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    original = next(float(s.split()[-1]) for s in lines if s.strip().startswith("original"))
    at_l = next(float(s.split()[-1]) for s in lines if s.split()[:1] == ["3"])
    assert abs(original - at_l) / original < 1e-4


def test_generate_continues_the_prompt(converted, capsys):
    assert (
        main(
            [
                "generate",
                str(converted),
                "--prompt",
                "To be, or not",
                "--steps",
                "2",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.startswith("To be, or not") and "tokens at 2 steps" in captured.err


@pytest.mark.parametrize("steps", ["0", "a,b", ""])
def test_bad_step_lists_are_usage_errors(converted, steps):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(converted), "--steps", steps])
    assert exit_info.value.code == 2


def test_unknown_source(tmp_path, capsys):
    err = _user_error(["convert", str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert "not a bundled model" in err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--corpus", "no/such/corpus.txt"], "corpus"),
        (["--scheme", "warp"], "unknown scheme 'warp'"),
        (["--seq-len", "4096"], "--seq-len 4096 is more than the 128 positions"),
        (["--dtype", "float16", "--scheme", "dopri5"], "dopri5.*float16"),
    ],
)
def test_eval_user_errors_are_one_line(converted, extra, match, capsys):
    argv = ["eval", str(converted), "--steps", "3", "--max-windows", "1", *extra]
    assert re.search(match, _user_error(argv, capsys))


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "M", "--prompt", "x", "--steps", "0"],
        ["eval", "M", "--seq-len", "0"],
        ["eval", "M", "--max-windows", "0"],
        ["eval", "M", "--batch-size", "0"],
        ["convert", "M", "out", "--num-basis", "0"],
    ],
)
def test_zero_counts_are_usage_errors(converted, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(converted) if a == "M" else a for a in argv])
    assert exit_info.value.code == 2 and "integer >= 1" in capsys.readouterr().err


def test_the_default_window_fits_a_model_with_fewer_positions(converted, capsys):
    assert main(["eval", str(converted), "--steps", "3", "--max-windows", "1"]) == 0
    assert "--seq-len 128" in capsys.readouterr().err


def test_convert_checks_the_output_before_converting(source, tmp_path, capsys, monkeypatch):
    import odeify.loading

    monkeypatch.setattr(odeify.loading, "load_model", lambda *a: pytest.fail("converted first"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    err = _user_error(["convert", str(source), str(tmp_path / "taken"), "--overwrite"], capsys)
    assert "not a model checkpoint" in err and "--force" in err
    monkeypatch.chdir(tmp_path / "taken")
    assert "working directory" in _user_error(["convert", str(source), ".", "--overwrite"], capsys)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_version(capsys):
    import odeify

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"odeify {odeify.__version__}"


def test_calibrate_saves_the_schedules_with_the_model(converted, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("Friends, Romans, countrymen, lend me your ears. " * 40)
    out = tmp_path / "gpt2-cal"
    args = ["calibrate", str(converted), str(out), "--steps", "2", "--corpus", str(text)]
    assert main([*args, "--iters", "3", "--seq-len", "32"]) == 0
    assert "calibrated schedules for N = 2" in capsys.readouterr().out
    schedules = get_block(from_pretrained(out)).ode.schedules
    assert list(schedules) == ["2"] and schedules["2"]["num_layers"] == 3
    err = _user_error([*args, "--seq-len", "100000", "--overwrite"], capsys)
    assert "shorter than one batch" in err


def test_calibrate_with_a_linear_correction_saves_its_matrices(converted, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("Friends, Romans, countrymen, lend me your ears. " * 40)
    out = tmp_path / "gpt2-cal"
    args = ["calibrate", str(converted), str(out), "--steps", "2", "--corpus", str(text)]
    assert main([*args, "--iters", "0", "--seq-len", "32", "--correction", "linear"]) == 0
    block = get_block(from_pretrained(out))
    assert block.ode.schedules["2"]["correction"]["kind"] == "linear"
    size = block.ode.schedules["2"]["correction"]["hidden_size"]
    assert block.corrections.n2.shape == (2, size, size)
    assert not torch.equal(block.corrections.n2, torch.eye(size).repeat(2, 1, 1))  # fitted
    # --correction-rank 1: each T - I of rank 1 (the truncated SVD of the fit); d + 1 refused.
    ranked = [*args, "--iters", "0", "--seq-len", "32", "--correction", "linear", "--overwrite"]
    assert main([*ranked, "--correction-rank", "1"]) == 0
    delta = get_block(from_pretrained(out)).corrections.n2.double() - torch.eye(size).double()
    assert max(int(torch.linalg.matrix_rank(m, atol=1e-5)) for m in delta) == 1
    err = _user_error([*ranked, "--correction-rank", str(size + 1)], capsys)
    assert "correction_rank must be an integer from 1" in err


# Every subcommand's options as `odeify <command> --help` documents them: (flag or positional,
# action, default, type, choices, required, help). A default or a choice is behaviour a script
# relies on; the help text is what a user reads.
OPTIONS = {
    "convert": (
        "odeify a model and save it",
        "cmd_convert",
        [
            (
                "source",
                "store",
                None,
                None,
                None,
                True,
                "'smollm2' (bundled), a transformers folder or hub id (safetensors: streamed layer by layer), or a .gguf file",
            ),
            ("out", "store", None, None, None, True, "output folder"),
            ("--overwrite", "store_true", False, None, None, False, "replace OUT if it exists"),
            (
                "--force",
                "store_true",
                False,
                None,
                None,
                False,
                "with --overwrite, also replace a folder that is not a checkpoint, or the working directory",
            ),
            (
                "--basis",
                "store",
                "hat",
                None,
                None,
                False,
                "hat | chebyshev | legendre | fourier (default: hat)",
            ),
            (
                "--num-basis",
                "store",
                None,
                "_positive_int",
                None,
                False,
                "K basis tensors (default: L, exact)",
            ),
            (
                "--scheme",
                "store",
                "sequential",
                None,
                None,
                False,
                "default scheme saved with the model",
            ),
            (
                "--dtype",
                "store",
                "auto",
                "_dtype_arg",
                None,
                False,
                "auto (the checkpoint's) | float32 | bfloat16 | float16 (default: auto)",
            ),
            (
                "--device",
                "store",
                None,
                "_device_arg",
                None,
                False,
                "torch device, e.g. cuda (default: cpu)",
            ),
        ],
    ),
    "eval": (
        "perplexity at several step counts, with a plot",
        "cmd_eval",
        [
            (
                "model",
                "store",
                None,
                None,
                None,
                True,
                "an odeified folder, or any source 'convert' takes (odeified in memory)",
            ),
            (
                "--steps",
                "store",
                None,
                "_steps_list",
                None,
                False,
                "comma-separated step counts (default: L/2,L,2L)",
            ),
            (
                "--scheme",
                "store",
                None,
                None,
                None,
                False,
                "integration scheme (default: the model's)",
            ),
            (
                "--corpus",
                "store",
                "shakespeare:hamlet",
                None,
                None,
                False,
                "'shakespeare[:plays]', a file or a folder",
            ),
            (
                "--seq-len",
                "store",
                None,
                "_positive_int",
                None,
                False,
                "tokens per window (default 512, or the model's positions if fewer)",
            ),
            (
                "--max-windows",
                "store",
                4,
                "_positive_int",
                None,
                False,
                "windows evaluated (default 4)",
            ),
            ("--batch-size", "store", 4, "_positive_int", None, False, None),
            (
                "--tokenizer",
                "store",
                None,
                None,
                None,
                False,
                "tokenizer folder, or 'gpt2' (default: the model's)",
            ),
            (
                "--dtype",
                "store",
                "float32",
                "_dtype_arg",
                None,
                False,
                "auto (the checkpoint's) | float32 | bfloat16 | float16 (default: float32)",
            ),
            (
                "--device",
                "store",
                None,
                "_device_arg",
                None,
                False,
                "torch device, e.g. cuda (default: cpu)",
            ),
            ("--plot", "store", None, None, None, False, "write a PNG of perplexity against steps"),
            ("--json", "store", None, None, None, False, "write the results as JSON"),
        ],
    ),
    "generate": (
        "generate text with the ODE model (KV-cached)",
        "cmd_generate",
        [
            (
                "model",
                "store",
                None,
                None,
                None,
                True,
                "an odeified folder, or any source 'convert' takes",
            ),
            ("--prompt", "store", None, None, None, True, None),
            (
                "--steps",
                "store",
                None,
                "_positive_int",
                None,
                False,
                "solver steps (default: the model's)",
            ),
            ("--scheme", "store", None, None, None, False, None),
            ("--max-new-tokens", "store", 32, "_positive_int", None, False, None),
            ("--temperature", "store", 0.0, "float", None, False, "0: greedy"),
            ("--tokenizer", "store", None, None, None, False, None),
            (
                "--dtype",
                "store",
                "float32",
                "_dtype_arg",
                None,
                False,
                "auto (the checkpoint's) | float32 | bfloat16 | float16 (default: float32)",
            ),
            (
                "--device",
                "store",
                None,
                "_device_arg",
                None,
                False,
                "torch device, e.g. cuda (default: cpu)",
            ),
        ],
    ),
    "calibrate": (
        "learn step schedules (times and gains, weights frozen) for some N",
        "cmd_calibrate",
        [
            (
                "source",
                "store",
                None,
                None,
                None,
                True,
                "an odeified folder, or any source 'convert' takes",
            ),
            (
                "out",
                "store",
                None,
                None,
                None,
                True,
                "output folder (the model with its calibrated schedules)",
            ),
            ("--steps", "store", None, "_steps_list", None, True, "step counts, e.g. 15,20"),
            (
                "--corpus",
                "store",
                "shakespeare:othello,king-lear,romeo-and-juliet",
                None,
                None,
                False,
                "calibration text: 'shakespeare[:plays]', a file or a folder",
            ),
            (
                "--init",
                "store",
                "dp",
                None,
                ("dp", "bi", "angular", "uniform"),
                False,
                "initial nodes (default: dp)",
            ),
            ("--fixed-times", "store_true", False, None, None, False, "learn the gains only"),
            (
                "--correction",
                "store",
                None,
                None,
                ("linear",),
                False,
                "also fit a d x d linear correction of each step's MLP update in closed form (then refined with the gains by the Adam steps; --iters 0 keeps the closed form)",
            ),
            (
                "--correction-tokens",
                "store",
                32768,
                "int",
                None,
                False,
                "tokens the correction is fitted on",
            ),
            (
                "--correction-rank",
                "store",
                None,
                "int",
                None,
                False,
                "make each correction I + U V^T of this rank (truncated SVD of the closed form; default: a full d x d matrix)",
            ),
            ("--ridge", "store", 0.001, "float", None, False, "the correction's pull towards I"),
            (
                "--forcing",
                "store",
                "student",
                None,
                ("student", "teacher"),
                False,
                "fit each step on the corrected model's own state (student) or the original's",
            ),
            ("--iters", "store", 100, "int", None, False, "Adam steps per step count"),
            ("--lr", "store", 0.02, "float", None, False, None),
            ("--batch-size", "store", 2, "int", None, False, None),
            ("--seq-len", "store", 256, "int", None, False, None),
            ("--seed", "store", 0, "int", None, False, None),
            ("--tokenizer", "store", None, None, None, False, None),
            ("--dtype", "store", "float32", None, ("float32", "bfloat16", "float16"), False, None),
            ("--overwrite", "store_true", False, None, None, False, "replace OUT if it exists"),
        ],
    ),
    "demo": (
        "the main job: SmolLM2 on Shakespeare, fidelity and retargeting",
        "cmd_demo",
        [
            (
                "--out",
                "store",
                "out/demo",
                None,
                None,
                False,
                "folder for results.json, the plot and the report",
            ),
            ("--play", "store", "hamlet", None, None, False, None),
            (
                "--tokens",
                "store",
                2048,
                "_positive_int",
                None,
                False,
                "evaluation tokens (windows of 512)",
            ),
            (
                "--steps",
                "store",
                [10, 15, 20, 24, 30, 36, 45, 60],
                "_steps_list",
                None,
                False,
                None,
            ),
            (
                "--calibrate",
                "store",
                [20],
                "_steps_list",
                None,
                False,
                "step counts to calibrate (default 20)",
            ),
            ("--calibrate-iters", "store", 30, "int", None, False, "Adam steps per step count"),
        ],
    ),
    "analyze": (
        "QK/OV spectra over t and per-token Lyapunov exponents, as a report",
        "cmd_analyze",
        [
            (
                "model",
                "store",
                None,
                None,
                None,
                True,
                "an odeified folder, or any source 'convert' takes (odeified in memory)",
            ),
            ("--text", "store", None, None, None, False, "the text whose tokens are analysed"),
            ("--text-file", "store", None, None, None, False, "read the text from this file"),
            (
                "--out",
                "store",
                "report",
                None,
                None,
                False,
                "folder for the PNGs, index.html and analysis.json",
            ),
            (
                "--steps",
                "store",
                None,
                "_positive_int",
                None,
                False,
                "solver steps of the flow (default: the model's)",
            ),
            (
                "--scheme",
                "store",
                None,
                None,
                None,
                False,
                "native scheme of the flow (default: the model's)",
            ),
            (
                "--times",
                "store",
                64,
                "_times_arg",
                None,
                False,
                "spectra times: a count n (t = i/n) or a list",
            ),
            ("--top-k", "store", 4, "int", None, False, "Lyapunov exponents per token (default 4)"),
            (
                "--refine",
                "store",
                2,
                "int",
                None,
                False,
                "subspace iterations before the final pass (default 2)",
            ),
            ("--device", "store", "cpu", None, None, False, "torch device (default: cpu)"),
            (
                "--threads",
                "store",
                None,
                "int",
                None,
                False,
                "CPU threads for torch (default: torch's)",
            ),
            (
                "--tokenizer",
                "store",
                None,
                None,
                None,
                False,
                "tokenizer folder, or 'gpt2' (default: the model's)",
            ),
            ("--dtype", "store", "float32", None, ("float32", "bfloat16", "float16"), False, None),
        ],
    ),
    "prepare": (
        "tokenise a corpus into token shards (streamed, in worker processes)",
        "cmd_prepare",
        [
            (
                "corpus",
                "store",
                None,
                None,
                None,
                True,
                "'shakespeare[:plays]', a text or .jsonl file, a folder, or 'hf:NAME'",
            ),
            ("out", "store", None, None, None, True, "folder for the shards and index.json"),
            (
                "--tokenizer",
                "store",
                "gpt2",
                None,
                None,
                False,
                "'gpt2', 'char', or a tokenizer folder",
            ),
            ("--workers", "store", 1, "int", None, False, "tokenising processes (default 1)"),
            (
                "--shard-tokens",
                "store",
                None,
                "int",
                None,
                False,
                "tokens per shard (default 2^26)",
            ),
            (
                "--heldout",
                "store",
                None,
                None,
                None,
                False,
                "comma-separated held-out documents: prepare the pretrain recipe's two splits into OUT as its token_cache",
            ),
            (
                "--heldout-fraction",
                "store",
                None,
                "float",
                None,
                False,
                "as --heldout, a share of the documents",
            ),
            ("--quiet", "store_true", False, None, None, False, "no progress bar"),
        ],
    ),
    "upgrade": (
        "rewrite a saved odeified model (odeify's model type, for AutoModelForCausalLM) or a continuous LoRA adapter (targets through the basis, which peft refuses on a stock model) in the current format, in place",
        "cmd_upgrade",
        [
            (
                "folder",
                "store",
                None,
                None,
                None,
                True,
                "a folder written by odeify.save_pretrained, or a peft adapter folder",
            ),
        ],
    ),
}


def _options(parser):
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        kind = "store_true" if isinstance(action, argparse._StoreTrueAction) else "store"
        kind = kind if type(action) in (argparse._StoreAction, argparse._StoreTrueAction) else "?"
        rows.append(
            (
                "/".join(action.option_strings) or action.dest,
                kind,
                action.default,
                getattr(action.type, "__name__", action.type),
                None if action.choices is None else tuple(action.choices),
                action.required,
                action.help,
            )
        )
    return rows


def _subcommands():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub


def test_the_subcommands_in_order_with_their_help():
    parser, sub = _subcommands()
    assert parser.prog == "odeify"
    assert parser.description == "Continuous-depth (neural-ODE) transformers."
    assert sub.dest == "command" and sub.required
    assert list(sub.choices) == list(OPTIONS)
    assert {c.dest: c.help for c in sub._choices_actions} == {n: o[0] for n, o in OPTIONS.items()}


@pytest.mark.parametrize("command", list(OPTIONS))
def test_each_subcommands_options(command):
    _, sub = _subcommands()
    parser = sub.choices[command]
    _, func, options = OPTIONS[command]
    assert parser.get_default("func") is getattr(cli, func)
    assert _options(parser) == options
    groups = [
        ([a.dest for a in g._group_actions], g.required) for g in parser._mutually_exclusive_groups
    ]
    assert groups == ([(["text", "text_file"], True)] if command == "analyze" else [])


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    assert "the following arguments are required: command" in capsys.readouterr().err


def test_demo_passes_its_options_to_the_demo(monkeypatch, tmp_path):
    import odeify.demo

    calls = []
    monkeypatch.setattr(odeify.demo, "run_demo", lambda *a, **kw: calls.append((a, kw)))
    argv = ["demo", "--out", str(tmp_path), "--play", "othello", "--tokens", "512"]
    assert main([*argv, "--steps", "4,8", "--calibrate", "6", "--calibrate-iters", "2"]) == 0
    options = {"play": "othello", "tokens": 512, "step_counts": [4, 8], "calibrated": [6]}
    assert calls == [((tmp_path,), {**options, "calibrate_iters": 2})]
