"""`amft plot sweep`: a sweep's method × seed table as one figure.

Top: one bar per method and column (ID, then OOD metrics) at its mean over seeds, the 95 %
t-interval as whisker, each seed as a dot. When the sweep was run with `--baseline B`, a
second panel shows what that table's paired section says: per method, the mean of
(method − B) taken seed by seed, its own t-interval, each seed's difference as a dot and
a `*` where the interval excludes 0. Two methods whose bars overlap can still differ
there, when the seed moves both alike. Bottom: learning curves averaged over seeds with
a band. Like plot.py, this never imports torch.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from amft_cli.plot import COLORS, PlotError, _legend, _not_logged, _output, _save, ema, series
from amft_cli.report import t_interval
from amft_cli.rundir import read_metrics, read_sweep_table, sweep_cell_dir

SWEEP_CURVES = (("reward/accuracy", "training rollout accuracy"), ("loss/sft", "SFT loss"))


def _column_ticks(ax: Axes, table: dict) -> None:
    """One tick per column and the same x range on both panels (the paired one has no baseline
    slot, so autoscaling would shift it against the bars)."""
    ax.set_xlim(-0.5, len(table["columns"]) - 0.5)
    k = table.get("k")
    ax.set_xticks(range(len(table["columns"])), [c.replace("id.", "ID\n").replace("ood.", "OOD\n").replace(
        "@k", f"@{k}" if isinstance(k, int) else "@k") for c in table["columns"]])


def _intervals(ax: Axes, xs: list[float], stats: list[dict], color: str, width: float, label: str,
               bars: bool) -> list[float]:
    """Means at xs (bars or points), whiskers of ± half, each value as a black dot; returns the means."""
    means = [math.nan if s.get("mean") is None else s["mean"] for s in stats]
    halves = [0.0 if s.get("half") is None else s["half"] for s in stats]
    if bars:
        ax.bar(xs, means, width=width * 0.9, color=color, alpha=0.8, label=label)
    else:
        ax.scatter(xs, means, color=color, marker="D", s=40, zorder=4, label=label)
    ax.errorbar(xs, means, yerr=halves, fmt="none", ecolor="black", capsize=3, linewidth=1)
    for x, s in zip(xs, stats):
        ax.scatter([x] * len(s.get("values", [])), s.get("values", []), color="black", s=8, zorder=3)
    return means


def _sweep_bars(ax: Axes, table: dict) -> None:
    """One group per column, one bar per method at its mean over seeds, the 95 % t-interval as
    whisker and each seed as a dot."""
    columns, rows = table["columns"], table["rows"]
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(columns))]
        _intervals(ax, xs, [row.get(c) or {} for c in columns], COLORS[i % len(COLORS)], width,
                   f"{row['algo']} (n={len(row['seeds'])})", bars=True)
    _column_ticks(ax, table)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean over seeds")
    ax.set_title(f"{table.get('sweep', '')}: bars = mean, whiskers = {table.get('interval', '95 % interval')}, "
                 "dots = seeds", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax)


def _paired_panel(ax: Axes, table: dict) -> None:
    """Per method other than the baseline (its colour as in the bars): mean of (method − baseline)
    over the seeds both ran, whisker = its 95 % t-interval, dots = each seed's difference, `*`
    above a whisker that excludes 0."""
    columns, rows = table["columns"], table["rows"]
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        paired = row.get("vs_baseline")
        if paired is None:
            continue
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(columns))]
        stats = [paired.get(c) or {} for c in columns]
        _intervals(ax, xs, stats, COLORS[i % len(COLORS)], width,
                   f"{row['algo']} − {table['baseline']} (n={len(paired['seeds'])})", bars=False)
        for x, s in zip(xs, stats):
            if s.get("half") is not None and (s["lo"] > 0 or s["hi"] < 0):
                ax.annotate("*", (x, s["hi"]), ha="center", va="bottom", fontsize=14)
    ax.axhline(0.0, color="black", linewidth=0.8)
    _column_ticks(ax, table)
    ax.set_ylabel(f"method − {table['baseline']}, same seed")
    ax.set_title(f"paired by seed: each method − {table['baseline']}; whiskers = 95 % t-interval of the "
                 "differences, dots = seeds, * = interval excludes 0", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax)


def _band_curves(ax: Axes, sweep_dir: Path, table: dict, key: str) -> None:
    """Per method: the EMA of `key` averaged over seeds, with its 95 % t-interval as a band."""
    for i, row in enumerate(table["rows"]):
        curves = []
        for seed in row["seeds"]:
            steps, values = series(read_metrics(sweep_cell_dir(sweep_dir, row["algo"], seed)), key)
            if steps:
                curves.append(dict(zip(steps, ema(values))))
        common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not common:
            continue
        stats = [t_interval([c[s] for c in curves]) for s in common]
        color = COLORS[i % len(COLORS)]
        ax.plot(common, [s["mean"] for s in stats], color=color, linewidth=1.6, label=row["algo"])
        if len(curves) > 1:
            ax.fill_between(common, [s["lo"] for s in stats], [s["hi"] for s in stats], color=color, alpha=0.2)
    if not ax.lines:
        _not_logged(ax, key)


def sweep_figure(sweep_dir: Path) -> Figure:
    """The sweep table as bars with intervals (and, with a baseline, the paired differences),
    above learning curves with bands over seeds. Axes order: bars, [paired], then SWEEP_CURVES."""
    table = read_sweep_table(sweep_dir)
    if not table["rows"]:
        raise PlotError(f"{sweep_dir}: the sweep has no evaluated runs yet")
    paired = any("vs_baseline" in row for row in table["rows"])
    mosaic = [["bars"] * len(SWEEP_CURVES)] + ([["paired"] * len(SWEEP_CURVES)] if paired else [])
    fig = Figure(figsize=(12, 13 if paired else 9), layout="constrained")
    axes = fig.subplot_mosaic([*mosaic, [key for key, _ in SWEEP_CURVES]])
    _sweep_bars(axes["bars"], table)
    if paired:
        _paired_panel(axes["paired"], table)
    for key, label in SWEEP_CURVES:
        _band_curves(axes[key], Path(sweep_dir), table, key)
        axes[key].set_title(f"{label} (EMA; band: 95 % t-interval over seeds)", fontsize=10)
        axes[key].set_xlabel("step")
        axes[key].grid(alpha=0.3)
        _legend(axes[key])
    return fig


def sweep(sweep_dir: Path, out: str | Path | None = None, fmt: str = "png") -> Path:
    """Save the sweep figure (default: SWEEP/plots/sweep.png)."""
    return _save(sweep_figure(sweep_dir), _output(sweep_dir, out, fmt, "sweep"))
