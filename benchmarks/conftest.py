"""Benchmark plumbing shared by benchmarks/test_*.py.

Every benchmark sets `benchmark.extra_info` with `group` (what is compared), `provider` (who computes it)
and optionally `bytes` (the bytes the op must move, for a bandwidth figure). At the end of the run a table
prints each provider's time and the speed-up of `raphael_ext` over every peer; `--benchmark-json` keeps
these fields for the plots and committed results.
"""

import collections

import pytest
import torch

import raphael_ext  # noqa: F401

OURS = "raphael_ext"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")



@pytest.fixture
def run(benchmark):
    """run(fn, device, rounds): time fn with pytest-benchmark; CUDA work is synchronised inside the timed call."""

    def timed(fn, device: str, rounds: int = 5, warmup: int = 1):
        if device == "cuda":
            def call():
                fn()
                torch.cuda.synchronize()
        else:
            call = fn
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)

    return timed


def _median_seconds(bench) -> float | None:
    stats = getattr(bench, "stats", None)
    stats = getattr(stats, "stats", stats)
    try:
        return float(stats.median)
    except (AttributeError, TypeError):
        return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or getattr(session, "disabled", True):
        return
    groups = collections.defaultdict(dict)
    for bench in session.benchmarks:
        info = bench.extra_info
        median = _median_seconds(bench)
        if "group" in info and median is not None:
            groups[info["group"]][info["provider"]] = (median, info.get("bytes"))
    if not groups:
        return
    write = terminalreporter.write_line
    write("")
    write("raphael_ext vs peers (median time; speed-up = peer time / raphael_ext time)")
    for group, providers in sorted(groups.items()):
        ours = providers.get(OURS)
        write(f"  {group}")
        for provider, (median, nbytes) in sorted(providers.items(), key=lambda kv: kv[1][0]):
            line = f"    {provider:<28} {median * 1e3:10.3f} ms"
            if nbytes:
                line += f"  {nbytes / median / 1e9:8.1f} GB/s"
            if ours and provider != OURS:
                line += f"  raphael_ext speed-up x{median / ours[0]:.2f}"
            write(line)
