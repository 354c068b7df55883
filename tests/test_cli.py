"""The odeify command: convert, eval (table, PNG, JSON), generate, and its errors."""

import argparse
import json
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import odeify
from odeify import cli, from_pretrained, get_block
from odeify.assets import gpt2_tokenizer
from odeify.card import model_card
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


def test_convert_force_replaces_a_folder_that_is_not_a_checkpoint(source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = _user_error(["convert", str(source), str(out), "--overwrite"], capsys)
    assert "holds files that are not a model checkpoint" in refused
    assert main(["convert", str(source), str(out), "--overwrite", "--force"]) == 0
    assert not (out / "notes.txt").exists() and from_pretrained(out) is not None


def test_a_folder_of_weights_without_a_config_is_no_model_folder(tmp_path, capsys):
    folder = tmp_path / "m"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2)).save_pretrained(folder)
    (folder / "config.json").unlink()  # model.safetensors alone: not streamed, not loadable
    err = _user_error(["convert", str(folder), str(tmp_path / "out")], capsys)
    assert err == (
        f"odeify: error: {str(folder)!r} is not a bundled model, a .gguf file or a model folder "
        "(it is neither 'smollm2' nor a folder with a config.json)"
    )


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
# The loading options every model command shares (`_placement`).
_DTYPE = (
    "--dtype",
    "store",
    "float32",
    "_dtype_arg",
    None,
    False,
    "auto (the checkpoint's) | float32 | bfloat16 | float16 (default: float32)",
)
_DEVICE = (
    "--device",
    "store",
    None,
    "_device_arg",
    None,
    False,
    "torch device, e.g. cuda (default: cpu)",
)

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
            _DEVICE,
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
            _DTYPE,
            _DEVICE,
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
            _DTYPE,
            _DEVICE,
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


@pytest.fixture
def loads(monkeypatch):
    """The arguments of every odeify.loading.load_model call (the real one runs)."""
    import odeify.loading

    calls, real = [], odeify.loading.load_model
    monkeypatch.setattr(
        odeify.loading, "load_model", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw)
    )
    return calls


def _clock(monkeypatch, *readings):
    """cli's own clock (what it times a generation by), reading ``readings`` in turn."""
    monkeypatch.setattr(cli, "time", SimpleNamespace(perf_counter=iter(readings).__next__))


# A special token first: the printed text leaves it out.
PROMPT = "<|endoftext|>To be, or not"


@pytest.mark.parametrize(
    "options, steps, scheme, new, sampling",
    [
        ([], None, None, 32, {"do_sample": False}),
        (
            ["--steps", "2", "--scheme", "rk4", "--temperature", "0.7", "--max-new-tokens", "3"],
            2,
            "rk4",
            3,
            {"do_sample": True, "temperature": 0.7},
        ),
    ],
)
def test_generate_prints_what_the_model_generates(
    converted, loads, monkeypatch, capsys, options, steps, scheme, new, sampling
):
    from transformers import AutoTokenizer

    _clock(monkeypatch, 10.0, 14.0)
    torch.manual_seed(0)
    assert main(["generate", str(converted), "--prompt", PROMPT, *options]) == 0
    out, err = capsys.readouterr()
    assert loads == [((str(converted), "float32", None, None), {})]
    model, tokenizer = from_pretrained(converted), AutoTokenizer.from_pretrained(converted)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    block = get_block(model)
    n = steps or block.ode.resolved_steps
    torch.manual_seed(0)
    with torch.no_grad(), odeify.steps(model, n, scheme):
        pad, mask = tokenizer.eos_token_id, torch.ones_like(ids)  # the prompt's EOS attended
        expected = model.generate(
            ids, attention_mask=mask, max_new_tokens=new, pad_token_id=pad, **sampling
        )
    assert out == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"
    assert "<|endoftext|>" not in out
    made = expected.shape[1] - ids.shape[1]
    shown = f"[{made} tokens at {n} steps of {scheme or block.ode.scheme}: {made / 4:.1f} tokens/s]"
    assert err.endswith(f"\n{shown}\n")


def test_generate_odeifies_a_plain_model_and_passes_the_loading_options(
    source, loads, capsys, monkeypatch
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    argv = ["generate", str(source), "--prompt", PROMPT, "--max-new-tokens", "4"]
    assert main([*argv, "--tokenizer", str(source), "--dtype", "float32", "--device", "cpu"]) == 0
    assert loads == [((str(source), "float32", str(source), torch.device("cpu")), {})]
    model = odeify.odeify(AutoModelForCausalLM.from_pretrained(source), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=50256,
        )
    assert capsys.readouterr().out == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"


def test_generate_attends_an_end_of_text_token_typed_in_the_prompt(tmp_path, capsys):
    from transformers import AutoTokenizer

    # The model's own EOS id (0) is not the tokenizer's (50256): left to infer a mask from
    # pad_token_id, generate would hide the prompt's first token.
    folder = tmp_path / "other-eos"
    config = GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=128, eos_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    argv = ["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "6"]
    assert main(argv) == 0
    model = odeify.odeify(GPT2LMHeadModel.from_pretrained(folder), progress=False)
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        attended, masked = (
            model.generate(
                ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=50256
            )
            for mask in (torch.ones_like(ids), (ids != 50256).long())
        )
    assert not torch.equal(attended, masked)  # the two differ here, so the test can tell
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert capsys.readouterr().out == tokenizer.decode(attended[0], skip_special_tokens=True) + "\n"


def test_a_model_without_a_tokenizer_is_refused_by_each_command(converted, tmp_path, capsys):
    bare = tmp_path / "bare"
    odeify.save_pretrained(from_pretrained(converted), bare)
    message = f"{bare} has no tokenizer; pass --tokenizer (a folder, or 'gpt2')"
    for argv in (["generate", str(bare), "--prompt", "x"], ["eval", str(bare)]):
        assert _user_error(argv, capsys) == f"odeify: error: {message}"
    argv = ["analyze", str(bare), "--text", "x", "--out", str(tmp_path / "r")]
    assert _user_error(argv, capsys) == f"odeify: error: {message}"
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", str(bare), str(tmp_path / "cal"), "--steps", "2"])
    assert exit_.value.code == message


@pytest.mark.parametrize("command", ["analyze", "eval"])
def test_a_family_without_an_adapter_is_refused_in_odeifys_words(command, source, tmp_path, capsys):
    # Bloom's config has no max_position_embeddings (ALiBi): no length check, then odeify's refusal.
    from transformers import BloomConfig, BloomForCausalLM

    folder = tmp_path / "bloom"
    config = BloomConfig(n_layer=2, hidden_size=16, n_head=2, vocab_size=50257)
    BloomForCausalLM(config).save_pretrained(folder)
    argv = [command, str(folder), "--tokenizer", str(source)]
    if command == "analyze":
        argv += ["--text", "To be", "--out", str(tmp_path / "r")]
    else:
        text = tmp_path / "text.txt"
        text.write_text("To be, or not to be: that is the question.")
        argv += ["--corpus", str(text), "--seq-len", "8", "--max-windows", "1"]
    refusal = _user_error(argv, capsys)
    assert refusal.startswith("odeify: error: odeify has no adapter for BloomForCausalLM")


def test_eval_refuses_a_corpus_shorter_than_one_window(source, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("To be.")
    argv = ["eval", str(source), "--corpus", str(text), "--seq-len", "64", "--steps", "3"]
    refusal = (
        f"odeify: error: {text} has 4 tokens, fewer than one window of 64: pass a longer "
        "--corpus or a smaller --seq-len"
    )
    assert _user_error(argv, capsys) == refusal


def test_calibrate_passes_every_option_and_reports_each_step_count(
    source, loads, tmp_path, capsys, monkeypatch
):
    from odeify.calibrate import Calibration
    from odeify.schedule import Schedule
    from odeify.train.data import corpus, tokenize

    text = tmp_path / "text.txt"
    text.write_text("Friends, Romans, countrymen, lend me your ears. " * 4)
    calls, schedules = [], {2: Schedule.from_layers([0, 2], 3), 1: Schedule.from_layers([1], 3)}
    schedules[10] = Schedule.uniform(10, 3)  # 10 after 2: the step counts sorted as numbers

    def calibrate(model, steps, data, **options):
        calls.append((steps, data, options))
        for schedule in schedules.values():  # what calibrating stores: each schedule, in the block
            get_block(model).store_schedule(schedule)
        return {
            2: Calibration(2, schedules[2], [0, 2], [0.5, 0.3, 0.2, 0.125], seconds=3.2),
            1: Calibration(1, schedules[1], [1], [], seconds=0.4),
            10: Calibration(10, schedules[10], None, [0.25, 0.0625], seconds=12.6),
        }

    monkeypatch.setattr(odeify, "calibrate", calibrate)
    out = tmp_path / "cal"
    argv = ["calibrate", str(source), str(out), "--steps", "2,1,10", "--corpus", str(text)]
    options = {
        "init": "bi",
        "learn_times": False,
        "iters": 7,
        "lr": 0.5,
        "batch_size": 3,
        "seq_len": 16,
        "seed": 4,
        "correction": "linear",
        "correction_tokens": 64,
        "ridge": 0.25,
        "forcing": "teacher",
        "correction_rank": 1,
    }
    flags = ["--init", "bi", "--fixed-times", "--iters", "7", "--lr", "0.5", "--batch-size", "3"]
    flags += ["--seq-len", "16", "--seed", "4", "--correction", "linear", "--correction-tokens"]
    flags += ["64", "--ridge", "0.25", "--forcing", "teacher", "--correction-rank", "1"]
    assert main([*argv, *flags, "--tokenizer", str(source), "--dtype", "float16"]) == 0
    assert loads == [((str(source), "float16", str(source)), {})]
    ((steps, data, passed),) = calls
    tokens = tokenize(corpus(str(text)), odeify.loading._tokenizer_in(source))
    assert steps == [2, 1, 10] and data.dtype == torch.int64 and data.tolist() == tokens.tolist()
    assert passed == options
    assert capsys.readouterr().out == (
        f"N = 2: {schedules[2]} KL 0.500 -> 0.125 (3 s)\n"
        f"N = 1: {schedules[1]}  (0 s)\n"
        f"N = 10: {schedules[10]} KL 0.250 -> 0.062 (13 s)\n"
        f"saved to {out} with calibrated schedules for N = 1, 2, 10\n"
    )
    saved = from_pretrained(out)
    assert saved.dtype == torch.float16 and set(get_block(saved).ode.schedules) == {"1", "2", "10"}
    assert (out / "tokenizer.json").exists() or (out / "vocab.json").exists()
    # The defaults, as `odeify calibrate --help` states them.
    calls.clear()
    assert main([*argv, "--overwrite"]) == 0
    defaults = {**options, "init": "dp", "learn_times": True, "iters": 100, "lr": 0.02}
    defaults.update(batch_size=2, seq_len=256, seed=0, correction=None, correction_tokens=32_768)
    defaults.update(ridge=1e-3, forcing="student", correction_rank=None)
    assert calls[0][2] == defaults


@pytest.mark.parametrize(
    "flags, split, options",
    [
        (["--workers", "3", "--shard-tokens", "100"], None, {"workers": 3, "progress": True}),
        (["--quiet"], None, {"workers": 1, "progress": False}),
        (
            ["--heldout", "a,,b", "--workers", "2"],
            (["a", "b"], 0.0),
            {"workers": 2, "progress": True},
        ),
        (["--heldout-fraction", "0.25", "--quiet"], ([], 0.25), {"workers": 1, "progress": False}),
    ],
)
def test_prepare_passes_its_options_to_the_shards(flags, split, options, monkeypatch, capsys):
    from odeify.train import data, shards

    calls = []

    class Documents:
        def __init__(self, spec):
            calls.append(("documents", spec))

        def names(self):
            return ["a.txt", "b.txt", "c.txt"]

    class Split:
        def __init__(self, *args):
            calls.append(("split", *args))
            self.train, self.held = SimpleNamespace(held=False), SimpleNamespace(held=True)

    def cached(docs, tokenizer, part, out, **kw):
        calls.append(("cached", tokenizer, part.held, out, kw))
        return SimpleNamespace(folder=f"{out}/{'held' if part.held else 'train'}")

    monkeypatch.setattr(data, "Documents", Documents)
    monkeypatch.setattr(data, "Split", Split)
    monkeypatch.setattr(data, "load_tokenizer", lambda spec, docs: f"tokenizer {spec}")
    monkeypatch.setattr(shards, "prepare", lambda *a, **kw: calls.append(("prepare", a[1:], kw)))
    monkeypatch.setattr(shards, "cached", cached)
    assert main(["prepare", "corpus", "out", "--tokenizer", "char", *flags]) == 0
    printed = capsys.readouterr().out
    if split is None:
        size = 100 if "--shard-tokens" in flags else shards.SHARD_TOKENS
        prepared = ("prepare", ("tokenizer char", "out"), {"shard_tokens": size, **options})
        assert calls == [("documents", "corpus"), prepared] and printed == ""
        return
    names = ["a.txt", "b.txt", "c.txt"]
    assert calls == [
        ("documents", "corpus"),
        ("split", names, *split, "corpus"),
        ("cached", "tokenizer char", False, "out", options),
        ("cached", "tokenizer char", True, "out", options),
    ]
    assert printed == (
        "training: out/train\nheld out: out/held\npretrain on them with: --set token_cache=out\n"
    )


def test_upgrade_rewrites_a_model_or_an_adapter_in_place(converted, tmp_path, capsys, monkeypatch):
    import odeify.lora

    assert main(["upgrade", str(converted)]) == 0
    printed = capsys.readouterr().out
    assert printed == f"{converted}: model type odeify-gpt2, class OdeifyGPT2LMHeadModel\n"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / odeify.lora.ADAPTER_CONFIG).write_text("{}")
    calls = []
    monkeypatch.setattr(
        odeify.lora, "upgrade_adapter", lambda folder: calls.append(folder) or ["h.0.basis.w"]
    )
    assert main(["upgrade", str(adapter)]) == 0
    assert calls == [adapter]
    printed = capsys.readouterr().out
    assert printed == f"{adapter}: continuous adapter, target_parameters ['h.0.basis.w']\n"


@pytest.mark.parametrize(
    "layers, counts, device",
    [(3, [1, 3, 6], None), (5, [2, 5, 10], "cpu")],  # L/2, L, 2L
)
def test_eval_prints_the_sweep_of_the_default_counts(
    layers, counts, device, loads, tmp_path, capsys, monkeypatch
):
    from transformers import AutoModelForCausalLM

    import odeify.train.plots
    from odeify.evaluate import perplexity
    from odeify.train.data import corpus, tokenize, windows
    from odeify.train.evaluate import sweep

    source = tmp_path / "plain"
    config = GPT2Config(n_layer=layers, n_embd=16, n_head=2, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(source)
    tokenizer = gpt2_tokenizer()
    tokenizer.save_pretrained(source)
    text = tmp_path / "text.txt"
    text.write_text("Friends, Romans, countrymen, lend me your ears. " * 4)
    plots = []
    monkeypatch.setattr(odeify.train.plots, "plot_sweep", lambda *a: plots.append(a))
    plot, report = tmp_path / "ppl.png", tmp_path / "ppl.json"
    argv = ["eval", str(source), "--corpus", str(text), "--seq-len", "16", "--max-windows", "2"]
    argv += ["--batch-size", "1", "--tokenizer", "gpt2", "--plot", str(plot), "--json", str(report)]
    assert main(argv + (["--device", device] if device else [])) == 0
    out, err = capsys.readouterr()
    placed = torch.device(device) if device else None
    assert loads == [((str(source), "float32", "gpt2", placed), {})]
    model = AutoModelForCausalLM.from_pretrained(source)
    ids = windows(tokenize(corpus(str(text)), tokenizer), 16, 2)
    original = perplexity(model, ids, batch_size=1, progress=False)
    odeify.odeify(model, progress=False)
    expected = sweep(model, ids, counts, 1, scheme="sequential").perplexity()
    table = "".join(f"{n:>6} {p:>12.4f}\n" for n, p in expected.items())
    assert out == (
        f"\n{source}: 32 tokens of {text}, scheme sequential, L = {layers}\n"
        f"{'steps':>6} {'perplexity':>12}\n{table}{'original':>6} {original:>12.4f}\nplot: {plot}\n"
    )
    # Both progress bars, a window a batch.
    assert "original:   0%|          | 0/2" in err and "evaluate:   0%|          | 0/2" in err
    curves = {"sequential, hat basis": expected}
    assert plots == [(curves, str(plot), f"plain on {text}", {"original": original})]
    steps = {str(n): p for n, p in expected.items()}
    assert json.loads(report.read_text()) == {"steps": steps, "reference": {"original": original}}


def test_device_arg_checks_the_devices_this_machine_has(monkeypatch):
    def refused(text, message):
        with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(message)}$"):
            cli._device_arg(text)

    refused("cude", "'cude' is not a torch device (cpu, cuda, cuda:1, mps)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # not asked without CUDA
    refused("cuda", "cuda: torch sees no CUDA device on this machine")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli._device_arg("cuda") == torch.device("cuda")
    assert cli._device_arg("cuda:1") == torch.device("cuda:1")
    refused("cuda:2", "cuda:2: this machine has 2 CUDA device(s)")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    refused("cuda:0", "cuda:0: torch sees no CUDA device on this machine")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    refused("mps", "mps: MPS is not available on this machine")
    assert cli._device_arg("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert cli._device_arg("mps") == torch.device("mps")


@pytest.mark.parametrize(
    "text, times", [("8", 8), ("8.0", 8), ("0.5", [0.5]), ("0,0.5", [0.0, 0.5]), ("2,", [2.0])]
)
def test_times_arg_is_a_count_or_a_list(text, times):
    assert cli._times_arg(text) == times and type(cli._times_arg(text)) is type(times)


def test_times_arg_refuses_what_is_not_a_number():
    message = "--times takes an integer or comma-separated times, got '0,a'"
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(message)}$"):
        cli._times_arg("0,a")


def test_analyze_passes_its_options_and_prints_the_summary(
    source, loads, tmp_path, capsys, monkeypatch
):
    from transformers import AutoTokenizer

    import odeify.analysis
    import odeify.analysis.report
    from odeify.surgery import is_odeified

    calls = []
    radius = torch.tensor([1.5, 3.25, 2.0])
    spectrum = SimpleNamespace(summary=lambda kind: {"radius": radius}, times=[0.0, 0.5, 0.75])

    def spectra(model, times=None):
        calls.append(("spectra", is_odeified(model), times))
        return spectrum

    largest = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.0, 3.0, 0.0])

    def lyapunov(model, ids, steps=None, scheme=None, k=None, refine=None):
        calls.append(("lyapunov", ids.tolist(), steps, scheme, k, refine))
        return SimpleNamespace(steps=2, scheme="heun", refine=1, largest=largest)

    def write_report(out, **parts):
        calls.append(("report", out, parts))
        return {"html": tmp_path / "r" / "index.html", "json": tmp_path / "r" / "analysis.json"}

    monkeypatch.setattr(odeify.analysis, "spectra", spectra)
    monkeypatch.setattr(odeify.analysis, "lyapunov", lyapunov)
    monkeypatch.setattr(odeify.analysis.report, "write_report", write_report)
    _clock(monkeypatch, 5.0, 7.5049)  # 2.5049 s: the report keeps two decimals
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be", encoding="utf-8")
    threads = torch.get_num_threads()
    argv = ["analyze", str(source), "--text-file", str(text), "--out", str(tmp_path / "r")]
    argv += ["--times", "0,0.5,0.75", "--steps", "2", "--scheme", "heun", "--top-k", "3"]
    try:
        assert main([*argv, "--refine", "1", "--threads", "1", "--tokenizer", str(source)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert loads == [((str(source), "float32", str(source)), {})]
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer("To be, or not to be").input_ids
    tokens = [tokenizer.decode([i]) for i in ids]
    assert len(ids) == len(largest) == 7
    (first, second, third) = calls[:3]
    assert first == ("spectra", False, None) and second == ("spectra", True, [0.0, 0.5, 0.75])
    assert third == ("lyapunov", ids, 2, "heun", 3, 1)
    meta = {"model": str(source), "tokens": 7, "basis": "hat", "num_layers": 3, "device": "cpu"}
    _, out, report = calls[3]
    assert out == str(tmp_path / "r")
    assert report["spectra"] is spectrum and report["layers"] is spectrum
    assert report["tokens"] == tokens and report["title"] == "gpt2-small: 7 tokens"
    assert report["meta"] == {**meta, "seconds": 2.5} and report["lyapunov"].refine == 1
    top = ", ".join(f"{tokens[i]!r} {largest[i]:.3f}" for i in (5, 2, 4, 0, 3))
    out, err = capsys.readouterr()
    assert "fitting W(t)" not in err  # the fit in memory shows no progress bar
    assert out == (
        f"{source} is not odeified: odeified it in memory (hat basis, exact at its 3 steps) for "
        "the spectra over t and the Lyapunov exponents; the original layers' spectra are drawn "
        "as markers\n"
        "QK spectral radius (max over heads): 1.5 at t = 0, 3.25 max, 2 at t = 0.75\n"
        f"largest exponents (2 heun steps, k = 3, refine 1): {top}\n"
        f"analysis took 2.5 s; wrote {tmp_path / 'r' / 'index.html'}, {tmp_path / 'r' / 'analysis.json'}\n"
    )


def test_analyze_refuses_a_text_longer_than_the_model_reads(converted, capsys, tmp_path):
    text = "be" + " be" * 199
    argv = ["analyze", str(converted), "--text", text, "--out", str(tmp_path / "r")]
    assert _user_error(argv, capsys) == (
        f"odeify: error: the text has 200 tokens but {converted} reads at most 128: pass a "
        "shorter --text (Lyapunov exponents need the whole text in one forward pass)"
    )
    argv = ["analyze", str(converted), "--text", " \n", "--out", str(tmp_path / "r")]
    assert _user_error(argv, capsys) == (
        "odeify: error: the text is empty: pass the text to analyse with --text or --text-file"
    )
    argv = ["analyze", str(converted), "--text", "x", "--threads", "0"]
    assert _user_error(argv, capsys) == "odeify: error: --threads must be >= 1, got 0"


def test_analyze_refuses_a_text_without_tokens(source, tmp_path, capsys):
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    # A BPE without an unknown token drops what it cannot spell: "zz" has no tokens.
    folder = tmp_path / "only-a"
    bpe = Tokenizer(BPE(vocab={"a": 0}, merges=[]))
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(folder)
    argv = ["analyze", str(source), "--text", "zz", "--tokenizer", str(folder)]
    assert _user_error([*argv, "--out", str(tmp_path / "r")], capsys) == (
        "odeify: error: the text has no tokens after tokenisation: pass a longer --text"
    )


def test_analyze_reads_a_text_of_exactly_the_models_positions(source, tmp_path):
    from transformers import AutoTokenizer

    text = "be" + " be" * 127
    argv = ["analyze", str(source), "--text", text, "--out", str(tmp_path / "r")]
    model, _, ids, ode, device = cli._analysis_inputs(build_parser().parse_args(argv))
    expected = AutoTokenizer.from_pretrained(source)(text).input_ids
    assert len(expected) == model.config.n_positions == 128 and ids.tolist() == expected
    assert not ode and device == torch.device("cpu")


def test_analyze_reads_the_text_file_as_utf8_whatever_the_locale(tmp_path, capsys):
    import codecs
    import locale
    import sys

    if sys.flags.utf8_mode:
        pytest.skip("in Python's UTF-8 mode open() reads UTF-8 whatever the locale")
    # A no-break space alone: blank once read as UTF-8; in the C locale's ASCII, undecodable.
    text = tmp_path / "text.txt"
    text.write_text("\u00a0\n", encoding="utf-8")
    argv = ["analyze", str(tmp_path / "absent"), "--text-file", str(text)]
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
        assert codecs.lookup(locale.getpreferredencoding(False)).name == "ascii"
        error = _user_error([*argv, "--out", str(tmp_path / "r")], capsys)
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)
    assert error == (
        "odeify: error: the text is empty: pass the text to analyse with --text or --text-file"
    )


def _binary(source, folder):
    """``source`` with its weights in pytorch_model.bin, not safetensors (and its tokenizer)."""
    model = GPT2LMHeadModel.from_pretrained(source)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    gpt2_tokenizer().save_pretrained(folder)
    return folder


def test_streamable_sources_are_safetensors_folders(source, converted, tmp_path, monkeypatch):
    from odeify.cli import _streamable

    assert _streamable(str(source)) == source  # one model.safetensors
    sharded = tmp_path / "sharded"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(
        sharded, max_shard_size="10KB"
    )
    assert not (sharded / "model.safetensors").exists()
    assert _streamable(str(sharded)) == sharded
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _streamable("~/sharded") == sharded
    binary = _binary(source, tmp_path / "binary")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "bare").mkdir()
    for loaded_whole in (
        "smollm2",
        str(binary),
        str(tmp_path / "model.gguf"),
        str(tmp_path / "bare"),
    ):
        assert _streamable(loaded_whole) is None, loaded_whole
    assert _streamable(str(tmp_path / "nowhere")) is None  # a path, not a hub id: load_model says
    with pytest.raises(ValueError, match=f"^{re.escape(str(converted))} is already odeified$"):
        _streamable(str(converted))


@pytest.mark.parametrize("streamed", [True, False])
def test_convert_reports_the_fit_and_passes_its_options(
    streamed, source, tmp_path, capsys, monkeypatch, loads
):
    if not streamed:  # .bin weights: loaded whole, then converted
        source = _binary(source, tmp_path / "binary")
    out = tmp_path / "out"
    converts, convert = [], odeify.odeify
    monkeypatch.setattr(
        odeify, "odeify", lambda m, **kw: converts.append((m, kw)) or convert(m, **kw)
    )
    # Loading first (whole) restarts the clock for the conversion alone.
    _clock(monkeypatch, *([1.0, 3.5] if streamed else [1.0, 2.0, 4.5]))
    argv = ["convert", str(source), str(out), "--basis", "chebyshev", "--num-basis", "2"]
    assert main([*argv, "--scheme", "rk4", "--dtype", "bfloat16", "--device", "cpu"]) == 0
    options = {"basis": "chebyshev", "num_basis": 2, "scheme": "rk4"}
    cpu = torch.device("cpu")
    if streamed:  # the folder, read in the dtype asked for, onto the device asked for
        assert loads == [] and converts == [
            (source, {"dtype": "bfloat16", "device": cpu, **options})
        ]
    else:
        assert loads == [((str(source), "bfloat16"), {"device": cpu})]
        assert [kw for _, kw in converts] == [options]
    loaded = from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    block = get_block(loaded)
    assert (block.ode.basis, block.ode.num_basis, block.ode.scheme) == ("chebyshev", 2, "rk4")
    residuals = block.fit_residuals
    assert len(residuals) == 12 and max(residuals.values()) > 0.1
    worst = sorted(residuals, key=residuals.get, reverse=True)[:5]
    assert capsys.readouterr().out == (
        f"converted in 2.5 s\nfit: 12 parameters, K = 2, L = 3\n"
        f"     max relative residual {residuals[worst[0]]:.3e}; worst: "
        + ", ".join(f"{n} {residuals[n]:.2e}" for n in worst)
        + f"\nsaved to {out}\n"
    )
    card = (out / "README.md").read_text()
    assert f"max relative fit residual: {residuals[worst[0]]:.2e}" in card
    assert f"{source} with its 3 gpt2 blocks" in card
    notes = {"base_model": str(source), "max relative fit residual": f"{residuals[worst[0]]:.2e}"}
    assert card == model_card(loaded, out.name, notes)
    assert (out / "tokenizer.json").exists() or (out / "vocab.json").exists()


def _refused(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(message)}$"):
        parse(text)


def test_the_argument_types_parse_or_say_what_they_take():
    assert cli._positive_int("1") == 1 and cli._positive_int("12") == 12
    _refused(cli._positive_int, "x", "takes an integer >= 1, got 'x'")
    _refused(cli._positive_int, "0", "takes an integer >= 1, got 0")
    assert cli._steps_list("3,,5") == [3, 5] and cli._steps_list("1") == [1]
    _refused(cli._steps_list, "3,a", "--steps takes integers separated by commas, got '3,a'")
    _refused(cli._steps_list, "2,0", "--steps needs integers >= 1, got '2,0'")
    _refused(cli._steps_list, ",", "--steps needs integers >= 1, got ','")
    assert [cli._dtype_arg(d) for d in ("auto", "float32", "bfloat16", "float16")] == [
        "auto",
        "float32",
        "bfloat16",
        "float16",
    ]
    _refused(cli._dtype_arg, "half", "takes one of auto, float32, bfloat16, float16, got 'half'")


@pytest.mark.parametrize(
    "asked, positions, length, note",
    [
        (None, None, 512, ""),
        (None, 600, 512, ""),
        (None, 512, 512, ""),
        (None, 128, 128, "--seq-len 128: the model reads at most 128 tokens\n"),
        (64, 128, 64, ""),
        (128, 128, 128, ""),
        (1000, None, 1000, ""),
    ],
)
def test_the_window_length(asked, positions, length, note, capsys):
    assert cli._seq_len(asked, positions) == length
    assert capsys.readouterr().err == note


def test_a_window_longer_than_the_model_reads_is_refused():
    message = "--seq-len 129 is more than the 128 positions the model reads"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cli._seq_len(129, 128)


@pytest.mark.parametrize("error", [ValueError, FileNotFoundError, FileExistsError])
def test_a_user_error_is_one_line_and_status_2(error, monkeypatch, capsys):
    def fails(args):
        raise error("the model\n   is  missing")

    monkeypatch.setattr(cli, "cmd_demo", fails)
    with pytest.raises(SystemExit) as exit_:
        main(["demo"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "odeify: error: the model is missing\n"


def test_main_runs_the_command_without_gradients_and_returns_its_status(monkeypatch):
    monkeypatch.setattr(cli, "cmd_demo", lambda args: 7 if not torch.is_grad_enabled() else 8)
    assert main(["demo"]) == 7 and torch.is_grad_enabled()
    monkeypatch.setattr(cli, "cmd_demo", lambda args: (_ for _ in ()).throw(KeyError("bug")))
    with pytest.raises(KeyError, match="bug"):  # not a user error: the traceback shows
        main(["demo"])
