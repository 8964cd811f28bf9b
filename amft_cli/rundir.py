"""Finding things inside a run directory (DESIGN §6), with one-line errors.

    runs/<name>/config.toml                resolved config
    runs/<name>/metrics.jsonl              one JSON line per step
    runs/<name>/environment.jsonl          one JSON line per start: versions, commit, device (provenance.py)
    runs/<name>/checkpoints/step-N/        HF model folder + trainer state
    runs/<name>/eval/<split>.json          eval scores; <split>.samples.jsonl per sample
    runs/<name>/plots/                     figures
    runs/<name>/.lock                      held by the one process writing the run
    sweeps/<name>/runs/<algo>-s<seed>/     one run directory per cell of `amft sweep`
    sweeps/<name>/table.{json,csv,md}      the sweep's per-method table; plots/ its figures

Used by `amft train` (the lock), `amft eval` and `amft plot`; imports no
torch, so plotting works on machines without it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from amft_cli import metrics
from amft_cli.config import Config
from amft_cli.config_io import load_preset, to_dict
from amft_cli.fsio import user_io

CONFIG_FILE = "config.toml"
LOCK_FILE = ".lock"
CHECKPOINT_DIR = re.compile(r"^step-(\d+)$")


class RunDirError(ValueError):
    """A run directory lacks what the command needs; printed as one line."""


# ---------------------------------------------------------------------------
# one writer per run directory


_held: dict[Path, list] = {}  # resolved run dir -> [lock fd, nesting depth, stale] in this process


class RunLock:
    """An exclusive lock on a run directory, taken before anything is written to it.

    The lock is flock(2) on RUN/.lock, which the kernel releases when the holder
    exits in any way, SIGKILL included: a killed run leaves nothing to clean up
    and `--resume` takes the lock at once. The file names the holder (pid, host,
    start, command) so a refused second writer can say who has it; a clean exit
    empties it, so `stale` (the text a killed holder left) tells a crash apart.
    Re-entrant within a process: the CLI holds it and `train()` takes it again.
    `amft eval` takes the same lock on the eval folder it writes (one evaluation at a
    time per folder; training writes none of its files there); `advice` ends the refusal.
    """

    def __init__(self, run_dir: Path, advice: str = "wait for it to end or pick another --run-dir"):
        self.run_dir, self.advice = Path(run_dir), advice
        self.key = self.run_dir.absolute()
        self.stale = ""
        self.created = False  # whether this lock made the folder (then a failed start removes it)

    def __enter__(self) -> "RunLock":
        key = self.key = self.run_dir.resolve()
        if key in _held:
            _held[key][1] += 1
            self.stale = _held[key][2]
            return self
        path = self.run_dir / LOCK_FILE
        self.created = not self.run_dir.exists()
        with user_io(self.run_dir, "creating the run directory and its lock file"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with user_io(path, "locking the run directory"):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "starting up"
                    raise RunDirError(f"{self.run_dir} is in use by another amft process ({holder}); "
                                      f"{self.advice}") from None
                self.stale = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                holder = (f"{' '.join(['amft', *sys.argv[1:2]])}, pid {os.getpid()} on "
                          f"{socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        _held[key] = [fd, 1, self.stale]
        return self

    def __exit__(self, *exc) -> None:
        _held[self.key][1] -= 1
        if _held[self.key][1] == 0:
            fd = _held.pop(self.key)[0]
            try:
                os.ftruncate(fd, 0)  # a clean exit: no holder left behind
                if self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
                    (self.run_dir / LOCK_FILE).unlink()  # a start that failed at once leaves no folder;
                    self.run_dir.rmdir()                 # unlinked while held, so no one else holds it
            except OSError:
                pass
            os.close(fd)  # releases the flock


def holds_run(run_dir: Path) -> bool:
    """True when run_dir has metrics or checkpoints of an earlier run."""
    return (Path(run_dir) / metrics.METRICS_FILE).exists() or (Path(run_dir) / "checkpoints").exists()


RUN_FILES = {CONFIG_FILE, metrics.METRICS_FILE, "summary.json", "environment.jsonl", "checkpoints", "eval", "plots",
             "tensorboard", "wandb", "sweep.log"}  # what training, eval, plot and a sweep write in a run


def foreign_files(run_dir: Path) -> list[str]:
    """Names in run_dir that no amft run writes (hidden ones aside): a fresh start there would mix
    its files with them (a project folder given as --run-dir), so it needs --overwrite."""
    if not Path(run_dir).is_dir():
        return []
    return sorted(p.name for p in Path(run_dir).iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))


def config_differences(run_dir: Path, cfg: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """The config keys ("train.lr") on which the run saved in run_dir differs from cfg (but those in
    ignore), as the run's method reads its config: the knob sections of the other methods do not
    count (each method reads only its own, methods/__init__.py), so editing CHORD's schedule in a
    preset keeps a finished sft run."""
    from amft_cli import methods

    others = {m.replace("-", "_") for m in methods.names()} - {cfg.train.algo.replace("-", "_")}
    saved, wanted = to_dict(read_config(run_dir)), to_dict(cfg)
    return [key for key in _differences(saved, wanted) if key.split(".")[0] not in others and key not in ignore]


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            keys.append(f"{prefix}{key}")
    return keys


def clear_run(run_dir: Path) -> None:
    """Delete what a run wrote in run_dir (call it holding the lock: --overwrite): RUN_FILES and a
    killed truncation's temp file. The lock and every other file (a scheduler's log, notes) stay."""
    with user_io(run_dir, "deleting the earlier run (--overwrite)"):
        for child in Path(run_dir).iterdir():
            if child.name not in RUN_FILES and not re.fullmatch(r"\.metrics-.*\.tmp", child.name):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def _require_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    return run_dir


def _last_trained(run_dir: Path) -> float:
    """When training last wrote to run_dir: its metrics, config or checkpoints, not the folder's own
    mtime, which creating eval/ or plots/ moves (evaluating an older run must not make it "latest")."""
    paths = [run_dir / metrics.METRICS_FILE, run_dir / CONFIG_FILE, run_dir / "checkpoints"]
    return max(p.stat().st_mtime for p in paths if p.exists())


def latest_run(runs_root: Path = Path("runs")) -> Path:
    """The most recently trained run under runs_root (one with metrics or checkpoints)."""
    runs_root = Path(runs_root)
    runs = [d for d in runs_root.iterdir() if d.is_dir()] if runs_root.is_dir() else []
    runs = [d for d in runs if (d / metrics.METRICS_FILE).is_file() or (d / "checkpoints").is_dir()]
    if not runs:
        raise RunDirError(f"{runs_root}: no runs found (train one with `amft train`, or name a run directory)")
    return max(runs, key=_last_trained)


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """step -> checkpoint folder, in step order. Temp folders of an unfinished save are skipped."""
    root = _require_dir(run_dir) / "checkpoints"
    found = {}
    if root.is_dir():
        for d in root.iterdir():
            match = CHECKPOINT_DIR.match(d.name)
            if match and d.is_dir():
                found[int(match.group(1))] = d
    return dict(sorted(found.items()))


def resolve_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint at `step`, or the latest one when step is None."""
    available = checkpoints(run_dir)
    if not available:
        raise RunDirError(f"{run_dir}: no checkpoints in {Path(run_dir) / 'checkpoints'} "
                          "(the run has not saved one yet; see train.save_every)")
    if step is None:
        return available[max(available)]
    if step not in available:
        listed = ", ".join(str(s) for s in available)
        raise RunDirError(f"{run_dir}: no checkpoint at --step {step} (available: {listed})")
    return available[step]


TINY_SHAPE = (("model.arch", "model_type"), ("model.hidden_size", "hidden_size"),
              ("model.num_layers", "num_hidden_layers"), ("model.num_heads", "num_attention_heads"))


def shape_differences(run_dir: Path, cfg: Config) -> list[str]:
    """The tiny-model knobs of cfg that the run's latest checkpoint was not built with (its
    config.json): a resume cannot change the weights' shape, and would otherwise rebuild the
    shared base model in the new shape and train the old weights under a config that says otherwise."""
    saved = checkpoints(run_dir)
    hf_config = saved[max(saved)] / "config.json" if saved else None
    if cfg.model.init != "tiny" or hf_config is None or not hf_config.is_file():
        return []
    with user_io(hf_config, "reading the checkpoint's model config"):
        built = json.loads(hf_config.read_text(encoding="utf-8"))
    wanted = {key: getattr(cfg.model, key.split(".")[1]) for key, _ in TINY_SHAPE}
    return [f"{key} {wanted[key]} (the checkpoint's: {built[name]})" for key, name in TINY_SHAPE
            if name in built and built[name] != wanted[key]]


def read_config(run_dir: Path) -> Config:
    """The resolved Config the run was started with."""
    path = _require_dir(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no {CONFIG_FILE} — is this a run directory?")
    return load_preset(str(path))


def read_metrics(run_dir: Path) -> list[dict]:
    """Every logged step, in file order; a truncated last line (killed run) is dropped."""
    path = _require_dir(run_dir) / metrics.METRICS_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no {metrics.METRICS_FILE} — is this a run directory?")
    try:
        records = metrics.read_metrics(path)
    except ValueError as e:
        raise RunDirError(str(e)) from None
    if not records:
        raise RunDirError(f"{run_dir}: {metrics.METRICS_FILE} is empty — the run has not logged a step yet")
    return records


# ---------------------------------------------------------------------------
# eval results and plots


def eval_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "eval"


def split_files(out_dir: Path, split: str) -> tuple[Path, Path]:
    """(<split>.json, <split>.samples.jsonl) in an eval folder: scores and settings, and one row per completion."""
    return Path(out_dir) / f"{split}.json", Path(out_dir) / f"{split}.samples.jsonl"


def eval_path(run_dir: Path, split: str) -> Path:
    """eval/<split>.json: metrics, settings and checkpoint of one split's eval."""
    return split_files(eval_dir(run_dir), split)[0]


def model_eval_dir(model: str | Path, preset: str, runs_root: Path = Path("runs")) -> Path:
    """Where `amft eval --model M` writes: runs/eval-<preset>-<model folder name>/eval/.

    Never inside the model folder, which may be shared, read-only or a hub cache.
    """
    name = Path(str(model).rstrip("/")).name or "model"
    return eval_dir(Path(runs_root) / f"eval-{preset}-{name}")


def checkpoint_step(path: Path) -> int | None:
    """N of a .../checkpoints/step-N folder; None for any other folder."""
    match = CHECKPOINT_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def samples_path(run_dir: Path, split: str) -> Path:
    """eval/<split>.samples.jsonl: one row per generated completion."""
    return split_files(eval_dir(run_dir), split)[1]


def plots_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "plots"


def read_eval(run_dir: Path) -> dict[str, dict]:
    """split -> the eval/<split>.json record; ID splits first. Empty when never evaluated."""
    out = {}
    for path in sorted(eval_dir(run_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise RunDirError(f"{path}: not valid JSON (rerun `amft eval --run {run_dir}`)") from None
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
            raise RunDirError(f"{path}: no 'metrics' object — not written by `amft eval`")
        out[record.get("split", path.stem)] = record
    return dict(sorted(out.items(), key=lambda kv: bool(kv[1]["metrics"].get("ood"))))


# ---------------------------------------------------------------------------
# sweeps


def sweep_cell_dir(sweep: Path, algo: str, seed: int) -> Path:
    """The run directory of one (algo, seed) cell of a sweep."""
    return Path(sweep) / "runs" / f"{algo}-s{seed}"


def sweep_table_path(sweep: Path) -> Path:
    return Path(sweep) / "table.json"


def read_sweep_table(sweep: Path) -> dict:
    """table.json of a sweep folder, with one-line errors."""
    path = sweep_table_path(sweep)
    if not path.is_file():
        raise RunDirError(f"{sweep}: no table.json — is it a sweep folder? (`amft sweep` writes sweeps/<name>/)")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise RunDirError(f"{path}: not valid JSON (rerun the `amft sweep` command to rewrite it)") from None
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
        raise RunDirError(f"{path}: no 'rows' list — not written by `amft sweep`")
    return table
