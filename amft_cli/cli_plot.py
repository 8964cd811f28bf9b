"""`amft plot ...`: figures from run and sweep folders (the drawing is in plot.py and plot_sweep.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from amft_cli.dashboard import output_console

console = output_console()
app = typer.Typer(help="Figures from run directories (PNG under RUN/plots/ by default)."
                       "\n\nExample: amft plot curriculum runs/tiny-math")


def _plot_run(run: Path | None) -> Path:
    from amft_cli import rundir

    if run is None:
        run = rundir.latest_run()
        console.print(f"[dim]using the most recent run: {run}[/]")
    return run


def out_option(default: str):
    return typer.Option(None, "--out", help=f"Output file (default {default}).")


FMT = typer.Option("png", "--format", help="png | svg | pdf.")


@app.command("curriculum")
def plot_curriculum(run: Optional[Path] = typer.Argument(None, help="Run directory (default: the most recently "
                                                                   "trained under runs/)."),
                    out: Optional[Path] = out_option("RUN/plots/curriculum.<format>"), fmt: str = FMT):
    """μ, reward/accuracy and entropy vs step; warm-up shaded, meta-updates marked, H* drawn, and
    where each controller term alone would take μ (dotted).

    Example: amft plot curriculum runs/tiny-math --format svg
    """
    from amft_cli import plot

    console.print(f"wrote {plot.curriculum(_plot_run(run), out=out, fmt=fmt)}")


@app.command("compare")
def plot_compare(runs: List[Path] = typer.Argument(..., help="Run directories to overlay."),
                 out: Optional[Path] = out_option("the first run's plots/compare.<format>; compare-eval."
                                                  "<format> beside it for the eval bars"),
                 fmt: str = FMT):
    """Training curves of several runs overlaid, plus ID-vs-OOD bars when they have eval results.

    Example: amft plot compare runs/tiny-gp runs/tiny-gp-sft runs/tiny-gp-rl
    """
    from amft_cli import plot

    for path in plot.compare(runs, out=out, fmt=fmt):
        console.print(f"wrote {path}")


@app.command("eval")
def plot_eval(runs: List[Path] = typer.Argument(..., help="Run directories with eval results."),
              out: Optional[Path] = out_option("the first run's plots/eval.<format>"), fmt: str = FMT):
    """A table figure of the runs' eval metrics.

    Example: amft plot eval runs/tiny-gp runs/tiny-gp-sft
    """
    from amft_cli import plot

    console.print(f"wrote {plot.eval_table(runs, out=out, fmt=fmt)}")


@app.command("sweep")
def plot_sweep(folder: Path = typer.Argument(..., help="Sweep folder (sweeps/<name>) with its table.json."),
               out: Optional[Path] = out_option("SWEEP/plots/sweep.<format>"), fmt: str = FMT):
    """Per-method bars with 95 % intervals over seeds (ID and OOD), the paired differences with the
    sweep's --baseline if it had one, and learning curves with bands.

    Example: amft plot sweep sweeps/tiny-gp
    """
    from amft_cli.plot_sweep import sweep

    console.print(f"wrote {sweep(folder, out=out, fmt=fmt)}")
