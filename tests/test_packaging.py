"""Packaging: the library declares ranges (exact versions live in constraints.txt, for the
development setup only), triton only where it has wheels, and odeify works without triton."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> list[Requirement]:
    project = _project()
    extras = [spec for specs in project["optional-dependencies"].values() for spec in specs]
    requirements = [Requirement(spec) for spec in project["dependencies"] + extras]
    return [r for r in requirements if r.name != project["name"]]  # odeify[plots] is no pin


def test_library_dependencies_are_ranges_not_pins():
    for req in _requirements():
        pinned = [s for s in req.specifier if s.operator in ("==", "===")]
        assert not pinned, f"{req}: pin exact versions in constraints.txt, not in pyproject.toml"


def test_triton_is_required_only_on_linux_x86_64():
    (triton,) = [r for r in _requirements() if r.name == "triton"]
    assert triton.marker is not None
    assert triton.marker.evaluate({"platform_system": "Linux", "platform_machine": "x86_64"})
    assert not triton.marker.evaluate({"platform_system": "Darwin", "platform_machine": "arm64"})
    assert not triton.marker.evaluate({"platform_system": "Windows", "platform_machine": "AMD64"})


def test_constraints_pin_every_dependency_of_the_development_setup():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = req
    for req in _requirements():
        pin = pins.get(req.name.lower().replace("_", "-"))
        assert pin is not None, f"constraints.txt has no exact version of {req.name}"
        (spec,) = pin.specifier
        assert spec.operator == "==", pin
        assert req.specifier.contains(spec.version, prereleases=True), (
            f"constraints.txt's {pin} is outside pyproject's {req}"
        )


_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # what `import triton` meets where triton is not installed
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from odeify import odeify
from odeify.time_linear import time_linear

config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
model = odeify(GPT2LMHeadModel(config).eval(), progress=False)
ids = torch.randint(0, 50, (2, 5))
with torch.no_grad():
    model(ids, ode_steps=torch.tensor([1, 3]))  # per-sample steps: time_linear's reference
x, c, p = torch.ones(1, 1, 2), torch.ones(1, 1), torch.ones(1, 3, 2)
try:
    time_linear(x, c, p, backend="triton")
except RuntimeError as e:
    assert "needs the triton package" in str(e), e
else:
    raise AssertionError("the Triton backend ran without triton")
assert "odeify._triton_time_linear" not in sys.modules
print("ok")
"""


def test_odeify_runs_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_plots_and_gguf_are_extras_and_dev_installs_them():
    project = _project()
    names = {Requirement(spec).name for spec in project["dependencies"]}
    assert not names & {"matplotlib", "gguf"}, "plots and GGUF are optional: extras, not deps"
    extras = project["optional-dependencies"]
    assert [Requirement(s).name for s in extras["plots"]] == ["matplotlib"]
    assert [Requirement(s).name for s in extras["gguf"]] == ["gguf"]
    (self_ref,) = [Requirement(s) for s in extras["dev"] if Requirement(s).name == "odeify"]
    assert self_ref.extras == {"plots", "gguf"}


_WITHOUT_EXTRAS = """
import sys
sys.modules["matplotlib"] = None  # what an import meets where the extras are not installed
sys.modules["gguf"] = None
import torch
from transformers import GPT2Config, GPT2LMHeadModel
import odeify
from odeify.analysis.report import plot_spectra
from odeify.analysis.spectra import spectra
from odeify.loading import load_model

model = odeify.odeify(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2)), progress=False)
for call in (lambda: plot_spectra(spectra(model, times=2, progress=False), "x.png"),
             lambda: load_model(sys.argv[1])):
    try:
        call()
    except ImportError as e:
        print(e)
"""


def test_odeify_imports_without_the_extras_and_names_the_one_a_call_needs(tmp_path):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, str(gguf_file)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    plots, gguf = result.stdout.strip().splitlines()
    assert "pip install 'odeify[plots]'" in plots and "matplotlib" in plots
    assert "pip install 'odeify[gguf]'" in gguf and "model.gguf" in gguf
    assert not (tmp_path / "x.png").exists()


def test_plotting_leaves_matplotlib_global_state_alone(tmp_path):
    # A library that draws a PNG must not switch the host program's backend or keep figures.
    script = (
        "import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt\n"
        "from odeify.train.plots import plot_sweep\n"
        "plot_sweep({'a': {1: 2.0, 2: 3.0}}, 'p.png', 't')\n"
        "print(matplotlib.get_backend(), len(plt.get_fignums()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["svg", "0"] and (tmp_path / "p.png").stat().st_size > 0
