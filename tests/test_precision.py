"""Which dtype a recipe's ``autocast`` setting trains in on a device."""

import platform
import warnings
from pathlib import Path

import pytest
import torch

from odeify.train import precision
from odeify.train.precision import autocast_dtype, native_bf16


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_exactly_where_the_device_has_it(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autocast_dtype("auto", "cpu") == (torch.bfloat16 if native else None)
        assert autocast_dtype("none", "cpu") is None


def test_bf16_is_kept_where_emulated_but_says_it_is_slow(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with pytest.warns(UserWarning, match=r"emulated.*autocast: auto"):
        assert autocast_dtype("bf16", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autocast_dtype("bf16", "cpu") == torch.bfloat16


def test_an_unknown_choice_names_the_known_ones():
    with pytest.raises(ValueError, match=r"\['auto', 'bf16', 'none'\], got 'fp16'"):
        autocast_dtype("fp16", "cpu")


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64", reason="reads x86 /proc/cpuinfo"
)
def test_native_bf16_on_this_cpu_matches_its_instruction_set():
    flags = _cpu_flags()
    if {"avx512_bf16", "amx_bf16"} & flags:
        assert native_bf16("cpu")
    elif not any(f.startswith("avx512") for f in flags) and "avx_ne_convert" not in flags:
        assert not native_bf16("cpu")  # an AVX2-only CPU emulates bfloat16
    else:
        pytest.skip("AVX-512 without bf16 instructions: oneDNN's choice, not checked here")
