"""Recipe configs: a dataclass filled from a YAML file and ``--set key=value`` overrides, unknown
keys refused; the stamp checkpoints carry; and the one command line every recipe shares.

Example:
    >>> @dataclasses.dataclass
    ... class C:
    ...     lr: float = 1e-3
    >>> load_config(C, None, parse_overrides(["lr=0.1"])).lr
    0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def load_config(cls, path: str | os.PathLike | None, overrides: dict[str, Any] | None = None):
    """Build a recipe's config dataclass from a YAML file plus overrides; unknown keys are errors.

    Example:
        >>> @dataclasses.dataclass
        ... class C:
        ...     lr: float = 1e-3
        >>> load_config(C, None, {"lr": 0.1}).lr
        0.1
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(
                f"{path} must hold a mapping of option: value, not {type(data).__name__}"
            )
    data.update(overrides or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"unknown config keys {unknown} in {path or 'overrides'}; known keys: {sorted(known)}"
        )
    for key, value in data.items():
        # YAML 1.1 reads 3e-4 (no dot) as a string and 1 as an int; a float field means a number.
        if known[key].type in (float, "float") and isinstance(value, (int, str)):
            if isinstance(value, bool):
                raise ValueError(f"config key {key!r} takes a number, got {value!r}")
            try:
                data[key] = float(value)
            except ValueError:
                raise ValueError(f"config key {key!r} takes a number, got {value!r}") from None
    return cls(**data)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set`` pairs as {key: value}, each value read as YAML.

    Example:
        >>> parse_overrides(["lr=0.001", "ode=false", "heldout=[hamlet, macbeth]"])
        {'lr': 0.001, 'ode': False, 'heldout': ['hamlet', 'macbeth']}
    """
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


# Where a run lives, not what it is: a run folder moved or copied elsewhere resumes.
LOCATION_FIELDS = ("out_dir",)


def config_stamp(cfg, presentation: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config a run's checkpoints are stamped with, less the fields that only change how a
    run looks (progress bars, threads) and where it lives (``out_dir``): resuming under any
    other config is refused.

    Example:
        >>> from odeify.train.checkpoints import Checkpoints
        >>> @dataclasses.dataclass
        ... class Config:
        ...     lr: float = 1e-3
        ...     progress: bool = True
        >>> config_stamp(Config(), ("progress",))
        {'lr': 0.001}
        >>> Checkpoints("out/checkpoints", config_stamp(Config(), ("progress",))).check()
        0
    """
    dropped = (*presentation, *LOCATION_FIELDS)
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in dropped}


def recipe_parser(description: str) -> argparse.ArgumentParser:
    """The command line of every recipe: ``--config``, ``--set KEY=VALUE`` (repeatable),
    ``--resume`` and ``--check`` (validate the config, run nothing); a recipe adds its own flags.

    Example:
        >>> recipe_parser("demo").parse_args(["--set", "lr=0.1"]).set
        ['lr=0.1']
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file of Config fields")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir")
    parser.add_argument("--check", action="store_true", help="validate the config and stop")
    return parser


def launch(
    recipe: Callable[[Any], Any],
    config_cls,
    argv: list[str] | None = None,
    description: str = "",
    parser: argparse.ArgumentParser | None = None,
) -> Any:
    """Parse a recipe's command line, build its config and run it: ``recipe(cfg).run(resume)``;
    with ``--check``, ``recipe(cfg).check()`` and the config is returned.

    The process group torchrun started (if any) is torn down afterwards, also on an error.

    Example:
        >>> @dataclasses.dataclass
        ... class Config:
        ...     max_steps: int = 10
        >>> class Count:
        ...     def __init__(self, cfg):
        ...         self.cfg = cfg
        ...     def run(self, resume):
        ...         return f"ran {self.cfg.max_steps} steps, resume={resume}"
        ...     def check(self):
        ...         pass
        >>> _ = Path("tiny.yaml").write_text("max_steps: 100\\n")
        >>> launch(Count, Config, ["--config", "tiny.yaml", "--set", "max_steps=3"])
        'ran 3 steps, resume=False'
        >>> launch(Count, Config, ["--config", "tiny.yaml", "--check"])
        Config(max_steps=100)
    """
    from .distributed import teardown

    args = (parser or recipe_parser(description)).parse_args(argv)
    cfg = load_config(config_cls, args.config, parse_overrides(args.set))
    if args.check:
        recipe(cfg).check()
        return cfg
    try:
        return recipe(cfg).run(resume=args.resume)
    finally:
        teardown()
