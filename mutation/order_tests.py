"""pytest plugin for mutant runs: the fastest tests first, the slowest left out.

mutmut runs a mutant's tests with ``-x`` (stop at the first failure) in the order of a set, so a
mutant that a 0.1 s test kills could first sit through a 45 s one. Loaded by ``mutation/run.py``
(``-p order_tests``), this plugin sorts a mutant's tests by the durations mutmut recorded in its
baseline run (``mutants/mutmut-stats.json``, read from the working directory mutmut runs tests
in), so a killed mutant costs about its cheapest killing test.

Tests whose baseline took longer than ``MUTATION_MAX_TEST_SECONDS`` (``max_test_seconds`` in
``modules.toml``; unset or 0: none) are left out of mutant runs: a mutant that only such a test
would kill is reported as a survivor, which errs on the side of a lower score. The baseline run
(``stats``) and mutmut's own checks run every test as listed.

In the baseline run a failing test counts as passed: it records which functions each test
reaches through mutmut's recording trampolines, which torch.compile cannot trace, so the
compile tests' graph-break and recompile checks fail there alone. mutmut's clean run, next,
runs the same tests without recording, and a test failing there still stops mutmut.

Example:
    >>> _budget({"MUTATION_MAX_TEST_SECONDS": "8"}), _budget({})
    (8.0, None)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def _budget(env) -> float | None:
    seconds = float(env.get("MUTATION_MAX_TEST_SECONDS") or 0)
    return seconds if seconds > 0 else None


def _durations() -> dict[str, float]:
    stats = Path("mutmut-stats.json")  # mutmut runs the tests from mutants/
    if not stats.exists():
        return {}
    return json.loads(stats.read_text()).get("duration_by_test", {})


def pytest_collection_modifyitems(session, config, items):
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return  # the baseline run, the forced-fail check, the test listing
    durations = _durations()
    limit = _budget(os.environ)
    if limit is not None:
        slow = [item for item in items if durations.get(item.nodeid, 0.0) > limit]
        if slow and len(slow) < len(items):
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if item not in slow]
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("MUTANT_UNDER_TEST") == "stats" and report.failed and call.when == "call":
        report.outcome = "passed"
