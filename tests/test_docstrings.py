"""Every docstring example of the library runs and prints what it says.

Examples run in a namespace with a few small objects they may use by name (``model``: an
odeified 4-layer GPT-2; ``base``: a stock one; ``ids``: a batch of token ids; the transformers
GPT-2 and Llama classes), each docstring in a fresh working directory of its own, so an example
that saves a folder leaves nothing behind and meets no folder another example saved.
"""

import doctest
import importlib
import pkgutil
import re

import pytest
import torch

import odeify

# odeify.adapters is installed from another folder (see pyproject), so it is walked on its own.
MODULES = sorted(
    name
    for package in (odeify, importlib.import_module("odeify.adapters"))
    for _, name, _ in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
) + ["odeify", "odeify.adapters"]


# Building the models is most of the cost of a namespace: an example gets them (fresh, so
# that what one example does to them no other sees) only when it names one of them.
MODEL_NAMES = re.compile(r"\b(model|base|ids)\b")


def _namespace(models: bool) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    namespace = {
        "torch": torch,
        "GPT2Config": GPT2Config,
        "GPT2LMHeadModel": GPT2LMHeadModel,
        "LlamaConfig": LlamaConfig,
        "LlamaForCausalLM": LlamaForCausalLM,
        "odeify": odeify.odeify,
    }
    torch.manual_seed(0)  # every example sees the same random numbers, run alone or not
    if models:
        # One config each: models built from one config object share it, and odeify() writes its
        # settings into the config, which would make `base` look odeified.
        config = lambda: GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=97, n_positions=64)
        namespace["base"] = GPT2LMHeadModel(config()).eval()
        namespace["model"] = odeify.odeify(GPT2LMHeadModel(config()).eval(), progress=False)
        namespace["ids"] = torch.randint(0, 97, (2, 16))
    return namespace


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    if not tests:
        pytest.skip(f"{name} has no docstring examples")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        folder = tmp_path / test.name
        folder.mkdir()
        monkeypatch.chdir(folder)
        source = "".join(example.source for example in test.examples)
        test.globs = {**test.globs, **_namespace(bool(MODEL_NAMES.search(source)))}
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see above)"
