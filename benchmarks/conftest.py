"""Benchmark setup: each group's results are reported as ratios against the group's baseline.

A benchmark marks itself as its group's baseline with ``benchmark.extra_info["baseline"] = True``;
at the end of the run every other benchmark of the group is printed as mean / baseline mean, so
the number that matters (e.g. odeified forward against the original forward) is measured on the
same machine in the same run.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    lines = []
    for group, benches in sorted(groups.items()):
        base = next((b for b in benches if b.extra_info.get("baseline")), None)
        if base is None or not base.stats:
            continue
        for b in benches:
            if b is base or not b.stats:
                continue
            lines.append(
                f"{group:40s} {b.name:60s} {b.stats.mean / base.stats.mean:7.3f}x  "
                f"(baseline {base.name}: {base.stats.mean * 1e3:.3f} ms)"
            )
    if lines:
        terminalreporter.write_sep("=", "ratios against each group's baseline (lower is faster)")
        for line in lines:
            terminalreporter.write_line(line)
