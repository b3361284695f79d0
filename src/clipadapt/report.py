"""Result JSONs -> a markdown table (mean ± std over seeds, average over datasets) and CoOp-style
few-shot curves (accuracy against shots per class; zero-shot as a star at 0 shots)."""

from __future__ import annotations

import os
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from clipadapt.io import atomic_write, write_text

Key = tuple[str, str, int]  # (method, dataset, shots)
TEST_MARK = "†"
TEST_NOTE = (
    f"{TEST_MARK} the test set chose the model (the authors' protocol, `--recipe reference`): "
    "not a held-out estimate."
)


def row_label(record: dict) -> str:
    """The method as the tables name it: ``tip-adapter-f``, or ``tip-adapter-f (reference) †``
    for a run of the reference recipe whose model the test set chose."""
    label = record["method"]
    if record.get("recipe", "clean") != "clean":
        label += f" ({record['recipe']})"
    if record.get("selection") == "test":
        label += f" {TEST_MARK}"
    return label


def summarize(records: Iterable[dict], metric: str = "top1") -> dict[Key, tuple[float, float, int]]:
    """(method, dataset, shots) -> (mean, std, number of seeds) of ``metrics[metric]``.

    std is the sample standard deviation over seeds (0 for a single seed); zero-shot and other
    runs without shots count as 0 shots."""
    values: dict[Key, list[float]] = defaultdict(list)
    for r in records:
        if metric in r.get("metrics", {}):
            values[(row_label(r), r["dataset"], int(r.get("shots") or 0))].append(
                float(r["metrics"][metric])
            )
    return {
        key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
        for key, v in values.items()
    }


def _order(items: Iterable[str], preferred: list[str] | None) -> list[str]:
    """``items`` in the order of ``preferred`` (a row label ranks as its method), the rest
    sorted after them."""
    items = sorted(set(items))
    if not preferred:
        return items
    rank = {x: i for i, x in enumerate(preferred)}

    def key(x: str) -> tuple[int, str]:
        base = re.sub(r" \([a-z]+\)$", "", x.removesuffix(f" {TEST_MARK}"))
        return rank.get(x, rank.get(base, len(rank))), x

    return sorted(items, key=key)


def dataset_average(
    summary: dict[Key, tuple[float, float, int]], datasets: list[str]
) -> dict[tuple[str, int], float]:
    """(method, shots) -> mean over ``datasets`` of the per-dataset means (only where every
    dataset has that run)."""
    out = {}
    for method, shots in {(m, s) for m, _, s in summary}:
        means = [summary.get((method, d, shots)) for d in datasets]
        if all(m is not None for m in means):
            out[(method, shots)] = statistics.fmean(m[0] for m in means)
    return out


def markdown_table(
    records: Iterable[dict],
    metric: str = "top1",
    methods: list[str] | None = None,
    datasets: list[str] | None = None,
) -> str:
    """One row per (method, shots), one column per dataset plus their average.
    Cells: ``mean ± std`` over seeds (the mean alone for a single run such as zero-shot;
    ``(n=k)`` marks a cell with fewer seeds than the others); '–' for no runs."""
    summary = summarize(records, metric)
    datasets = _order((d for _, d, _ in summary), datasets)
    methods = _order((m for m, _, _ in summary), methods)
    average = dataset_average(summary, datasets)
    most = max((n for *_, n in summary.values()), default=1)
    header = ["method", "shots", *datasets, "average"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---:"] + ["---:"] * (len(datasets) + 1)) + "|",
    ]
    for method in methods:
        for shots in sorted({s for m, _, s in summary if m == method}):
            cells = [method, str(shots)]
            for d in datasets:
                cell = summary.get((method, d, shots))
                if cell is None:
                    cells.append("–")
                    continue
                mean, std, n = cell
                text = f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"
                cells.append(text + (f" (n={n})" if 1 < n < most else ""))
            avg = average.get((method, shots))
            cells.append("–" if avg is None else f"{avg:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    if any(TEST_MARK in m for m in methods):
        lines += ["", TEST_NOTE]
    return "\n".join(lines) + "\n"


def fewshot_curves(
    records: Iterable[dict],
    out_dir: str | os.PathLike,
    metric: str = "top1",
    methods: list[str] | None = None,
    datasets: list[str] | None = None,
    zero_shot: str = "zero-shot",
) -> list[Path]:
    """One PNG per dataset plus ``average.png``: mean ``metric`` against shots per class (error
    bars: std over seeds), zero-shot as a star at 0 shots. Returns the files written: none when
    fewer than two shot counts were run (a one-point curve says nothing the table does not)."""
    summary = summarize(records, metric)
    if len({s for _, _, s in summary if s > 0}) < 2:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = _order((d for _, d, _ in summary), datasets)
    methods = _order((m for m, _, _ in summary), methods)
    average = dataset_average(summary, datasets)
    panels = {d: {(m, s): v for (m, dd, s), v in summary.items() if dd == d} for d in datasets}
    if len(datasets) > 1:
        panels["average"] = {k: (v, 0.0, 1) for k, v in average.items()}
    shots_all = sorted({s for _, _, s in summary} | {0})
    position = {s: i for i, s in enumerate(shots_all)}  # evenly spaced ticks, like CoOp's
    written = []
    for name, points in panels.items():
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3.6), dpi=120)
        for method in methods:
            if method == zero_shot:
                continue
            xs = sorted(s for m, s in points if m == method)
            if not xs:
                continue
            ys = [points[(method, s)][0] for s in xs]
            errs = [points[(method, s)][1] for s in xs]
            ax.errorbar(
                [position[s] for s in xs], ys, yerr=errs, marker="o", ms=4, capsize=2, label=method
            )
        if (zero_shot, 0) in points:
            ax.plot(
                [position[0]],
                [points[(zero_shot, 0)][0]],
                marker="*",
                ms=13,
                color="crimson",
                linestyle="none",
                label=zero_shot,
            )
        ax.set_xticks(range(len(shots_all)), [str(s) for s in shots_all])
        ax.set_xlabel("shots per class")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(name if name != "average" else f"average over {len(datasets)} datasets")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"{_safe(name)}.png"
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png"))
        plt.close(fig)
        written.append(path)
    return written


def write_report(
    records: list[dict],
    out_dir: str | os.PathLike,
    metric: str = "top1",
    methods: list[str] | None = None,
    datasets: list[str] | None = None,
) -> tuple[Path, list[Path]]:
    """``results.md`` (the table) and ``curves/*.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    table = markdown_table(records, metric, methods, datasets)
    md = write_text(out_dir / "results.md", f"# {metric} (%), mean ± std over seeds\n\n{table}")
    return md, fewshot_curves(records, out_dir / "curves", metric, methods, datasets)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "dataset"


__all__ = [
    "dataset_average",
    "fewshot_curves",
    "markdown_table",
    "row_label",
    "summarize",
    "write_report",
]
