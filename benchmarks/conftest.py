"""Benchmark plumbing shared by benchmarks/test_*.py.

Every benchmark sets `benchmark.extra_info` with `group` (what is compared), `provider` (who computes it)
and optionally `bytes` (the bytes the op must move, for a bandwidth figure). At the end of the run a table
prints each provider's time and the speed-up of `raphael_ext` over every peer; `--benchmark-json` keeps
these fields for the plots and committed results.
"""

import pytest
import report
import torch

import raphael_ext  # noqa: F401


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


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Drop the benchmark an interrupt (Ctrl-C, a time limit's SIGINT) cut before its first round: pytest-benchmark
    would fail on its empty statistics and write no JSON at all, losing the benchmarks that did finish."""
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is not None:
        bench_session.benchmarks[:] = [b for b in bench_session.benchmarks if b.stats.data]
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    entries = []
    for bench in session.benchmarks:
        if "group" in bench.extra_info and bench.stats is not None:
            entries.append({**bench.extra_info, "median": bench.stats.median})
    if entries:
        terminalreporter.write_line("")
        terminalreporter.write_line("raphael_ext vs peers (speed-up = peer time / raphael_ext time)")
        for line in report.format_table(entries):
            terminalreporter.write_line(line)
