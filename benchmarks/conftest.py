"""Benchmark setup: each group's results are reported as ratios against the group's baseline.

A benchmark marks itself as its group's baseline with ``benchmark.extra_info["baseline"] = True``;
at the end of the run every other benchmark of the group is printed as its ratio to the baseline
(of the minimum, the figure least disturbed by other load, and of the median), so
the number that matters (e.g. odeified forward against the original forward) is measured on the
same machine in the same run. A benchmark that times two things alternately reports the median
of its per-pair ratios in ``extra_info["paired_ratio_median"]``; that is printed as it is, with
``extra_info["flop_ratio"]`` (the FLOPs it should cost against the baseline) where there is one.

``make bench`` runs every suite here (pyproject's ``python_files`` includes ``bench_*.py``);
``ODEIFY_BENCH_QUICK=1`` makes each suite pick its smallest shapes and models, which ``make test``
runs once with ``--benchmark-disable``.
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
            flops = b.extra_info.get("flop_ratio")
            flops = "" if flops is None else f", FLOP ratio {flops:.3f}"
            if "paired_ratio_median" in b.extra_info:
                lines.append(
                    f"{group:40s} {b.name:60s} {b.extra_info['paired_ratio_median']:7.3f}x  (median of paired calls{flops})"
                )
                continue
            if b is base or not b.stats:
                continue
            lines.append(
                f"{group:40s} {b.name:60s} {b.stats.min / base.stats.min:7.3f}x min, "
                f"{b.stats.median / base.stats.median:7.3f}x median  "
                f"(baseline {base.name}: min {base.stats.min * 1e3:.3f} ms{flops})"
            )
    if lines:
        terminalreporter.write_sep("=", "ratios against each group's baseline (lower is faster)")
        for line in lines:
            terminalreporter.write_line(line)
