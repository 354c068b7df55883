"""Recipes as tests run them: loaded from ``recipes/`` by file, and started in forked processes
with torchrun's environment (gloo on CPU) to compare N processes with one.

Runs are forked from the test process (nothing to re-import) with one thread each: forking
after OpenMP has run with several threads can hang the child, and on a shared 2-core machine
one thread per process is also the fast setting.
"""

import contextlib
import importlib.util
import json
import multiprocessing
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).parents[1] / "recipes"


def recipe(name: str):
    """The module of ``recipes/NAME.py`` (registered in sys.modules: dataclasses resolve the
    module of a Config class)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def interrupted_at(step: int):
    """Within it, a recipe run stops with KeyboardInterrupt when it asks for the batch of step
    ``step`` (0-based), as a crash mid-run would; batches are served normally again after."""
    from odeify.train import data

    real = data.Batches.get

    def get(self, i, *args):
        if i == step:
            raise KeyboardInterrupt
        return real(self, i, *args)

    data.Batches.get = get
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        data.Batches.get = real


def argv(config: dict) -> list[str]:
    """A config as ``--set key=value`` arguments (values as JSON, which YAML reads)."""
    return [f"--set={k}={json.dumps(v)}" for k, v in config.items()]


def _child(main, args, env):
    torch.set_num_threads(1)
    os.environ.update(env)
    main(args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fork(main, args: list[str], world: int = 1) -> list:
    """Start ``main(args)`` in ``world`` forked processes, with torchrun's environment."""
    ctx = multiprocessing.get_context("fork")
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        proc = ctx.Process(target=_child, args=(main, args, env if world > 1 else {}))
        proc.start()
        procs.append(proc)
    return procs


def join(procs, timeout=120) -> None:
    for proc in procs:
        proc.join(timeout)
        assert proc.exitcode == 0, f"a recipe process exited with {proc.exitcode}"


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
