"""The analysis report (PNGs, HTML, JSON) and the ``odeify analyze`` command."""

import json
import re

import pytest
import torch

from odeify import odeify, save_pretrained
from odeify.analysis import lyapunov, spectra
from odeify.analysis.report import write_report
from odeify.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
TEXT = "To be, or not to be, that is the question:\nwhether 'tis <b>nobler</b> in the mind"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_write_report(make_llama, tmp_path):
    original = make_llama()
    layers = spectra(original, progress=False)
    model = odeify(original, progress=False)
    ids = torch.tensor([3, 14, 15, 92, 65, 35])
    tokens = ["<script>", " be", "\n", "", " or", " not"]
    lam = lyapunov(model, ids, k=2, refine=1, progress=False)
    s = spectra(model, times=12, progress=False)
    files = write_report(tmp_path / "r", spectra=s, layers=layers, lyapunov=lam, tokens=tokens)
    assert sorted(files) == ["html", "json", "spectra", "tokens"]
    for key in ("spectra", "tokens"):
        assert files[key].read_bytes()[:8] == PNG
    page = files["html"].read_text()
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert page.count("<span style=") == len(tokens)
    assert 'src="spectra.png"' in page and 'src="tokens.png"' in page
    numbers = json.loads(files["json"].read_text())
    assert numbers["lyapunov"]["largest"] == pytest.approx(lam.largest.tolist())
    assert numbers["lyapunov"]["tokens"] == tokens
    assert len(numbers["spectra"]["times"]) == 12 and len(numbers["spectra_layers"]["times"]) == 3


@pytest.fixture
def gpt2_folder(make_gpt2, tmp_path):
    from odeify.assets import gpt2_tokenizer

    model = make_gpt2(vocab_size=50257)  # the GPT-2 tokenizer's ids; 4 layers, context 64
    tokenizer = gpt2_tokenizer()
    model.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    save_pretrained(odeify(model, progress=False), tmp_path / "ode", tokenizer=tokenizer)
    return tmp_path


def test_cli_analyze(gpt2_folder, capsys):
    out = gpt2_folder / "report"
    args = ["analyze", str(gpt2_folder / "plain"), "--text", TEXT, "--out", str(out)]
    assert main([*args, "--times", "8", "--top-k", "2", "--refine", "1"]) == 0
    printed = capsys.readouterr().out
    assert "not odeified: odeified it in memory" in printed
    numbers = json.loads((out / "analysis.json").read_text())
    assert len(numbers["spectra"]["times"]) == 8
    assert len(numbers["lyapunov"]["exponents"][0]) == 2
    assert "".join(numbers["lyapunov"]["tokens"]) == TEXT
    assert (out / "spectra.png").read_bytes()[:8] == PNG

    out = gpt2_folder / "report-ode"
    args = ["analyze", str(gpt2_folder / "ode"), "--text", TEXT, "--out", str(out)]
    assert main([*args, "--times", "0,0.5", "--steps", "2", "--scheme", "heun"]) == 0
    assert "in memory" not in capsys.readouterr().out
    numbers = json.loads((out / "analysis.json").read_text())
    assert numbers["spectra"]["times"] == [0.0, 0.5] and "spectra_layers" not in numbers
    assert numbers["lyapunov"]["steps"] == 2 and numbers["lyapunov"]["scheme"] == "heun"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--text", "  "], "the text is empty"),
        (["--text", "be" + " be" * 79], "the text has 80 tokens but .* reads at most 64"),
        (["--text", TEXT, "--scheme", "dopri5"], "native fixed-grid scheme"),
        (["--text", TEXT, "--top-k", "0"], "k must be an integer between 1"),
        (["--text", TEXT, "--device", "nonsense"], "not a torch device"),
        (["--text", TEXT, "--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_cli_bad_input(gpt2_folder, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(gpt2_folder / "ode"), "--out", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(f"odeify: error: .*{message}", err)
