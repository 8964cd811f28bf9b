"""What a person watching a run (or a sweep's grid of runs) sees: a rich Live view on a
terminal, plain lines elsewhere.

train.py feeds it the same flat metric dict it gives the metric sink, once
per step. On a terminal (and not under CI) a Live view shows the run, a
progress bar with ETA, sparklines of reward, accuracy, entropy and μ, and the
current losses and throughput; it refreshes at most 4 times a second, so a
fast loop pays only for building a few small tables. Off a terminal (logs,
pipes, CI) it prints one plain line every `log_every` steps and at the last
step. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections import deque
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

BLOCKS = "▁▂▃▄▅▆▇█"
HISTORY = 60  # sparkline length: the last ~60 steps

# (metric key, short label, decimals or None for the adaptive number format)
SPARK_KEYS = [("reward/mean", "reward", None), ("reward/accuracy", "accuracy", 2),
              ("reward/zero_std_frac", "no signal", 2), ("policy/entropy", "entropy", None),
              ("balance/mu", "mu", 3)]
PLAIN_KEYS = [("balance/mu", "mu", 3), ("reward/mean", "reward", None),
              ("reward/accuracy", "acc", 2), ("policy/entropy", "H", None)]
LOSS_KEYS = ["loss/sft", "loss/rl"]


# ---------------------------------------------------------------------------
# pure formatting helpers


def _finite(value: Any) -> float | None:
    """value as a float, or None when missing, non-numeric, NaN or inf."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def format_number(value: Any, decimals: int | None = None) -> str:
    """Short text for a metric: fixed decimals, or 2 decimals / 2-digit exponent when tiny or huge."""
    number = _finite(value)
    if number is None:
        return "n/a"
    if decimals is not None:
        return f"{number:.{decimals}f}"
    if number == 0 or 0.01 <= abs(number) < 1e4:
        return f"{number:.2f}"
    return f"{number:.2e}"


def format_duration(seconds: float) -> str:
    """'12s', '5m12s' or '3h07m'."""
    seconds = int(round(max(seconds, 0.0)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_rate(steps_per_s: float) -> str:
    """Steps per second when >= 1, else seconds per step (a 7B step takes tens of seconds)."""
    if steps_per_s >= 1:
        return f"{steps_per_s:.1f} step/s"
    return f"{1 / steps_per_s:.1f} s/step"


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """stdout's reader has gone (`amft train | head`). rich would exit 1 on the spot, losing
        the steps since the last checkpoint; instead the rest of the output goes to /dev/null,
        one line on stderr says so, and the process stops as on SIGTERM (training: after this
        step, with its checkpoint)."""
        self.quiet = True
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        print("stdout was closed by its reader: stopping (a run checkpoints its step first)", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)


def output_console(stderr: bool = False) -> Console:
    """A rich console that, off a terminal (a log file, a pipe, CI), never wraps a line: a message
    stays one line for whoever greps or parses the log (rich would break it at 80 columns)."""
    console = _Console(stderr=stderr)
    console.soft_wrap = not console.is_terminal
    return console


def sparkline(values: list[float | None], width: int) -> str:
    """The last `width` values as unicode blocks ▁..█ scaled to their own min..max.

    NaN, inf and None become a space (a gap); a constant series is a flat
    mid-height line. The result has min(width, len(values)) characters.
    """
    if width <= 0:
        return ""
    window = [_finite(v) for v in list(values)[-width:]]
    finite = [v for v in window if v is not None]
    if not finite:
        return " " * len(window)
    low, high = min(finite), max(finite)
    chars = []
    for v in window:
        if v is None:
            chars.append(" ")
        elif high == low:
            chars.append(BLOCKS[3])
        else:
            chars.append(BLOCKS[round((v - low) / (high - low) * (len(BLOCKS) - 1))])
    return "".join(chars)


def format_plain_line(step: int, total: int, metrics: dict[str, Any], steps_per_s: float | None) -> str:
    """One log line, e.g. 'step 120/500 | mu 0.812 | reward 1.23 | ... | 1.2 step/s | eta 5m12s'.

    Only keys present in `metrics` appear; rate and ETA only when the rate is known.
    """
    parts = [f"step {step}/{total}"]
    parts += [f"{label} {format_number(metrics[key], dec)}" for key, label, dec in PLAIN_KEYS if key in metrics]
    losses = " ".join(f"{key} {format_number(metrics[key])}" for key in LOSS_KEYS if key in metrics)
    if losses:
        parts.append(losses)
    rate = _finite(steps_per_s)
    if rate is not None and rate > 0:
        parts.append(format_rate(rate))
        parts.append(f"eta {format_duration((total - step) / rate)}")
    return " | ".join(parts)


# ---------------------------------------------------------------------------
# the dashboard


class Dashboard:
    """Live view or plain lines for one training run; use as a context manager.

    info: a few header fields, e.g. {"run": ..., "preset": ..., "algo": ...}.
    live: None picks rich Live only on a terminal outside CI. The live view runs
    only inside `with`; plain lines print with or without it.
    """

    def __init__(self, title: str, info: dict[str, str], total_steps: int, log_every: int = 10,
                 console: Console | None = None, live: bool | None = None):
        self.title = title
        self.info = dict(info)
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.console = console if console is not None else output_console()
        if live is None:
            live = self.console.is_terminal and os.environ.get("CI", "").lower() != "true"
        self.live = live
        self.step = 0
        self.latest: dict[str, Any] = {}
        self.history: dict[str, deque] = {key: deque(maxlen=HISTORY) for key, _, _ in SPARK_KEYS}
        self._marks: deque = deque(maxlen=50)  # (step, clock) of recent updates, for the rate
        self._clock = time.monotonic
        self._live: Live | None = None

    def __enter__(self) -> Dashboard:
        if self.live:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.stop()
            self._live = None

    def steps_per_s(self) -> float | None:
        """Rate over the recent updates; falls back to 1 / time/step_s before there are two."""
        if len(self._marks) >= 2:
            (s0, t0), (s1, t1) = self._marks[0], self._marks[-1]
            if t1 > t0 and s1 > s0:
                return (s1 - s0) / (t1 - t0)
        step_s = _finite(self.latest.get("time/step_s"))
        return 1 / step_s if step_s and step_s > 0 else None

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one step's metrics and redraw (live) or print a line (plain, every log_every)."""
        self.step = step
        self.latest = dict(metrics)
        self._marks.append((step, self._clock()))
        for key, series in self.history.items():
            if key in metrics:
                series.append(_finite(metrics[key]))
        if self._live is not None:
            self._live.update(self._render())
        elif not self.live and (step % self.log_every == 0 or step == self.total_steps):
            line = format_plain_line(step, self.total_steps, metrics, self.steps_per_s())
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        """A one-off line (e.g. 'warm-up done, H*=1.23'); printed above the live view."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    # -- live view ---------------------------------------------------------

    def _render(self) -> Group:
        header = Text(self.title, style="bold")
        for key, value in self.info.items():
            header.append(f"  {key} ", style="dim").append(str(value), style="cyan")
        return Group(header, self._progress_row(), self._panels())

    def _progress_row(self) -> Table:
        row = Table.grid(padding=(0, 2))
        rate = self.steps_per_s()
        remaining = self.total_steps - self.step
        eta = format_duration(remaining / rate) if rate else "?"
        row.add_row(f"step {self.step}/{self.total_steps}",
                    ProgressBar(total=max(self.total_steps, 1), completed=self.step, width=40),
                    f"{100 * self.step / max(self.total_steps, 1):.0f}%",
                    format_rate(rate) if rate else "",
                    f"eta {eta}")
        return row

    def _panels(self) -> Table:
        # the sparklines take what the labels, values and the "now" panel leave (~48 columns);
        # padded to full width so the panel does not grow during the first steps
        width = max(10, min(HISTORY, self.console.width - 48))
        sparks = Table.grid(padding=(0, 1))
        for key, label, dec in SPARK_KEYS:
            if self.history[key]:
                value = format_number(self.latest.get(key), dec)
                line = sparkline(list(self.history[key]), width).rjust(width)
                sparks.add_row(label, Text(line, style="green"), value)
        current = Table.grid(padding=(0, 2))
        current.add_column()
        current.add_column(justify="right", min_width=8)  # steady width as formats change
        rate = _finite(self.latest.get("rollout/tokens_per_s"))
        rows = [(key, format_number(self.latest[key])) for key in LOSS_KEYS + ["loss/total"] if key in self.latest]
        if rate is not None:
            rows.append(("tokens/s", f"{rate:,.0f}"))
        if "time/step_s" in self.latest:
            rows.append(("step time", f"{format_number(self.latest['time/step_s'])} s"))
        for name, value in rows:
            current.add_row(name, value)
        layout = Table.grid(padding=(0, 1))
        layout.add_row(Panel(sparks, title=f"last {width} steps", title_align="left"),
                       Panel(current, title="now", title_align="left"))
        return layout


# ---------------------------------------------------------------------------
# a grid of runs (amft sweep)


class GridProgress:
    """Progress over a sweep's cells: on a terminal a rich bar for the grid and one per running
    cell (train steps, then eval); elsewhere plain lines when a cell's phase starts, at each
    quarter of its training and when it ends. Thread-safe: cells report from worker threads."""

    def __init__(self, total: int, console: Console | None = None, live: bool | None = None):
        self.console = console if console is not None else output_console()
        if live is None:
            live = self.console.is_terminal and os.environ.get("CI", "").lower() != "true"
        self.live, self.total, self.finished = live, total, 0
        self._lock = threading.Lock()
        self._bars: dict[str, Any] = {}
        self._quarters: dict[str, tuple[str, int]] = {}  # last (phase, quarter) printed per cell, plain mode
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=self.console, disable=not live)
        self._grid = self._progress.add_task("grid (cells)", total=total)

    def __enter__(self) -> GridProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def event(self, cell: str, phase: str, done: int, total: int) -> None:
        """cell reached `done` of `total` in phase 'prepare' (the shared data), 'train' (steps) or
        'eval'. Off a terminal a line is printed when a phase starts and at each quarter of its steps."""
        with self._lock:
            label = f"  {cell} {phase}"
            if cell not in self._bars:
                self._bars[cell] = self._progress.add_task(label, total=total)
            self._progress.update(self._bars[cell], description=label, completed=done, total=total)
            quarter = (phase, 4 * done // max(total, 1))
            if not self.live and self._quarters.get(cell) != quarter:
                self._quarters[cell] = quarter
                what = f"{phase} step {done}/{total}" if phase == "train" and done else f"{phase} ..."
                self.console.print(f"{cell}: {what}", markup=False, highlight=False)

    def done(self, cell: str, line: str) -> None:
        """A cell ended; line says how (printed above the bars, or as a plain line)."""
        with self._lock:
            self.finished += 1
            self._quarters.pop(cell, None)
            if cell in self._bars:
                self._progress.remove_task(self._bars.pop(cell))
            self._progress.advance(self._grid)
            self.console.print(f"[{self.finished}/{self.total}] {line}", markup=False, highlight=False)
