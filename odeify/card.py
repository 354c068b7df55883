"""The model card (README.md) that :func:`odeify.save_pretrained` writes beside the weights."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .api import get_block

_SCHEMA = (
    "base_model, perplexity (a number or {label: number}), perplexity_data, and any other notes"
)


def model_card(model: nn.Module, name: str, card: Mapping[str, Any] | None = None) -> str:
    """The README.md of a saved odeified model: what it is, its base model, its ODE settings
    (basis, K, L, scheme, steps, calibrated schedules), how to load it and, from ``card``,
    what the caller measured.

    ``card`` may hold ``base_model`` (default: the config's ``name_or_path``; in the card's
    metadata only when it reads as a hub model id, not a local folder), ``perplexity``
    (a number, or {label: number} such as {"N = 4": 21.3}), ``perplexity_data`` (what it was
    measured on) and any other entries, listed as they are.

    Example:
        >>> text = model_card(model, "gpt2-ode", {"base_model": "gpt2-tiny", "perplexity": 21.25})
        >>> print(text.split("## Loading")[0])  # doctest: +ELLIPSIS
        ---
        library_name: odeify
        base_model: gpt2-tiny
        tags:
        - odeify
        - neural-ode
        ---
        # gpt2-ode
        <BLANKLINE>
        gpt2-tiny with its 4 gpt2 blocks replaced by one continuous-depth (neural-ODE) block by...
        | K (basis tensors per parameter) | 4 |
        ...
        >>> text.split("## Measured")[1].strip()
        'Perplexity: 21.25'
    """
    card = dict(card or {})
    ode = get_block(model).ode
    base = str(card.pop("base_model", None) or getattr(model.config, "name_or_path", "") or "")
    model_type = model.config.model_type
    schedules = ", ".join(f"N = {n}" for n in sorted(ode.schedules, key=int))
    if ode.schedule == "uniform" and schedules:
        schedules += " (not used: the model's schedule setting is 'uniform')"
    rows = [
        ("model type", f"`{model_type}` (family {ode.family})"),
        ("L (layers of the base model)", ode.num_layers),
        ("basis", ode.basis + (f" {ode.basis_kwargs}" if ode.basis_kwargs else "")),
        ("K (basis tensors per parameter)", ode.num_basis),
        ("scheme", ode.scheme),
        ("steps N", ode.resolved_steps if ode.steps is not None else f"{ode.num_layers} (= L)"),
        ("discrete ends", ode.discrete_ends),
        ("calibrated schedules", schedules or "none (uniform grids t_i = i / N)"),
    ]
    # The hub reads base_model as a model id: a local folder or a description is left out.
    hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base) and not Path(base).exists()
    lines = [
        "---",
        "library_name: odeify",
        *([f"base_model: {base}"] if hub_id else []),
        "tags:",
        "- odeify",
        "- neural-ode",
        "---",
        f"# {name}",
        "",
        f"{base or f'A {ode.family} model'} with its {ode.num_layers} {ode.family} blocks "
        "replaced by one continuous-depth "
        "(neural-ODE) block by odeify: every block parameter is W(t) = sum_k c_k(t) P_k, and the "
        f"hidden state flows along dx/dt = L * F(x; W(t)) on t in [0, 1], integrated in N steps "
        "(any N, chosen per call).",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
        "",
        "## Loading",
        "",
        "Needs `pip install odeify`; without it transformers refuses this folder (unknown model "
        f"type `{model_type}`).",
        "",
        "```python",
        "import odeify",
        f'model = odeify.from_pretrained("{name}")  # verifies the tensors\' checksum',
        "",
        "# or through transformers, once odeify is imported (it registers its classes):",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        "model.generate(ids, ode_steps=8, ode_scheme='rk4')  # depth per call",
        "with odeify.steps(model, 8):  # or for a block of code",
        "    model(ids)",
        "```",
    ]
    measured = _measured(card)
    if measured:
        lines += ["", "## Measured", "", *measured]
    return "\n".join(lines) + "\n"


def _measured(card: dict[str, Any]) -> list[str]:
    lines = []
    perplexity = card.pop("perplexity", None)
    data = card.pop("perplexity_data", None)
    if perplexity is not None:
        on = f" on {data}" if data else ""
        if isinstance(perplexity, Mapping):
            lines += [f"Perplexity{on}:", "", "| | perplexity |", "|---|---|"]
            lines += [f"| {label} | {_number(v)} |" for label, v in perplexity.items()]
        else:
            lines.append(f"Perplexity{on}: {_number(perplexity)}")
    for key, value in card.items():
        lines.append(f"- {key}: {value}")
    return lines


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a perplexity must be a number, got {value!r} (card entries: {_SCHEMA})")
    return f"{value:.4g}"
