"""The `amft` command: prepare, train, eval, plot, presets. Thin: parse, resolve, call one engine function.

User mistakes (bad preset, key, value, path) end in one red line and exit code 2.
"""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from amft_cli import methods
from amft_cli.config import Config, ConfigError, apply_overrides, field_help, list_presets, load_preset, validate

# transformers' per-shard "Loading weights" bars would tear through the live dashboard
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

DEFAULT_PRESET = "tiny-math"
console = Console()
err_console = Console(stderr=True)
app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="AMFT: SFT and RL in one stage with a learned balance μ, and its baselines, in one engine.")
plot_app = typer.Typer(help="Figures from run directories (PNG under RUN/plots/ by default).")
app.add_typer(plot_app, name="plot")

PRESET = typer.Option(None, "--preset", "-p", help=f"Preset name in presets/ or a path to a TOML file "
                      f"(default: {DEFAULT_PRESET}). `amft presets` lists them.")
SET = typer.Option(None, "--set", "-s", help="Override a config key, e.g. --set train.lr=1e-5 (repeatable; "
                   "type-checked). `amft presets --keys` lists every key.")
SEED = typer.Option(None, "--seed", help="Global seed (model init, data order, sampling); same as --set seed=N.")


def resolve_config(preset: str | None, overrides: list[str] | None, seed: int | None = None,
                   algo: str | None = None, steps: int | None = None) -> Config:
    """Preset (or the embedded default) + shortcuts + --set overrides, validated."""
    cfg = load_preset(preset or DEFAULT_PRESET)
    shortcuts = [f"{k}={v}" for k, v in (("seed", seed), ("train.algo", algo), ("train.steps", steps)) if v is not None]
    cfg = validate(apply_overrides(cfg, shortcuts + list(overrides or [])))
    methods.check(cfg.train.algo)
    return cfg


def preset_name(preset: str | None) -> str:
    """'tiny-gp' -> 'tiny-gp', 'path/to/x.toml' -> 'x' (dots inside names like math-qwen2.5 are kept)."""
    preset = preset or DEFAULT_PRESET
    return Path(preset).stem if preset.endswith(".toml") else Path(preset).name


def default_run_dir(preset: str | None, cfg: Config, algo: str | None, seed: int | None) -> Path:
    name = preset_name(preset)
    name += f"-{algo}" if algo else ""
    name += f"-s{seed}" if seed is not None else ""
    return Path("runs") / name


# ---------------------------------------------------------------------------
# commands


@app.command()
def presets(keys: bool = typer.Option(False, "--keys", help="List every config key with its documentation.")):
    """List the presets with one-line descriptions (or every config key)."""
    from rich.table import Table

    table = Table("key" if keys else "preset", "what it is / does", show_lines=False)
    rows = field_help().items() if keys else list_presets().items()
    for name, text in rows:
        table.add_row(name, text)
    console.print(table)


@app.command()
def prepare(preset: Optional[str] = PRESET, overrides: Optional[List[str]] = SET, seed: Optional[int] = SEED,
            force: bool = typer.Option(False, "--force", help="Rebuild data and tiny model even if present."),
            eval_only: bool = typer.Option(False, "--eval-only", help="Only the evaluation splits (math: no training "
                                           "set needed); `amft eval` does this by itself.")):
    """Generate the task's data splits (and build the tiny model for CPU presets)."""
    from amft_cli.data import prepare as prepare_data

    cfg = resolve_config(preset, overrides, seed)
    with console.status(f"preparing {cfg.task.name} data in {cfg.task.data_dir}/ ..."):
        prepare_data(cfg, force=force, log=console.print, eval_only=eval_only)


@app.command()
def train(preset: Optional[str] = PRESET, overrides: Optional[List[str]] = SET, seed: Optional[int] = SEED,
          algo: Optional[str] = typer.Option(None, "--algo", help=f"{' | '.join(methods.names())} (train.algo; "
                                             "each method's knobs are the config section of its name)."),
          steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (train.steps)."),
          run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/<preset>[-<algo>][-s<seed>])."),
          resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in the run directory."),
          live: Optional[bool] = typer.Option(None, "--live/--plain", help="Force the live dashboard or plain log lines (default: live on a terminal).")):
    """Train with the preset's algo (default: AMFT on tiny-math, CPU, a few minutes)."""
    if resume is not None:
        if not (resume / "config.toml").is_file():
            raise ConfigError(f"--resume {resume}: no config.toml there — is it a run directory?")
        cfg, out = resolve_config(str(resume / "config.toml"), overrides, seed, algo, steps), resume
    else:
        cfg = resolve_config(preset, overrides, seed, algo, steps)
        out = run_dir or default_run_dir(preset, cfg, algo, seed)
        if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
            if not overwrite:
                raise ConfigError(f"{out} already holds a run: --resume {out} continues it, --overwrite replaces "
                                  f"it, --run-dir picks another directory")
            shutil.rmtree(out)
    # imported only now so that config mistakes are reported without loading torch (~3 s)
    from amft_cli.dashboard import Dashboard
    from amft_cli.data import is_prepared, prepare as prepare_data
    from amft_cli.train import train as run_training

    if not is_prepared(cfg):
        console.print(f"[dim]data or model for {cfg.task.name} missing: preparing first[/]")
        prepare_data(cfg, log=console.print)
    info = {"run": str(out), "preset": preset_name(preset), "algo": cfg.train.algo}
    with Dashboard("amft-cli train", info, cfg.train.steps, cfg.train.log_every, live=live) as dash:
        result = run_training(cfg, out, resume=resume is not None, on_metrics=dash.update, on_message=dash.message)
    summary = result.summary
    if "before" in summary and "after" in summary:
        b, a = summary["before"], summary["after"]
        console.print(f"[bold]{a['label']} on {a['n']} unseen ID test examples: "
                      f"untrained {b['value']:.1%} → trained {a['value']:.1%}[/]")
    console.print(f"run directory: {out}  (next: amft eval --run {out} --ood ; amft plot curriculum {out})")
    if result.interrupted:
        raise typer.Exit(130)


@app.command("eval")
def eval_cmd(run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: the most recent under runs/)."),
             model: Optional[Path] = typer.Option(None, "--model", help="Evaluate any model folder instead of a run (task from --preset)."),
             preset: Optional[str] = PRESET, overrides: Optional[List[str]] = SET,
             step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: the latest)."),
             split: str = typer.Option("id", "--split", help="id | ood | all."),
             ood: bool = typer.Option(False, "--ood", help="Shortcut for --split all (ID and OOD)."),
             k: Optional[int] = typer.Option(None, "--k", help="Samples per prompt for avg@k / pass@k (eval.k)."),
             temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (eval.temperature)."),
             top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling (eval.top_p)."),
             greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding only (no samples)."),
             max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Completion length cap (eval.max_new_tokens)."),
             limit: Optional[int] = typer.Option(None, "--limit", help="First N examples of each split (eval.limit)."),
             batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Completions generated together (eval.batch_size).")):
    """avg@k, pass@k and greedy accuracy on ID (and OOD) test splits; writes RUN/eval/<split>.json."""
    from amft_cli import evaluate, rundir

    if split not in ("id", "ood", "all"):
        raise ConfigError(f"--split {split!r}: expected id, ood or all")
    which = "all" if ood else split
    if model is not None:
        cfg, model_path, out = resolve_config(preset, overrides), model, model / "eval"
    else:
        if run is None:
            run = rundir.latest_run()
            console.print(f"[dim]using the most recent run: {run}[/]")
        cfg = validate(apply_overrides(rundir.read_config(run), list(overrides or [])))
        model_path, out = rundir.resolve_checkpoint(run, step), run / "eval"
    e = cfg.eval
    results = evaluate.run_eval(
        cfg, model_path, out, which, k=k, temperature=e.temperature if temperature is None else temperature,
        top_p=top_p or e.top_p, greedy_only=greedy, max_new_tokens=max_new_tokens or e.max_new_tokens,
        limit=e.limit if limit is None else limit, batch_size=batch_size or e.batch_size, seed=cfg.seed,
        log=console.print)
    console.print(evaluate.results_table(results))
    console.print(f"[dim]wrote {out}/<split>.json and <split>.samples.jsonl[/]")


def _plot_run(run: Path | None) -> Path:
    from amft_cli import rundir

    if run is None:
        run = rundir.latest_run()
        console.print(f"[dim]using the most recent run: {run}[/]")
    return run


OUT = typer.Option(None, "--out", help="Output file (default RUN/plots/<figure>.<format>).")
FMT = typer.Option("png", "--format", help="png | svg | pdf.")


@plot_app.command("curriculum")
def plot_curriculum(run: Optional[Path] = typer.Argument(None, help="Run directory (default: most recent)."),
                    out: Optional[Path] = OUT, fmt: str = FMT):
    """μ, reward/accuracy and entropy vs step; warm-up shaded, meta-updates marked, H* drawn."""
    from amft_cli import plot

    console.print(f"wrote {plot.curriculum(_plot_run(run), out=out, fmt=fmt)}")


@plot_app.command("compare")
def plot_compare(runs: List[Path] = typer.Argument(..., help="Run directories to overlay."),
                 out: Optional[Path] = OUT, fmt: str = FMT):
    """Training curves of several runs overlaid, plus ID-vs-OOD bars when they have eval results."""
    from amft_cli import plot

    for path in plot.compare(runs, out=out, fmt=fmt):
        console.print(f"wrote {path}")


@plot_app.command("eval")
def plot_eval(runs: List[Path] = typer.Argument(..., help="Run directories with eval results."),
              out: Optional[Path] = OUT, fmt: str = FMT):
    """A table figure of the runs' eval metrics."""
    from amft_cli import plot

    console.print(f"wrote {plot.eval_table(runs, out=out, fmt=fmt)}")


def _is_user_error(e: BaseException) -> bool:
    """Our modules raise ValueError (ConfigError, ModelError, ...) only for user mistakes; one
    raised inside torch or transformers is a bug to show in full (AMFT_DEBUG=1 shows every one)."""
    if os.environ.get("AMFT_DEBUG") == "1":
        return False
    frames = traceback.extract_tb(e.__traceback__)
    return isinstance(e, FileNotFoundError) or not frames or "amft_cli" in frames[-1].filename


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback."""
    # ModelError, RunDirError, EvalError and PlotError are ValueErrors: importing their modules
    # here would load torch and transformers (~3 s) before every --help or one-line error.
    try:
        app()
    except (ValueError, FileNotFoundError) as e:
        if not _is_user_error(e):
            raise
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[red]aborted[/]")
        sys.exit(130)
