"""`amft sweep`: a method × seed grid, trained and evaluated ID and OOD, tabulated per method.

    sweeps/<name>/runs/<algo>-s<seed>/   one ordinary run directory per cell (train, then eval/)
    sweeps/<name>/runs/<algo>-s<seed>/sweep.log   that cell's own output
    sweeps/<name>/table.{json,csv,md}    per method: mean and 95 % t-interval over seeds

Each cell runs as its own `python -m amft_cli train ...` and then `... eval --ood`
process: the code path a user runs, memory returned between runs, Ctrl-C reaching
every run's checkpoint handler, and `--jobs N` cells at once. Rerunning the same
command continues a sweep: a finished run is not trained again, a run with a
checkpoint short of its steps is resumed, and an eval already done on the final
checkpoint with the same k and limit, scored by the same verifier code, is kept. A cell whose run directory holds a
run of a different config (other methods' knob sections aside) is refused (one line naming the keys), never
replaced.

The interval is Student's t over seeds: mean ± t(0.975, n−1) · s / √n
(report.t_interval); one seed gives no interval.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from amft_cli import children, methods, provenance, report, rundir
from amft_cli.config import Config, validate
from amft_cli.config_io import apply_overrides, load_preset
from amft_cli.tasks import verifier_version

SWEEPS_ROOT = Path("sweeps")


class SweepError(ValueError):
    """A bad grid or a run directory that holds another config; printed as one line (exit 2)."""


# ---------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class Cell:
    algo: str
    seed: int
    run_dir: Path
    config: Config = field(compare=False, repr=False)
    overrides: tuple[str, ...] = ()   # the --set list that makes `preset` into this cell's config

    @property
    def name(self) -> str:
        return f"{self.algo}-s{self.seed}"


@dataclass
class Grid:
    name: str
    preset: str
    algos: list[str]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)   # --set, the same for every cell
    k: int | None = None                                  # eval samples per example (default: eval.k)
    limit: int | None = None                              # eval examples per split (default: eval.limit)
    baseline: str | None = None                           # the method each other is paired with (same seeds)
    root: Path = SWEEPS_ROOT

    @property
    def folder(self) -> Path:
        return self.root / self.name

    def cells(self) -> list[Cell]:
        """Every (algo, seed) with its resolved, validated config; config errors surface here, before any run."""
        out = []
        for algo in self.algos:
            for seed in self.seeds:
                sets = (*self.overrides, f"train.algo={algo}", f"seed={seed}")
                cfg = validate(apply_overrides(load_preset(self.preset), list(sets)))
                out.append(Cell(algo, seed, rundir.sweep_cell_dir(self.folder, algo, seed), cfg, sets))
        return out


def parse_algos(text: str) -> list[str]:
    """'sft,rl,amft' -> names checked against the method registry; 'all' = every registered method."""
    names = methods.names() if text.strip() == "all" else [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise SweepError(f"--algo {text!r}: expected a comma-separated list, e.g. sft,rl,amft")
    for name in names:
        if name not in methods.names():
            raise SweepError(f"--algo {text!r}: unknown method {name!r} (choices: {', '.join(methods.names())})")
    return _once(names, "--algo", text)


def _once(items: list, flag: str, text: str) -> list:
    """items, refusing a repeat: a sweep runs each cell once, and a typo should not shrink it silently."""
    repeated = [str(x) for i, x in enumerate(items) if x in items[:i]]
    if repeated:
        raise SweepError(f"{flag} {text!r}: {', '.join(dict.fromkeys(repeated))} given twice; give each once")
    return items


def parse_baseline(name: str | None, algos: list[str]) -> str | None:
    """--baseline: one of the sweep's --algo methods, or None."""
    if name is not None and name not in algos:
        raise SweepError(f"--baseline {name!r}: expected one of this sweep's methods ({', '.join(algos)})")
    return name


def parse_name(name: str) -> str:
    """--name: one folder under sweeps/ (a path would put the sweep, and its reruns' deletions, elsewhere)."""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise SweepError(f"--name {name!r}: expected a folder name under {SWEEPS_ROOT}/, e.g. tiny-gp-250 (no path)")
    return name


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-2' -> [0, 1, 2]."""
    try:
        if re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", text):
            lo, hi = (int(x) for x in text.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SweepError(f"--seeds {text!r}: expected integers, e.g. 0,1,2 or 0-2") from None
    if not seeds:
        raise SweepError(f"--seeds {text!r}: expected integers, e.g. 0,1,2 or 0-2")
    return _once(seeds, "--seeds", text)


# ---------------------------------------------------------------------------
# what a cell still needs


def train_state(cell: Cell) -> str:
    """'done' | 'resume' | 'new' (nothing to keep, any debris is replaced) for the cell's run directory."""
    saved = rundir.checkpoints(cell.run_dir) if cell.run_dir.is_dir() else {}
    if (cell.run_dir / rundir.CONFIG_FILE).is_file() and saved:
        diff = rundir.config_differences(cell.run_dir, cell.config)
        if diff:
            raise SweepError(f"{cell.run_dir} holds a run with another config ({', '.join(diff[:5])} differ): "
                             f"pick another --name, or delete that folder")
    if not saved:
        return "new"
    return "done" if max(saved) >= cell.config.train.steps else "resume"


def eval_done(cell: Cell, k: int | None, limit: int | None) -> bool:
    """ID and OOD evaluated on the final checkpoint (written after it) with the requested k and limit
    and the cell's other sampling settings (an `amft eval` by hand at another temperature must not
    enter the table), scored by this verifier code (tasks.verifier_version: a fixed parser
    re-scores old sweeps)."""
    saved = rundir.checkpoints(cell.run_dir) if cell.run_dir.is_dir() else {}  # not started (a stopped sweep)
    if not saved or not rundir.eval_dir(cell.run_dir).is_dir():
        return False
    final = saved[max(saved)]
    e = cell.config.eval
    want = {"k": e.k if k is None else k, "limit": e.limit if limit is None else limit, "temperature": e.temperature,
            "top_p": e.top_p, "max_new_tokens": e.max_new_tokens, "seed": cell.config.seed, "greedy_only": False}
    fresh, verifier = set(), verifier_version()
    for split, record in rundir.read_eval(cell.run_dir).items():
        if (Path(record.get("checkpoint", "")).name == final.name
                and all(record["settings"].get(key) == value for key, value in want.items())
                and record.get("verifier") == verifier
                and rundir.eval_path(cell.run_dir, split).stat().st_mtime >= final.stat().st_mtime):
            fresh.add(bool(record["metrics"].get("ood")))
    return fresh == {False, True}


def train_argv(grid: Grid, cell: Cell, state: str) -> list[str]:
    base = [sys.executable, "-m", "amft_cli", "train", "--plain"]
    if state == "resume":
        return base + ["--resume", str(cell.run_dir)]
    return base + ["--run-dir", str(cell.run_dir), "--preset", grid.preset, "--overwrite"] + [
        a for s in cell.overrides for a in ("--set", s)]


def eval_argv(grid: Grid, cell: Cell) -> list[str]:
    argv = [sys.executable, "-m", "amft_cli", "eval", "--run", str(cell.run_dir), "--ood"]
    argv += ["--k", str(grid.k)] if grid.k is not None else []
    return argv + (["--limit", str(grid.limit)] if grid.limit is not None else [])


# ---------------------------------------------------------------------------
# running cells


@dataclass
class Outcome:
    cell: Cell
    status: str            # "done" | "failed" | "interrupted"
    trained: str = ""      # what happened to training: "trained" | "resumed" | "kept"
    evaluated: bool = False
    returncode: int = 0


def _child_env(jobs: int, name: str) -> dict:
    """Split the cores between concurrent runs unless the user set the thread count; with
    train.report_to = wandb, the cells' W&B runs are grouped under the sweep's name."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    env.setdefault("WANDB_RUN_GROUP", name)
    return env


STOP_CODES = (report.EXIT_INTERRUPTED, -signal.SIGINT, -signal.SIGTERM)  # a cell asked to stop, not failed


def run_cell(grid: Grid, cell: Cell, env: dict, on_event: Callable[[Cell, str, int, int], None]) -> Outcome:
    """Train (or resume, or keep) the cell's run, then evaluate it ID and OOD unless that is done.

    on_event(cell, phase, done, total) reports "train" steps and the "eval" phase.
    """
    log = cell.run_dir / "sweep.log"
    state = train_state(cell)
    outcome = Outcome(cell, "done", {"new": "trained", "resume": "resumed", "done": "kept"}[state])
    if state != "done":
        on_event(cell, "train", 0, cell.config.train.steps)
        code = children.run_logged(train_argv(grid, cell, state), log, env,
                           lambda step, total: on_event(cell, "train", step, total))
        if code != 0:
            outcome.status = "interrupted" if code in STOP_CODES else "failed"
            outcome.returncode = code
            return outcome
    if not eval_done(cell, grid.k, grid.limit):
        on_event(cell, "eval", 0, 1)
        code = children.run_logged(eval_argv(grid, cell), log, env, lambda step, total: None)
        if code != 0:
            outcome.status = "interrupted" if code in STOP_CODES else "failed"
            outcome.returncode = code
            return outcome
        outcome.evaluated = True
    return outcome


def prepare_shared(grid: Grid, cells: list[Cell],
                   on_event: Callable[[Cell, str, int, int], None]) -> Outcome | None:
    """`amft prepare` once per data folder the unfinished cells share, before any of them starts:
    cells started together would otherwise each build the same missing folder. Output in
    sweeps/<name>/prepare.log; a failure stops the sweep with that log's name (exit 2). Returns
    the "interrupted" outcome of the cell it prepared for when a prepare was stopped, else None."""
    from amft_cli.data import is_prepared

    todo = {}
    for cell in cells:
        if train_state(cell) != "done" and not is_prepared(cell.config):
            todo.setdefault((cell.config.task.data_dir, cell.config.model.path), cell)
    log = grid.folder / "prepare.log"
    for cell in todo.values():
        on_event(cell, "prepare", 0, 1)
        argv = [sys.executable, "-m", "amft_cli", "prepare", "--preset", grid.preset]
        code = children.run_logged(argv + [a for s in cell.overrides for a in ("--set", s)], log, dict(os.environ),
                           lambda step, total: None)
        if code in STOP_CODES:
            return Outcome(cell, "interrupted", returncode=code)
        if code != 0:
            raise SweepError(f"preparing {cell.config.task.data_dir} failed: see {log}")
    return None


def run_grid(grid: Grid, cells: list[Cell], jobs: int = 1,
             on_event: Callable[[Cell, str, int, int], None] = lambda *a: None,
             on_done: Callable[[Outcome], None] = lambda o: None,
             stop: threading.Event | None = None) -> list[Outcome]:
    """Every cell, `jobs` at a time, in grid order. After an interrupted cell no new cell starts
    (the running ones got the same Ctrl-C, passed on, and checkpoint too); nor once `stop` is set."""
    env, stop = _child_env(jobs, grid.name), stop or threading.Event()
    outcomes: list[Outcome] = []

    def work(cell: Cell) -> Outcome | None:
        if stop.is_set():
            return None
        outcome = run_cell(grid, cell, env, on_event)
        if outcome.status == "interrupted":
            stop.set()
        on_done(outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(work, cell) for cell in cells]
        try:
            for future in futures:
                result = future.result()
                if result is not None:
                    outcomes.append(result)
        except KeyboardInterrupt:
            stop.set()
            for future in futures:
                future.cancel()
            outcomes += [f.result() for f in futures if not f.cancelled() and f.result() is not None]
            raise
    return outcomes


# ---------------------------------------------------------------------------
# the table


def cell_record(cell: Cell, k: int | None, limit: int | None) -> dict | None:
    """What the table needs from a cell, read from its run directory; None unless its final
    checkpoint is evaluated with this k and limit (see eval_done)."""
    if not eval_done(cell, k, limit):
        return None
    evals = rundir.read_eval(cell.run_dir)
    blocks = report.eval_blocks({split: rec["metrics"] for split, rec in evals.items()})
    return {"algo": cell.algo, "seed": cell.seed, "run": str(cell.run_dir), **blocks["metrics"],
            **report.run_totals(rundir.read_metrics(cell.run_dir)),
            "trained_on": provenance.trained_on(cell.run_dir)}


def table_paths(folder: Path) -> list[Path]:
    return [folder / "table.json", folder / "table.csv", folder / "table.md"]


def write_tables(table: dict, folder: Path) -> list[Path]:
    """table.json, table.csv and table.md in folder, each written whole (temp file, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = (json.dumps(table, indent=2) + "\n", report.sweep_csv(table), report.sweep_markdown(table))
    for path, text in zip(table_paths(folder), texts):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return table_paths(folder)


# ---------------------------------------------------------------------------
# the whole sweep


def _describe(outcome: Outcome, record: dict | None) -> str:
    cell = outcome.cell
    if outcome.status != "done":
        return f"{cell.name}: {outcome.status} (exit {outcome.returncode}); its output: {cell.run_dir / 'sweep.log'}"
    scores = ""
    if record is not None:
        scores = " · " + " · ".join(f"{s} greedy {100 * record[s]['greedy']:.1f}%"
                                     for s in report.SCOPES if "greedy" in record.get(s, {}))
    evaluated = "evaluated" if outcome.evaluated else "eval kept"
    return f"{cell.name}: {outcome.trained}, {evaluated}{scores}"


def run(grid: Grid, jobs: int = 1, live: bool | None = None, console=None) -> tuple[dict, list[Outcome]]:
    """Run what the grid still needs, then write its tables; (table, outcomes).

    Every cell's config is resolved and its folder checked before the first run
    starts, so a bad --set or a folder of another run stops the sweep at once. One
    sweep per folder: a second with the same --name is refused (they would fail each
    other's cells on their locks and write the tables in turn).
    """
    with rundir.RunLock(grid.folder, advice="wait for that sweep to end (rerunning it then continues it) or "
                                            "pick another --name"):
        return _run(grid, jobs, live, console)


def _run(grid: Grid, jobs: int, live: bool | None, console) -> tuple[dict, list[Outcome]]:
    from amft_cli.dashboard import GridProgress

    cells = grid.cells()
    for cell in cells:
        train_state(cell)
    stop = threading.Event()
    with GridProgress(len(cells), console, live) as progress, children.pass_on_signals(stop):
        on_event = lambda c, phase, done, total: progress.event(c.name, phase, done, total)  # noqa: E731
        stopped = prepare_shared(grid, cells, on_event)
        if stopped:
            progress.done(stopped.cell.name, f"preparing the shared data stopped (exit {stopped.returncode}); "
                                             "no run started, rerun the sweep to continue")
        outcomes = [stopped] if stopped else run_grid(
            grid, cells, jobs, on_event=on_event, stop=stop,
            on_done=lambda o: progress.done(o.cell.name, _describe(o, cell_record(o.cell, grid.k, grid.limit))))
    records = [r for r in (cell_record(c, grid.k, grid.limit) for c in cells) if r is not None]
    table = {**report.sweep_table(grid, records), "files": [str(p) for p in table_paths(grid.folder)]}
    write_tables(table, grid.folder)
    return table, outcomes
