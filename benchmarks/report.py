"""Tables and plots of raphael_ext vs its peers, from pytest-benchmark results.

Used by benchmarks/conftest.py (table at the end of a run) and as a command on saved JSON:
    python benchmarks/report.py results.json [more.json ...]   # prints a markdown table, writes results.png
Each benchmark carries extra_info `group`, `provider` and optionally `bytes` (bytes the op must move).
"""

import argparse
import collections
import json
from pathlib import Path

OURS = "raphael_ext"


def group_results(entries):
    """entries: dicts with group, provider, median (s), bytes -> {group: {provider: (median, bytes)}}."""
    groups = collections.defaultdict(dict)
    for entry in entries:
        groups[entry["group"]][entry["provider"]] = (entry["median"], entry.get("bytes"))
    return dict(sorted(groups.items()))


def format_table(entries) -> list[str]:
    """Markdown table: time, bandwidth over the bytes the op must move, and raphael_ext's speed-up per peer; where a
    benchmark measured them, its speed-up paired round by round with its peer (median / fastest rounds: robust to load
    from other processes, unlike the speed-up of medians timed apart) and the memory it allocates (peak / kept
    between the passes)."""
    lines = ["| case | provider | median | GB/s | raphael_ext speed-up | paired speed-up | peak / kept MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    extra = {(e["group"], e["provider"]): e for e in entries}
    for group, providers in group_results(entries).items():
        ours = providers.get(OURS)
        for provider, (median, nbytes) in sorted(providers.items(), key=lambda kv: kv[1][0]):
            info = extra[group, provider]
            bandwidth = f"{nbytes / median / 1e9:.1f}" if nbytes else ""
            speedup = f"x{median / ours[0]:.2f}" if ours and provider != OURS else ""
            paired = (f"x{info['paired_median_speedup']:.2f} / x{info['paired_min_speedup']:.2f}"
                      if "paired_median_speedup" in info else "")
            memory = f"{info['peak_mib']:.1f} / {info['kept_mib']:.1f}" if "peak_mib" in info else ""
            cells = [group, provider, f"{median * 1e3:.3f} ms", bandwidth, speedup, paired, memory]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def entries_from_json(path: Path):
    data = json.loads(Path(path).read_text())
    machine = data.get("machine_info", {})
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "group" in info:
            yield {**info, "median": bench["stats"]["median"], "machine": machine.get("node", "")}


def plot(entries, path: Path) -> None:
    """One horizontal bar chart per case: time of each provider, ours highlighted."""
    from raphael_ext.plotting import subplots

    groups = group_results(entries)
    fig, axes = subplots(len(groups), 1, figsize=(9, 1.0 + 1.3 * len(groups)), squeeze=False)
    for ax, (group, providers) in zip(axes[:, 0], groups.items()):
        names = sorted(providers, key=lambda p: providers[p][0], reverse=True)
        times = [providers[p][0] * 1e3 for p in names]
        colors = ["tab:red" if p == OURS else "tab:gray" for p in names]
        ax.barh(names, times, color=colors)
        ax.set_xscale("log")
        ax.set_title(group, fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
        for y, t in enumerate(times):
            ax.text(t, y, f" {t:.3g} ms", va="center", fontsize=7)
    axes[-1, 0].set_xlabel("median time (ms, log scale; lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--png", type=Path, help="plot path (default: the first JSON with .png)")
    args = parser.parse_args()
    entries = [e for path in args.json for e in entries_from_json(path)]
    print("\n".join(format_table(entries)))
    png = args.png or args.json[0].with_suffix(".png")
    plot(entries, png)
    print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
