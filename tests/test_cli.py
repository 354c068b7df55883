"""The odeify command: convert, eval (table, PNG, JSON), generate, and its errors."""

import json
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from odeify import from_pretrained, get_block
from odeify.assets import gpt2_tokenizer
from odeify.cli import main


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
