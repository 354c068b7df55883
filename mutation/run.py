"""Mutation testing of odeify's library modules with mutmut, within a time budget.

Usage: ``python mutation/run.py [--budget MINUTES] [--jobs N] [--fresh] [--only PATTERN]... [MODULE ...]``
(``make mutate``). MODULE is a path from ``mutation/modules.toml`` (``odeify/bases.py``) or its
stem (``bases``, ``train/data``); none means every module, in the file's order, until the budget
is spent. ``--only`` runs just the mutants whose names match a pattern (mutmut's names, ``*``
for any text: ``'odeify.cli.x_cmd_eval__mutmut_*'`` is one function's), decided or not; the
other mutants keep their results (survivors are not retested).

Each module runs in its own scratch copy of the repository, ``out/mutation/work/<name>``, with a
``[tool.mutmut]`` section that mutates that module only and selects the test files the mapping
names for it. mutmut records once which of those tests reach which function and then runs each
mutant against just those tests, forked from a process that has imported torch already. Results
are kept in the scratch copy: a later run goes on where the budget stopped the last one, and
survivors are tested again (the tests may have grown since). ``--fresh`` starts a module over.

The report of every module that has results is written to ``out/mutation/report.md``.

Why mutmut: of the two maintained tools, mutmut (3.x) selects per mutant the tests that reached
the mutated function and forks each mutant run from a warm process, so a mutant costs its few
tests, not the import of torch and transformers plus the module's whole test list, as a
cosmic-ray mutant (one shell test command per mutant) would. It also never writes into the
working tree (mutants live in the scratch copy), and it leaves decorated functions alone, so the
``@triton.jit`` kernels (whose source Triton parses) are never rewritten.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "mutation" / "modules.toml"
OUT = ROOT / "out" / "mutation"

# mutmut's exit codes (mutmut.stats.status_by_exit_code), grouped the way the report counts them.
KILLED = {1, 3, 36, 24, -24, 152, 255, -9, -11}  # a failing test, a timeout or a crash all kill
SURVIVED = {0}
NO_TESTS = {5, 33}


def load_config(path: Path = CONFIG) -> dict:
    """The parsed ``modules.toml``: ``run`` settings and ``modules`` (module path -> test files).

    Example:
        >>> cfg = load_config()
        >>> cfg["modules"]["odeify/bases.py"][0]
        'tests/test_bases.py'
    """
    with open(path, "rb") as f:
        return tomllib.load(f)


def work_name(module: str) -> str:
    """The scratch folder's name for a module path.

    Example:
        >>> work_name("odeify/train/data.py")
        'train_data'
    """
    return module.removeprefix("odeify/").removesuffix(".py").replace("/", "_")


def mutmut_section(module: str, tests: list[str], pytest_args: list[str]) -> str:
    """The ``[tool.mutmut]`` TOML that mutates ``module`` only, tested by ``tests``.

    Example:
        >>> print(mutmut_section("odeify/bases.py", ["tests/test_bases.py"], []))  # doctest: +ELLIPSIS
        <BLANKLINE>
        [tool.mutmut]
        source_paths = ["odeify"]
        only_mutate = ["odeify/bases.py"]
        pytest_add_cli_args_test_selection = ["tests/test_bases.py"]
        ...
    """
    # forkserver: torch's threads and the CUDA/Triton state are not fork-safe in a process that
    # has run tests; the fork server only imports and forks. The scratch copy is not a git
    # repository of its own, so change detection by git would look at the worktree instead.
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["odeify"]\n'
        f"only_mutate = {json.dumps([module])}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        f"pytest_add_cli_args = {json.dumps(pytest_args)}\n"
        'process_isolation = "forkserver"\n'
        # The recipe tests load recipes/ next to tests/ (tests/_launch.py); mutmut copies only
        # the sources and tests/ into mutants/ otherwise.
        'also_copy = ["recipes"]\n'
        "use_git_change_detection = false\n"
        'on_dependency_change = "ignore"\n'
    )


def _repo_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def _sync(work: Path, module: str, tests: list[str], pytest_args: list[str]) -> None:
    # Copy only what changed, keeping mtimes: mutmut regenerates a module's mutants when its
    # source is newer than the mutated copy.
    for rel in _repo_files():
        src, dst = ROOT / rel, work / rel
        if rel == "pyproject.toml" or (dst.exists() and dst.read_bytes() == src.read_bytes()):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    pyproject = (ROOT / "pyproject.toml").read_text() + mutmut_section(module, tests, pytest_args)
    target = work / "pyproject.toml"
    if not target.exists() or target.read_text() != pyproject:
        target.write_text(pyproject)


def _meta(work: Path, module: str) -> Path:
    return work / "mutants" / (module + ".meta")


def _retest_survivors(work: Path, module: str) -> None:
    meta = _meta(work, module)
    if not meta.exists():
        return
    data = json.loads(meta.read_text())
    codes = data["exit_code_by_key"]
    for key, code in codes.items():
        if code in SURVIVED or code in NO_TESTS:
            codes[key] = None
    meta.write_text(json.dumps(data, indent=4))


def _mutmut(
    work: Path, args: list[str], timeout: float | None, max_test_seconds: float = 0
) -> subprocess.CompletedProcess:
    # `mutmut` as the console script does: importing mutmut.__main__ under its own name.
    code = "import sys; from mutmut.__main__ import cli; sys.exit(cli())"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # mutation/order_tests.py (the fastest tests first in mutant runs) is loaded as `-p order_tests`.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "mutation"), env.get("PYTHONPATH")])
    )
    env["MUTATION_MAX_TEST_SECONDS"] = str(max_test_seconds)
    return run_group(["nice", "-n", "10", sys.executable, "-c", code, *args], work, env, timeout)


def run_group(cmd: list[str], cwd: Path, env: dict, timeout: float | None):
    """Run ``cmd`` in a process group of its own until it exits or ``timeout`` (seconds) passes
    (status -1), then kill what is left of the group: mutmut's fork server and the worker
    running a mutant outlive mutmut otherwise. Output goes to files, not pipes, since an orphan
    holding a pipe would keep the reader waiting after mutmut has ended.

    Example:
        >>> run_group(["echo", "hi"], Path("."), {}, timeout=10).stdout
        'hi\\n'
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True, start_new_session=True
        )
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            status = -1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, status, out.read(), err.read())


def results(work: Path, module: str) -> dict[str, int | None]:
    """mutmut's exit code for every mutant of ``module`` in ``work`` (None: not yet run).

    Example:
        >>> results(Path("/nonexistent"), "odeify/bases.py")
        {}
    """
    meta = _meta(work, module)
    return json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}


def _diff(work: Path, mutant: str) -> str:
    shown = _mutmut(work, ["show", mutant], timeout=60).stdout
    return "\n".join(line for line in shown.splitlines() if line[:1] in "+-@" or line[:1] == " ")


def report(modules: dict[str, list[str]]) -> str:
    """The Markdown report: the score per module, then every survivor's diff.

    Example:
        >>> report({}).splitlines()[0]
        '# Mutation testing (mutmut)'
    """
    lines = [
        "# Mutation testing (mutmut)",
        "",
        "| module | mutants | killed | survived | no tests | not run | score |",
        "|---|---|---|---|---|---|---|",
    ]
    details = []
    for module in modules:
        work = OUT / "work" / work_name(module)
        codes = results(work, module)
        if not codes:
            continue
        killed = [k for k, c in codes.items() if c in KILLED]
        survived = sorted(k for k, c in codes.items() if c in SURVIVED)
        untested = sorted(k for k, c in codes.items() if c in NO_TESTS)
        pending = [k for k, c in codes.items() if c is None]
        decided = len(killed) + len(survived) + len(untested)
        score = f"{100 * len(killed) / decided:.0f}%" if decided else "-"
        lines.append(
            f"| `{module}` | {len(codes)} | {len(killed)} | {len(survived)} | {len(untested)} "
            f"| {len(pending)} | {score} |"
        )
        if survived or untested:
            details += [f"## `{module}`", ""]
            for key in survived:
                details += [f"### survived: `{key}`", "", "```diff", _diff(work, key), "```", ""]
            if untested:
                details += ["No test reaches: " + ", ".join(f"`{k}`" for k in untested), ""]
    lines += ["", "score = killed / (killed + survived + no tests); timeouts count as killed.", ""]
    return "\n".join(lines + details)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="module paths or stems (default: all)")
    parser.add_argument("--budget", type=float, help="minutes for this run (default: config)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="mutants run side by side (default: 1, one core)"
    )
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run only the mutants whose names match (fnmatch; repeat for more)",
    )
    args = parser.parse_args(argv)
    if args.only and not args.modules:
        parser.error("--only selects mutants of one module: name the module too")
    cfg = load_config()
    mapping = cfg["modules"]
    by_stem = {work_name(m): m for m in mapping}
    chosen = [by_stem.get(m.replace("/", "_"), m) for m in args.modules] or list(mapping)
    unknown = [m for m in chosen if m not in mapping]
    if unknown:
        parser.error(f"not in {CONFIG.name}: {', '.join(unknown)}")
    budget = 60 * (args.budget or cfg["run"]["budget_minutes"])
    deadline = time.monotonic() + budget
    for module in chosen:
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"budget spent; not started: {module}")
            continue
        work = OUT / "work" / work_name(module)
        if args.fresh and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        _sync(work, module, mapping[module], [*cfg["run"]["pytest_args"], "-p", "order_tests"])
        if not args.only:  # with --only, mutmut reruns just the mutants named
            _retest_survivors(work, module)
        print(f"{module}: mutmut run ({left / 60:.1f} min left)", flush=True)
        slowest = cfg["run"].get("max_test_seconds", 0)
        done = _mutmut(
            work,
            ["run", "--max-children", str(args.jobs), *args.only],
            timeout=left,
            max_test_seconds=slowest,
        )
        (work / "mutmut.log").write_text(done.stdout + done.stderr)
        if done.returncode not in (0, -1):
            # e.g. a module whose functions are all decorated (mutmut leaves those alone).
            last = [line for line in done.stdout.splitlines() if line.strip()][-4:]
            print(f"  mutmut stopped ({done.returncode}): {' '.join(last)[:300]}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.md").write_text(report(mapping))
    print(f"report: {OUT / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
