"""Which dtype a recipe's ``autocast`` setting trains in on a device."""

import platform
import re
import warnings
from pathlib import Path

import pytest
import torch
from _stacklevel import record_callers

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


def test_native_bf16_per_device_type(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: "cuda says")
    assert native_bf16("cuda:1") == "cuda says"  # CUDA's own answer, on any CUDA device
    assert native_bf16(torch.device("meta")) is False
    for answer, expected in ((1, True), (0, False)):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda a=answer: a)
        assert native_bf16("cpu") is expected


@pytest.mark.parametrize("device", ["cpu", torch.device("cuda", 0)])
def test_emulated_bf16_warning_in_full(monkeypatch, device):
    seen = []
    monkeypatch.setattr(precision, "native_bf16", lambda d: seen.append(d) or False)
    kind = torch.device(device).type
    message = (
        f"autocast: bf16 on a {kind} without native bfloat16 matmuls: they are emulated, about "
        "ten times slower than float32 here; set autocast: auto (float32 on this device) or none"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert autocast_dtype("bf16", device) == torch.bfloat16
        assert autocast_dtype("auto", device) is None
    assert [(w.category, str(w.message)) for w in caught] == [(UserWarning, message)]
    assert seen == [device, device]


@pytest.mark.parametrize("choice", ["fp16", "BF16", ""])
def test_unknown_choice_refused_in_full(choice):
    message = f"autocast must be one of ['auto', 'bf16', 'none'], got {choice!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        autocast_dtype(choice, "cpu")


def test_the_emulation_warning_names_the_caller_of_autocast_dtype(monkeypatch):
    # The frame a warning names is found here by walking up from the function that warns, so
    # the check holds however autocast_dtype is reached (mutmut calls it through a wrapper).
    monkeypatch.setattr(precision, "native_bf16", lambda d: False)
    callers = record_callers(monkeypatch, 2)  # 1: the function that warns, 2: whoever called it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autocast_dtype("bf16", "cpu")
    assert [(w.filename, w.lineno) for w in caught] == callers and len(callers) == 1
