"""The `amft` command: prepare, train, eval, plot, presets. Thin: parse, resolve, call one engine function.

User mistakes (bad preset, key, value, path) end in one red line and exit code 2; the
exit codes are listed in report.EXIT_CODES and `amft --help`. With --json, stdout
carries one JSON document and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from amft_cli import cli_compare, cli_export, cli_plot, methods, parallel, report
from amft_cli.cli_options import (DEFAULT_PRESET, FAIL_UNDER, JSON_OUT, PRESET, SEED, SET, default_run_dir,
                                  emit_json, eval_flag_sets, is_user_error, preset_name, resolve_config, root,
                                  run_app, stdout_reserved)
from amft_cli.config import Config, ConfigError, validate
from amft_cli.config_io import apply_overrides, field_help, list_presets
from amft_cli.dashboard import output_console

# transformers' per-shard "Loading weights" bars would tear through the live dashboard
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# OpenMP threads that spin while waiting are starved on a shared CPU: measured here under load
# (SmolLM2-135M, 2 threads, one KV-cache decode step) 8.8-10.7 s spinning vs 0.6-0.9 s passive,
# where 1 thread took 0.5-0.6 s. Read when torch loads (after this line, lazily).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

console = output_console()
err_console = output_console(stderr=True)
EXIT_CODES_HELP = "\b\nExit codes:\n" + report.exit_code_table()
app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="AMFT: SFT and RL in one stage with a learned balance μ, and its baselines, in one engine."
                       "\n\nExample: amft train --preset tiny-math && amft eval --ood",
                  epilog=EXIT_CODES_HELP)
app.callback()(root)
app.add_typer(cli_plot.app, name="plot")
app.command("export", epilog=EXIT_CODES_HELP)(cli_export.export_cmd)
app.command("compare", epilog=EXIT_CODES_HELP)(cli_compare.compare_cmd)


def exit_on_failed_gate(rows: list[dict]) -> None:
    """One stderr line per threshold not met, then exit code 3 (report.EXIT_BELOW_THRESHOLD)."""
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        value = f"{r['value']:.4g}" if isinstance(r["value"], (int, float)) else str(r["value"])
        err_console.print(f"[bold red]below threshold:[/] {r['metric']} = {value} < {r['minimum']:g} "
                          f"(--fail-under {r['metric']}={r['minimum']:g})", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(report.EXIT_BELOW_THRESHOLD)


# ---------------------------------------------------------------------------
# commands


@app.command()
def presets(keys: bool = typer.Option(False, "--keys", help="List every config key with its documentation.")):
    """List the presets with one-line descriptions (or every config key).

    Example: amft presets --keys
    """
    from rich.table import Table

    table = Table("key" if keys else "preset", "what it is / does", show_lines=False)
    rows = field_help().items() if keys else list_presets().items()
    for name, text in rows:
        table.add_row(name, text)
    console.print(table)


def prepare_with_progress(cfg: Config, force: bool = False, eval_only: bool = False) -> None:
    """data.prepare with a spinner, and a progress bar while the tiny model pre-trains
    (plain lines every 10% off a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from amft_cli.data import prepare as prepare_data

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"preparing {cfg.task.name} data in {cfg.task.data_dir}/", total=None)

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(task, description=f"pre-training the tiny model (loss {loss:.3f})", completed=step, total=total)
            if not console.is_terminal and step % max(1, total // 10) == 0:
                console.print(f"pre-training step {step}/{total}: loss {loss:.3f}")

        prepare_data(cfg, force=force, log=console.print, eval_only=eval_only, on_pretrain_step=on_step)


@app.command()
def prepare(preset: Optional[str] = PRESET, overrides: Optional[List[str]] = SET, seed: Optional[int] = SEED,
            force: bool = typer.Option(False, "--force", help="Rebuild data and tiny model even if present."),
            eval_only: bool = typer.Option(False, "--eval-only", help="Only the evaluation splits (math: no training "
                                           "set needed); `amft eval` does this by itself.")):
    """Generate the task's data splits (and build, and pre-train where configured, the tiny model of CPU presets).

    Example: amft prepare --preset tiny-gp
    """
    from amft_cli.data import stale_parts
    from amft_cli.datalock import reading

    cfg, built = resolve_config(preset, overrides, seed), []

    def parts() -> list[str]:  # what is left to build: with --force everything, once
        return [] if built else stale_parts(cfg, eval_only, force)

    with reading(cfg, lambda: built.append(prepare_with_progress(cfg, force=force, eval_only=eval_only)), parts,
                 forcing=force):
        if not built:
            console.print(f"{cfg.task.data_dir}/ is current for this config (--force rebuilds it)")


@contextlib.contextmanager
def _train_target(preset, overrides, seed, algo, steps, run_dir, resume, overwrite, auto_resume):
    """(config, run directory, whether to continue its run) of `amft train`, held under the
    directory's lock (one writer per run, taken before anything is written). An existing run is
    replaced only with --overwrite, continued with --resume DIR or --auto-resume. Several
    processes (torchrun, accelerate launch): every one checks, the main one locks and writes."""
    from amft_cli.rundir import RunLock, clear_run, foreign_files, holds_run, shape_differences

    if auto_resume and (resume is not None or overwrite):
        raise ConfigError("--auto-resume picks between starting and continuing itself: drop --resume/--overwrite")
    other_dir = run_dir is not None and resume is not None and run_dir.resolve() != resume.resolve()
    ignored = [flag for flag, given in (("--preset", preset), ("--run-dir", other_dir), ("--overwrite", overwrite)) if given]
    if resume is not None and ignored:  # the run's own config.toml and folder are what --resume continues
        raise ConfigError(f"--resume {resume} continues that run with its own config.toml: drop {', '.join(ignored)}")
    if resume is not None and not resume.is_dir():
        raise ConfigError(f"--resume {resume}: no such directory")
    cfg = resolve_config(preset, overrides, seed, algo, steps) if resume is None else None
    out = resume if resume is not None else run_dir or default_run_dir(preset, cfg, algo, seed)
    dist, resuming = parallel.current(), resume is not None
    foreign = foreign_files(out) if not (resuming or auto_resume or overwrite) else []  # a scheduler's log: fine
    if foreign:  # checked before the lock, which would leave its file among them
        raise ConfigError(f"{out} holds files that are not a run's ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}): pick a new or empty --run-dir, or pass "
                          f"--overwrite to train there anyway (files that are not a run's are kept)")
    with RunLock(out) if dist.is_main else contextlib.nullcontext():
        if resume is not None:
            if not (resume / "config.toml").is_file():
                raise ConfigError(f"--resume {resume}: no config.toml there — is it a run directory?")
            cfg = resolve_config(str(resume / "config.toml"), overrides, seed, algo, steps)
            reshaped = shape_differences(resume, cfg)
            if reshaped:
                raise ConfigError(f"--resume {resume}: {'; '.join(reshaped)}: the weights cannot change shape "
                                  "(--overwrite starts afresh)")
        elif holds_run(out) and auto_resume:
            resuming = _continues(out, cfg)
            dist.barrier()  # every process has read the run before the main one clears it
            if not resuming and dist.is_main:
                console.print(f"--auto-resume: {out} holds no checkpoint to continue; starting the run afresh")
                clear_run(out)
        elif holds_run(out):
            if not overwrite:
                raise ConfigError(f"{out} already holds a run: --resume {out} continues it, --overwrite replaces "
                                  f"it, --auto-resume continues it if it is this config's, --run-dir picks another")
            if dist.is_main:
                clear_run(out)
        dist.barrier()  # every process has looked before the main one writes
        yield cfg, out, resuming


def _continues(out: Path, cfg: Config) -> bool:
    """--auto-resume on a directory holding a run (a scheduler restarting the same command): continue
    it if it is a run of cfg (train.steps may differ, as with --resume --steps), else refuse; a run
    that never reached a checkpoint has nothing to continue and is started afresh."""
    from amft_cli.rundir import CONFIG_FILE, checkpoints, config_differences

    differ = config_differences(out, cfg, ignore=("train.steps",)) if (out / CONFIG_FILE).is_file() else []
    if differ:
        raise ConfigError(f"--auto-resume: {out} holds a run with another config ({', '.join(differ[:5])} differ): "
                          f"--resume {out} continues it with these settings, --overwrite replaces it")
    return bool(checkpoints(out))


@app.command(epilog=EXIT_CODES_HELP)
def train(preset: Optional[str] = PRESET, overrides: Optional[List[str]] = SET, seed: Optional[int] = SEED,
          algo: Optional[str] = typer.Option(None, "--algo", help=f"{' | '.join(methods.names())} (train.algo; "
                                             "each method's knobs are the config section of its name)."),
          steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (train.steps)."),
          run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/<preset>[-<algo>][-s<seed>])."),
          resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in the run directory "
                                         "(other files there are kept)."),
          auto_resume: bool = typer.Option(False, "--auto-resume", help="Continue the run in the run directory if "
                                           "it is this config's, else start it: one command for a job's first start "
                                           "and its restarts (a requeued Slurm job)."),
          live: Optional[bool] = typer.Option(None, "--live/--plain", help="Force the live dashboard or plain log lines (default: live on a terminal)."),
          json_out: bool = JSON_OUT):
    """Train with the preset's algo (default: AMFT on tiny-math, CPU, a few minutes).

    Example: amft train --preset tiny-gp --algo sft --seed 1 --steps 600
    """
    with stdout_reserved(json_out) as stdout, \
            _train_target(preset, overrides, seed, algo, steps, run_dir, resume, overwrite, auto_resume) as (cfg, out,
                                                                                                 resuming):
        # imported only now so that config mistakes are reported without loading torch (~3 s)
        from amft_cli.datalock import reading

        def prepare_first() -> None:
            console.print(f"[dim]data or model for {cfg.task.name} missing or stale: preparing first[/]")
            prepare_with_progress(cfg)

        dist = parallel.current()  # the main process prepares and reads under the data folder's lock
        with reading(cfg, prepare_first) if dist.is_main else contextlib.nullcontext():
            dist.barrier()  # the others read what the main process prepared
            result = _train_and_report(cfg, out, resuming, live, json_out, stdout)
    if result.interrupted:
        raise typer.Exit(report.EXIT_INTERRUPTED)


def _train_and_report(cfg: Config, out: Path, resuming: bool, live: bool | None, json_out: bool, stdout):
    """`amft train`'s run: the dashboard (or plain lines) on the main process, the before → after line."""
    from amft_cli.dashboard import Dashboard
    from amft_cli.train import train as run_training

    if not parallel.current().is_main:  # the main process reports for all
        return run_training(cfg, out, resume=resuming)
    info = {"run": str(out), "preset": cfg.preset, "algo": cfg.train.algo}
    if parallel.current().count > 1:
        info["processes"] = parallel.current().count
    with Dashboard("amft-cli train", info, cfg.train.steps, cfg.train.log_every, live=live) as dash:
        result = run_training(cfg, out, resume=resuming, on_metrics=dash.update, on_message=dash.message)
    summary = result.summary
    if "before" in summary and "after" in summary:
        b, a = summary["before"], summary["after"]
        console.print(f"[bold]{a['label']} on {a['n']} unseen ID test examples: "
                      f"before training {b['value']:.1%} → after {a['value']:.1%}[/]")
    console.print(f"run directory: {out}  (next: amft eval --run {out} --ood ; amft plot curriculum {out})")
    if json_out:
        emit_json(report.train_document(cfg, out, result), stdout)
    return result


def _eval_target(run: Path | None, model: Path | None, preset: str | None, overrides: list[str] | None,
                 step: int | None, out: Path | None) -> tuple[Config, Path, Path | None, Path]:
    """(config, model folder, run directory or None, output folder) of `amft eval`."""
    from amft_cli import rundir

    if model is not None:
        if run is not None:
            raise ConfigError("--run and --model: give one (a run directory, or a model folder with --preset)")
        cfg = resolve_config(preset, overrides)
        return cfg, model, None, out or rundir.model_eval_dir(model, cfg.preset)
    if run is None:
        run = rundir.latest_run()
        console.print(f"[dim]using the most recent run: {run}[/]")
    cfg = validate(apply_overrides(rundir.read_config(run), list(overrides or [])))
    return cfg, rundir.resolve_checkpoint(run, step), run, out or rundir.eval_dir(run)


@app.command("eval", epilog=EXIT_CODES_HELP)
def eval_cmd(run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: the most recently trained under runs/)."),
             model: Optional[Path] = typer.Option(None, "--model", help="Evaluate any model folder instead of a run (task from --preset); "
                                                  "results go to runs/eval-<preset>-<folder name>/eval/, never into the model folder."),
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
             batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Completions generated together (eval.batch_size)."),
             out: Optional[Path] = typer.Option(None, "--out", help="Folder for <split>.json and <split>.samples.jsonl "
                                                "(default RUN/eval, or runs/eval-<preset>-<model>/eval with --model)."),
             json_out: bool = JSON_OUT, fail_under: Optional[List[str]] = FAIL_UNDER):
    """avg@k, pass@k and greedy accuracy on ID (and OOD) test splits; writes <split>.json per split.

    Example: amft eval --run runs/tiny-math --ood --json --fail-under id.greedy=0.9
    """
    from amft_cli import evaluate, rundir

    thresholds = [report.parse_threshold(spec) for spec in fail_under or []]
    if split not in evaluate.SPLIT_CHOICES:
        raise ConfigError(f"--split {split!r}: expected id, ood or all")
    which = "all" if ood else split
    flags = eval_flag_sets(k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, limit=limit,
                           batch_size=batch_size)
    with stdout_reserved(json_out) as stdout:
        cfg, model_path, run, out = _eval_target(run, model, preset, [*(overrides or []), *flags], step, out)
        report.check_plan(thresholds, evaluate.eval_plan(cfg, which, k, greedy, on_disk=False),
                          list(evaluate.eval_plan(cfg, "all", on_disk=False)))
        e = cfg.eval  # k stays None unless given: then each set uses its own default (AIME: 32)
        results = evaluate.run_eval(cfg, model_path, out, which, k=k, temperature=e.temperature, top_p=e.top_p,
                                    greedy_only=greedy, max_new_tokens=e.max_new_tokens, limit=e.limit,
                                    batch_size=e.batch_size, seed=cfg.seed, log=console.print)
        console.print(evaluate.results_table(results))
        files = [str(f) for split_name in results for f in rundir.split_files(out, split_name)]
        console.print(f"[dim]wrote {', '.join(files)}[/]", highlight=False)
        blocks = report.eval_blocks(results)
        gate = report.gate(thresholds, blocks)
        if json_out:
            emit_json({"command": "eval", "preset": cfg.preset or None, "task": cfg.task.name,
                       "algo": cfg.train.algo if run is not None else None, "run": str(run) if run else None,
                       "model": str(model_path), "step": rundir.checkpoint_step(model_path), "out": str(out),
                       **blocks, "thresholds": gate, "files": files}, stdout)
    exit_on_failed_gate(gate)


# ---------------------------------------------------------------------------
# amft sweep


@app.command("sweep", epilog=EXIT_CODES_HELP)
def sweep_cmd(preset: Optional[str] = PRESET, overrides: Optional[List[str]] = SET,
              algos: str = typer.Option("all", "--algo", help=f"Comma-separated methods ({', '.join(methods.names())}) "
                                        "or all."),
              seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds or a range, e.g. 0,1,2 or 0-4."),
              steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps of every run (train.steps)."),
              name: Optional[str] = typer.Option(None, "--name", help="Sweep folder under sweeps/ (default: the preset's name)."),
              jobs: int = typer.Option(1, "--jobs", min=1, help="Runs trained at once (each gets cores/jobs threads "
                                       "unless OMP_NUM_THREADS is set)."),
              k: Optional[int] = typer.Option(None, "--k", help="Eval samples per example (eval.k)."),
              limit: Optional[int] = typer.Option(None, "--limit", help="Eval examples per split (eval.limit)."),
              baseline: Optional[str] = typer.Option(None, "--baseline", help="Also tabulate each method minus this "
                                                     "one on the same seeds (a paired t-interval), e.g. sft."),
              live: Optional[bool] = typer.Option(None, "--live/--plain", help="Force the live progress view or plain "
                                                  "lines (default: live on a terminal)."),
              json_out: bool = JSON_OUT):
    """Train and evaluate every method × seed, ID and OOD; tables in sweeps/NAME/.

    table.{md,csv,json}: per-method means and 95 % t-intervals over seeds.

    Rerunning the same command continues: finished runs are kept, interrupted ones resumed.
    A run that fails is named with its log and the sweep exits 1 after the others.

    Example: amft sweep --preset tiny-gp --algo sft,rl,sft-rl,mix,amft --seeds 0,1,2
    """
    from amft_cli import sweep

    sets = list(overrides or []) + ([f"train.steps={steps}"] if steps is not None else [])
    eval_flag_sets(k=k, limit=limit)  # checked here; the cells get them as --k/--limit
    algo_list = sweep.parse_algos(algos)
    grid = sweep.Grid(sweep.parse_name(name or preset_name(preset)), preset or DEFAULT_PRESET, algo_list,
                      sweep.parse_seeds(seeds), sets, k, limit, sweep.parse_baseline(baseline, algo_list))
    with stdout_reserved(json_out) as stdout:
        table, outcomes = sweep.run(grid, jobs, live, console)
        console.print(f"wrote {', '.join(table['files'])}  (next: amft plot sweep {grid.folder})", highlight=False)
        if json_out:
            emit_json(table, stdout)
    if any(o.status == "interrupted" for o in outcomes):
        raise typer.Exit(report.EXIT_INTERRUPTED)
    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(report.EXIT_BUG)


class Interrupted(BaseException):
    """Ctrl-C, or SIGTERM in a single process, outside the training loop's own handler (typer turns a
    KeyboardInterrupt into a silent exit 130, so main's handler raises this instead and says what
    happened); `finally` blocks run, e.g. `amft prepare` removes its half-built model."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, frame):
    if signum == signal.SIGTERM:  # a repeat (Slurm signals every process; a sweep passes its own on) changes nothing
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback."""
    signal.signal(signal.SIGINT, _interrupt)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # torchrun's SIGTERM to several must end them at once
        signal.signal(signal.SIGTERM, _interrupt)
    code = 1
    try:
        _main()
    except SystemExit as e:  # how typer and _main end
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str) and parallel.several():  # shutdown leaves before Python prints it
            print(e.code, file=sys.stderr)
        raise
    except BaseException:
        if parallel.several():  # a library's bug keeps its traceback
            traceback.print_exc()
        raise
    finally:
        if code == report.EXIT_INTERRUPTED:  # Python's teardown resets handlers: a repeat SIGTERM would kill it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        parallel.shutdown(code)


AFTER_INTERRUPT = {"train": "a run keeps its last checkpoint: --resume continues it",
                   "sweep": "finished cells are kept: the same command continues"}


def _main() -> None:
    # ModelError, RunDirError, EvalError and PlotError are ValueErrors: importing their modules
    # here would load torch and transformers (~3 s) before every --help or one-line error.
    try:
        run_app(app)
    except (ValueError, FileNotFoundError) as e:
        if not is_user_error(e):
            raise
        if os.environ.get("RANK", "0") != "0":  # one of several processes (torchrun sets RANK): every one
            sys.exit(2)                          # meets the same mistake, the main one says it
        # escaped: a message's "[a, b]" is text, not rich markup
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as e:
        by = "SIGTERM" if getattr(e, "signum", None) == signal.SIGTERM else "Ctrl-C"
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        hint = AFTER_INTERRUPT.get(command, "nothing half-written is kept: run the command again")
        err_console.print(f"[red]interrupted:[/] stopped by {by} ({hint})", highlight=False, soft_wrap=True)
        sys.exit(130)
