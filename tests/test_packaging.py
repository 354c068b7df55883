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
    return [Requirement(spec) for spec in project["dependencies"] + extras]


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
