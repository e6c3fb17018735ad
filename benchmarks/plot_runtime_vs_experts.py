"""Figure of the runtime-vs-experts study (paper Fig. 6c) from a pytest-benchmark JSON:
    python benchmarks/plot_runtime_vs_experts.py results.json   # prints a table, writes a PNG beside the JSON
Left: DDIM steps/s against the number of space experts, one line per implementation. Middle: slowdown relative to
the same implementation at 0 experts. Right: expert rows the planned space-MoE runs."""

import argparse
import collections
import json
from pathlib import Path


def load(path: Path):
    """{(device group, provider): {experts: (steps_per_s, routed_rows)}}"""
    series = collections.defaultdict(dict)
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("study") == "runtime_vs_experts":
            key = (bench["group"], info["provider"])
            series[key][info["experts"]] = (1.0 / bench["stats"]["median"], info["routed_rows"])
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", type=Path)
    args = parser.parse_args()
    series = load(args.json)
    if not series:
        raise SystemExit(f"{args.json}: no runtime_vs_experts benchmarks")
    print("| case | provider | experts | steps/s | vs 0 experts | routed rows |\n|---|---|---:|---:|---:|---:|")
    for (group, provider), points in sorted(series.items()):
        base = points[min(points)][0]
        for e in sorted(points):
            print(f"| {group} | {provider} | {e} | {points[e][0]:.2f} | x{points[e][0] / base:.2f} | {points[e][1]} |")
    from raphael_ext.plotting import subplots

    fig, axes = subplots(1, 3, figsize=(13, 3.6))
    for (group, provider), points in sorted(series.items()):
        experts = sorted(points)
        label = f"{provider} ({group.split(' ', 1)[1]})"
        style = "-o" if provider == "raphael_ext" else "--s"
        base = points[experts[0]][0]
        axes[0].plot(experts, [points[e][0] for e in experts], style, label=label)
        axes[1].plot(experts, [points[e][0] / base for e in experts], style, label=label)
        if provider == "raphael_ext":
            axes[2].plot(experts, [points[e][1] for e in experts], style, label=label)
    for ax, title in zip(axes, ("DDIM steps / s", "steps/s relative to 0 experts", "routed expert rows")):
        ax.set_xlabel("space experts")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    stem = args.json.stem if "runtime_vs_experts" in args.json.stem else args.json.stem + "-runtime_vs_experts"
    out = args.json.with_name(stem + ".png")
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
