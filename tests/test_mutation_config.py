"""`make mutate`'s configuration cannot rot: what it names exists and mutmut accepts what it writes.

The mutation run itself is hours and not part of CI; these checks are what keeps it runnable.
"""

import doctest
import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _driver():
    spec = importlib.util.spec_from_file_location("mutation_run", ROOT / "mutation" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_module_and_test_file_named_exists():
    cfg = _driver().load_config()
    assert cfg["run"]["budget_minutes"] > 0
    for module, tests in cfg["modules"].items():
        assert (ROOT / module).is_file(), module
        assert tests, f"{module} has no tests"
        for test in tests:
            assert (ROOT / test).is_file(), f"{module}: {test}"
            assert re.fullmatch(r"tests/test_\w+\.py", test), test


def test_the_library_modules_are_all_configured():
    # The modules the mutation run is for: time bases, schemes, the block and its weight
    # function, weights, api, io, lora, time_linear and its kernels, evaluation, training, CLI.
    configured = set(_driver().load_config()["modules"])
    core = {
        f"odeify/{name}.py"
        for name in [
            "bases",
            "schemes",
            "block",
            "weight_function",
            "weights",
            "api",
            "io",
            "lora",
            "time_linear",
            "_triton_time_linear",
            "evaluate",
            "cli",
        ]
    }
    train = {f"odeify/train/{p.name}" for p in (ROOT / "odeify" / "train").glob("*.py")} - {
        "odeify/train/__init__.py"
    }
    assert core | train <= configured, sorted((core | train) - configured)


def test_mutmut_reads_the_section_the_driver_writes(tmp_path, monkeypatch):
    from mutmut import configuration

    driver = _driver()
    section = driver.mutmut_section("odeify/bases.py", ["tests/test_bases.py"], ["-m", "not slow"])
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + section)
    (tmp_path / "odeify").mkdir()
    monkeypatch.chdir(tmp_path)
    configuration.reset_config()
    try:
        cfg = configuration.config()
        assert cfg.source_paths == [Path("odeify")]
        assert cfg.pytest_add_cli_args_test_selection == ["tests/test_bases.py"]
        assert cfg.pytest_add_cli_args == ["-m", "not slow"]
        assert cfg.should_mutate("odeify/bases.py")
        assert not cfg.should_mutate("odeify/block.py")
        assert cfg.process_isolation.value == "forkserver"
        assert Path("recipes") in cfg.also_copy  # the recipe tests load recipes/
    finally:
        configuration.reset_config()


def test_driver_examples_run():
    result = doctest.testmod(_driver(), verbose=False)
    assert result.attempted >= 4 and result.failed == 0


def test_only_runs_just_its_patterns_and_needs_a_module(tmp_path, monkeypatch, capsys):
    driver = _driver()
    runs = []

    def mutmut(work, args, **kwargs):
        runs.append((work.name, args))
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(driver, "OUT", tmp_path)
    monkeypatch.setattr(driver, "_sync", lambda *args: None)
    retested = []
    monkeypatch.setattr(driver, "_retest_survivors", lambda work, module: retested.append(module))
    monkeypatch.setattr(driver, "_mutmut", mutmut)
    monkeypatch.setattr(driver, "report", lambda mapping: "")
    assert driver.main(["--only", "odeify.bases.x_a*", "bases", "--only", "odeify.bases.x_b"]) == 0
    assert runs == [
        ("bases", ["run", "--max-children", "1", "odeify.bases.x_a*", "odeify.bases.x_b"])
    ]
    assert retested == []  # the survivors outside the patterns keep their results
    assert driver.main(["bases"]) == 0
    assert runs[-1] == ("bases", ["run", "--max-children", "1"]) and retested == ["odeify/bases.py"]
    assert driver.main(["--jobs", "2", "bases"]) == 0
    assert runs[-1] == ("bases", ["run", "--max-children", "2"])
    with pytest.raises(SystemExit):
        driver.main(["--only", "odeify.bases.x_a*"])
    assert "--only selects mutants of one module: name the module too" in capsys.readouterr().err


def test_make_target_and_pins():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^mutate: .*\n\t\$\(PY\) mutation/run\.py", makefile, re.M)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (dev,) = [
        r
        for r in map(Requirement, pyproject["project"]["optional-dependencies"]["dev"])
        if r.name == "mutmut"
    ]
    (pin,) = re.findall(r"^mutmut==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert dev.specifier.contains(pin)


@pytest.mark.parametrize(("mode", "failed"), [("stats", False), ("", True), ("fail", True)])
def test_only_the_recording_run_lets_a_failing_test_pass(tmp_path, mode, failed):
    # The compile tests fail under mutmut's recording trampolines only; the clean run after it
    # and the forced-fail check must still see failures.
    (tmp_path / "test_one.py").write_text("def test_fails():\n    assert False\n")
    env = {"PATH": "", "PYTHONPATH": str(ROOT / "mutation"), "MUTANT_UNDER_TEST": mode}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "order_tests", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == (1 if failed else 0), run.stdout


def test_a_group_run_ends_with_its_leader_and_takes_its_orphans(tmp_path):
    # mutmut's fork server outlives mutmut and holds its output: the driver must neither wait
    # for it nor leave it running.
    leader = (
        "import subprocess, sys; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "print(child.pid)"
    )
    done = _driver().run_group([sys.executable, "-c", leader], tmp_path, {}, timeout=60)
    assert done.returncode == 0
    stat = Path(f"/proc/{int(done.stdout)}/stat")
    for _ in range(100):  # killed, then reaped by whoever adopted it
        if not stat.exists() or stat.read_text().split(") ")[1][0] == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the leader's child outlived the run")
