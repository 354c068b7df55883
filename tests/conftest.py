"""Test setup shared by every test module.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, before
odeify (or anything that imports its kernels) is imported: Triton kernels then run on CPU tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
