"""The results table: speed-ups against each peer, and the paired and memory figures where a benchmark has them."""

import report


def test_table_shows_speedups_paired_figures_and_memory():
    entries = [
        {"group": "op", "provider": "raphael_ext", "median": 0.2, "paired_median_speedup": 1.3,
         "paired_min_speedup": 1.24, "peak_mib": 119.8, "kept_mib": 62.1},
        {"group": "op", "provider": "peer", "median": 0.25, "peak_mib": 112.6, "kept_mib": 101.6},
        {"group": "copy", "provider": "raphael_ext", "median": 0.001, "bytes": 2e6},
    ]
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")) for line in report.format_table(entries)[2:]}
    assert rows == {
        ("op", "raphael_ext", "200.000 ms", "", "", "x1.30 / x1.24", "119.8 / 62.1"),
        ("op", "peer", "250.000 ms", "", "x1.25", "", "112.6 / 101.6"),
        ("copy", "raphael_ext", "1.000 ms", "2.0", "", "", ""),
    }
