"""Figures from run directories: the μ curriculum of one run, runs compared, eval tables
(a sweep's figure is in plot_sweep.py, which uses the helpers here).

Each figure has a pure builder returning a matplotlib Figure (tests read its
lines, bars and table cells) and a wrapper that saves it, by default to
RUN/plots/<name>.png. Figures are made with the object API (no pyplot), so
no GUI backend or global state is involved. Noisy curves (reward, entropy)
are drawn raw and faint with an EMA on top.

This module never imports torch, directly or through the modules it uses:
plotting must work on a laptop that only has the run directory.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from amft_cli.evaluate import EPISODE_METRICS, table_rows
from amft_cli.fsio import user_io
from amft_cli.rundir import plots_dir, read_config, read_eval, read_metrics

FORMATS = ("png", "svg", "pdf")
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
          "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


class PlotError(ValueError):
    """Nothing to plot, or a bad --out/--format; printed as one line."""


# ---------------------------------------------------------------------------
# data helpers


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, skipping steps where it is absent, null or not finite."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def ema(values: list[float], span: int | None = None) -> list[float]:
    """Exponential moving average; the span defaults to a tenth of the curve (1..50 steps)."""
    if span is None:
        span = max(1, min(50, len(values) // 10))
    alpha = 2.0 / (span + 1)
    out, current = [], None
    for v in values:
        current = v if current is None else alpha * v + (1 - alpha) * current
        out.append(current)
    return out


def run_labels(run_dirs: list[Path]) -> list[str]:
    """'algo (seed N)' from each run's config; the folder name is added where two would clash."""
    labels = []
    for d in run_dirs:
        cfg = read_config(d)
        labels.append(f"{cfg.train.algo} (seed {cfg.seed})")
    return [f"{lab} [{Path(d).name}]" if labels.count(lab) > 1 else lab for lab, d in zip(labels, run_dirs)]


def _output(run_dir: Path, out: str | Path | None, fmt: str, stem: str) -> Path:
    """out may be a file (its suffix wins over fmt) or a folder; default RUN/plots/."""
    if fmt not in FORMATS:
        raise PlotError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if out is not None and Path(out).suffix.lstrip(".") in FORMATS:
        path = Path(out)
    else:
        path = (plots_dir(run_dir) if out is None else Path(out)) / f"{stem}.{fmt}"
    return path


def _save(fig: Figure, path: Path) -> Path:
    with user_io(path, "writing the figure"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return path


def _noisy_curve(ax: Axes, steps: list, values: list, color: str, label: str) -> None:
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8, label=f"{label}, per step")
    ax.plot(steps, ema(values), color=color, linewidth=1.8, label=f"{label}, EMA")


def _not_logged(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"{what} not logged by this run", transform=ax.transAxes,
            ha="center", va="center", color="gray")


def _legend(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        # outside the axes, so a legend never hides a curve
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


# ---------------------------------------------------------------------------
# amft plot curriculum


def mu_limits(values: list[float], min_span: float = 0.02) -> tuple[float, float]:
    """y-limits of a μ panel: zoomed to μ's range (AMFT's μ often moves within a few hundredths,
    flat at a 0-1 scale) but at least `min_span` wide (μ's float noise is ~1e-7), and
    inside [0, 1] plus a 0.02 margin."""
    lo, hi = min(values), max(values)
    if hi - lo < min_span:
        lo, hi = (lo + hi - min_span) / 2, (lo + hi + min_span) / 2
    shift = max(0.0, -lo) - max(0.0, hi - 1.0)  # a window past 0 or 1 slides back inside
    return max(-0.02, lo + shift - 0.02), min(1.02, hi + shift + 0.02)


def _mu_panel(ax: Axes, records: list[dict]) -> None:
    """μ against step, its axis zoomed to μ after the warm-up (where the controller moves it);
    a warm-up μ left outside that range is named in the panel."""
    steps, mu = series(records, "balance/mu")
    if not steps:
        _not_logged(ax, "μ")
        return
    ax.plot(steps, mu, color="tab:blue", linewidth=1.8, label="μ (SFT weight)")
    at_step = dict(zip(steps, mu))
    updates = [s for s, flag in zip(*series(records, "balance/meta_update")) if flag and s in at_step]
    if updates:
        ax.plot(updates, [at_step[s] for s in updates], linestyle="none", marker="v",
                color="tab:red", markersize=6, label="meta-gradient update")
    alone = _each_term_alone(ax, records)
    warm = {r["step"] for r in records if r.get("balance/warmup")}
    lo, hi = mu_limits([m for s, m in zip(steps, mu) if s not in warm] + alone or mu)
    ax.set_ylim(lo, hi)
    hidden = sorted({m for s, m in zip(steps, mu) if s in warm and not lo <= m <= hi})
    if hidden:
        ax.text(0.01, 0.95, f"warm-up: μ = {', '.join(f'{m:g}' for m in hidden)} (off this scale)",
                transform=ax.transAxes, va="top", fontsize=8, color="tab:blue")
    ax.set_ylabel("μ")


def _each_term_alone(ax: Axes, records: list[dict]) -> list[float]:
    """Where μ would be had one controller term acted alone (μ at the first mixed step plus its
    balance/sum_delta_*, before the clip), dotted: shows which term steers μ. Returns the values."""
    mixed = [r for r in records if not r.get("balance/warmup") and "balance/sum_delta_meta" in r]
    if not mixed:
        return []
    start, values = mixed[0]["balance/mu"], []
    steps = [mixed[0]["step"]] + [r["step"] + 1 for r in mixed]  # a row's sums include its own update
    for key, color, what in (("balance/sum_delta_meta", "tab:red", "meta-gradient"),
                             ("balance/sum_delta_entropy", "tab:purple", "entropy term")):
        line = [start] + [start + r[key] for r in mixed]
        ax.plot(steps, line, color=color, linestyle=":", linewidth=1.3, label=f"μ₀ + {what} alone")
        values += line
    return values


def _entropy_panel(ax: Axes, records: list[dict]) -> None:
    steps, entropy = series(records, "policy/entropy")
    if not steps:
        _not_logged(ax, "policy entropy")
        return
    _noisy_curve(ax, steps, entropy, "tab:purple", "entropy H")
    target_steps, target = series(records, "balance/entropy_target")
    if target_steps:
        ax.plot(target_steps, target, color="black", linestyle="--", linewidth=1.2,
                drawstyle="steps-post", label="target H*")
    ax.set_ylabel("entropy (nats/token)")


def curriculum_figure(run_dir: Path) -> Figure:
    """μ, reward mean, reward accuracy and entropy of one run against step (shared x)."""
    run_dir = Path(run_dir)
    records, cfg = read_metrics(run_dir), read_config(run_dir)
    fig = Figure(figsize=(10, 10), layout="constrained")
    axes = fig.subplots(4, 1, sharex=True)
    _mu_panel(axes[0], records)
    for ax, key, what, color in ((axes[1], "reward/mean", "reward", "tab:green"),
                                 (axes[2], "reward/accuracy", "accuracy", "tab:orange")):
        steps, values = series(records, key)
        if steps:
            _noisy_curve(ax, steps, values, color, what)
        else:
            _not_logged(ax, what)
        ax.set_ylabel(f"{what} (rollouts)")
    axes[2].set_ylim(-0.02, 1.02)
    _entropy_panel(axes[3], records)
    warmup = [r["step"] for r in records if r.get("balance/warmup")]  # logged by methods with a warm-up
    if warmup:
        for i, ax in enumerate(axes):
            ax.axvspan(0, max(warmup), color="gold", alpha=0.15,
                       label="warm-up (pure SFT)" if i == 0 else None)
    for ax, title in zip(axes, ("Balance μ", "Verifier reward", "Accuracy", "Policy entropy")):
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        _legend(ax)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{run_dir.name}: {run_labels([run_dir])[0]}, task {cfg.task.name}")
    return fig


def curriculum(run_dir: Path, out: str | Path | None = None, fmt: str = "png") -> Path:
    """Save the curriculum figure; returns its path."""
    path = _output(run_dir, out, fmt, "curriculum")
    return _save(curriculum_figure(run_dir), path)


# ---------------------------------------------------------------------------
# amft plot compare

COMPARE_PANELS = (("reward/mean", "reward (EMA)", True), ("policy/entropy", "entropy (EMA)\ndashed: on demos", True),
                  ("balance/mu", "μ", False))


def compare_figure(run_dirs: list[Path]) -> Figure:
    """Reward, entropy and μ of several runs overlaid: one line per run per panel (where logged)."""
    labels = run_labels(run_dirs)
    records = [read_metrics(d) for d in run_dirs]
    fig = Figure(figsize=(10, 9), layout="constrained")
    axes = fig.subplots(len(COMPARE_PANELS), 1, sharex=True)
    for ax, (key, ylabel, smooth) in zip(axes, COMPARE_PANELS):
        for i, (label, recs) in enumerate(zip(labels, records)):
            steps, values = series(recs, key)
            style = "-"
            if not steps and key == "policy/entropy":  # no rollouts (sft): entropy on demonstrations
                (steps, values), style = series(recs, "policy/entropy_demo"), "--"
            if steps:
                ax.plot(steps, ema(values) if smooth else values, color=COLORS[i % len(COLORS)],
                        linewidth=1.6, linestyle=style, label=label)
        if not ax.lines:
            _not_logged(ax, key)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    mus = [v for line in axes[-1].lines for v in line.get_ydata()]
    if mus:
        axes[-1].set_ylim(*mu_limits(mus))
    axes[-1].set_xlabel("step")
    handles = {line.get_label(): line for ax in axes for line in ax.lines}
    shown = [label for label in labels if label in handles]  # in the order the runs were named
    fig.legend([handles[label] for label in shown], shown, loc="outside right upper", frameon=False)
    fig.suptitle("Training curves compared")
    return fig


def _headline_metric(evals: list[dict]) -> str:
    """avg@k where any run sampled, else greedy accuracy (runs evaluated with --greedy)."""
    has_avg = any("avg@k" in rec["metrics"] for ev in evals for rec in ev.values())
    return "avg@k" if has_avg else "greedy_accuracy"


def compare_eval_figure(run_dirs: list[Path]) -> Figure | None:
    """Grouped bars: one group per eval split (ID first), one bar per run. None without eval results."""
    evals = [read_eval(d) for d in run_dirs]
    if not any(evals):
        return None
    labels, metric = run_labels(run_dirs), _headline_metric(evals)
    splits: dict[str, bool] = {}
    for ev in evals:
        for split, rec in ev.items():
            splits.setdefault(split, bool(rec["metrics"].get("ood")))
    order = sorted(splits, key=lambda s: splits[s])
    fig = Figure(figsize=(max(6, 1.2 * len(order) * max(1, len(run_dirs)) + 2), 5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(run_dirs)
    for i, (label, ev) in enumerate(zip(labels, evals)):
        heights = [ev[s]["metrics"].get(metric, math.nan) if s in ev else math.nan for s in order]
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(order))]
        bars = ax.bar(xs, heights, width=width * 0.95, color=COLORS[i % len(COLORS)], label=label)
        ax.bar_label(bars, labels=["" if math.isnan(h) else f"{100 * h:.0f}%" for h in heights], fontsize=8)
    ax.set_xticks(range(len(order)), [f"{s}\n({'OOD' if splits[s] else 'ID'})" for s in order])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(metric + (" (mean success over k samples)" if metric == "avg@k" else ""))
    ax.set_title(f"ID vs OOD eval: {metric}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def compare(run_dirs: list[Path], out: str | Path | None = None, fmt: str = "png") -> list[Path]:
    """Save the compared curves (and the ID-vs-OOD bars when any run has eval results).

    Default folder: the first run's plots/. Returns the paths written.
    """
    if not run_dirs:
        raise PlotError("plot compare: name at least one run directory")
    path = _output(run_dirs[0], out, fmt, "compare")
    written = [_save(compare_figure(run_dirs), path)]
    bars = compare_eval_figure(run_dirs)
    if bars is not None:
        written.append(_save(bars, path.with_name(f"{path.stem}-eval{path.suffix}")))
    return written


# ---------------------------------------------------------------------------
# amft plot eval


def eval_table_figure(run_dirs: list[Path]) -> Figure:
    """A table of every run's eval metrics, one row per run and split."""
    evals = []
    for d in run_dirs:
        ev = read_eval(d)
        if not ev:
            raise PlotError(f"{d}: no eval results in {Path(d) / 'eval'} (run `amft eval --run {d}`)")
        evals.append({split: rec["metrics"] for split, rec in ev.items()})
    extras = [m for m in EPISODE_METRICS if any(m in metrics for ev in evals for metrics in ev.values())]
    cells = []
    for label, ev in zip(run_labels(run_dirs), evals):
        header, rows = table_rows(ev, extras)
        cells += [[label] + row for row in rows]
    columns = ["run"] + header
    chars = [max(len(row[i]) for row in [columns] + cells) + 3 for i in range(len(columns))]  # + padding
    fig = Figure(figsize=(0.1 * sum(chars) + 0.4, 0.8 + 0.32 * (len(cells) + 1)), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=columns, colWidths=[c / sum(chars) for c in chars],
                     cellLoc="center", bbox=[0, 0, 1, 1])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#eeeeee")
    ax.set_title("Eval results", fontsize=12)
    return fig


def eval_table(run_dirs: list[Path], out: str | Path | None = None, fmt: str = "png") -> Path:
    """Save the eval table figure (default: the first run's plots/eval.png)."""
    if not run_dirs:
        raise PlotError("plot eval: name at least one run directory")
    return _save(eval_table_figure(run_dirs), _output(run_dirs[0], out, fmt, "eval"))
