"""The transformers range odeify is tested with: inside it odeify runs, outside it refuses clearly."""

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from odeify import odeify
from odeify.versions import TESTED_TRANSFORMERS, check_transformers


@pytest.mark.parametrize("version", [*TESTED_TRANSFORMERS, "5.24.3", "5.20.1"])
def test_tested_releases_pass(version):
    check_transformers(version)


@pytest.mark.parametrize("version", ["5.16.1", "5.25.0", "6.0.0", "4.57.6"])
def test_other_releases_are_refused_with_the_range_and_the_override(version, monkeypatch):
    monkeypatch.delenv("ODEIFY_UNTESTED_TRANSFORMERS", raising=False)
    with pytest.raises(RuntimeError, match=f"not {version}: install") as error:
        check_transformers(version)
    assert "ODEIFY_UNTESTED_TRANSFORMERS=1" in str(error.value)
    monkeypatch.setenv("ODEIFY_UNTESTED_TRANSFORMERS", "1")
    check_transformers(version)


def test_odeify_checks_the_installed_release(monkeypatch):
    import transformers

    monkeypatch.delenv("ODEIFY_UNTESTED_TRANSFORMERS", raising=False)
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    with pytest.raises(RuntimeError, match="not 5.99.0"):
        odeify(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2)), progress=False)
