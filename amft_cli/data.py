"""Prepare a config's data on disk (and its tiny model), and load splits back.

`amft prepare` writes <task.data_dir>/<split>.jsonl for every split the task
builds and, for `model.init = "tiny"`, a from-scratch character-level model
at model.path whose vocabulary covers every split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from amft_cli.config import Config, ConfigError
from amft_cli.tasks import get_task
from amft_cli.tasks.base import read_jsonl, write_jsonl


def split_path(cfg: Config, split: str) -> Path:
    return Path(cfg.task.data_dir) / f"{split}.jsonl"


def is_prepared(cfg: Config) -> bool:
    """Data splits exist, and the tiny model too when the config builds one."""
    data_ok = split_path(cfg, "train").is_file()
    model_ok = cfg.model.init != "tiny" or (Path(cfg.model.path) / "config.json").is_file()
    return data_ok and model_ok


def prepare(cfg: Config, force: bool = False, log: Callable[[str], None] = print) -> dict[str, int]:
    """Build the task's splits and the tiny model if missing (or always with force). Returns split sizes."""
    task = get_task(cfg.task.name)
    sizes: dict[str, int] = {}
    if force or not split_path(cfg, "train").is_file():
        splits = task.build_splits(cfg.task)
        for split, examples in splits.items():
            sizes[split] = write_jsonl(split_path(cfg, split), examples)
        log(f"wrote {', '.join(f'{k} {v}' for k, v in sizes.items())} examples to {cfg.task.data_dir}/")
    if cfg.model.init == "tiny" and (force or not (Path(cfg.model.path) / "config.json").is_file()):
        from amft_cli.model import build_tiny_model, count_parameters, load_policy

        texts = (ex["prompt"] + ex["demonstration"]
                 for split in task.SPLITS if split_path(cfg, split).is_file()
                 for ex in read_jsonl(split_path(cfg, split)))
        path = build_tiny_model(cfg.model, texts, Path(cfg.model.path), seed=cfg.seed)
        model, _ = load_policy(cfg.model, trainable=False)
        log(f"built tiny {cfg.model.arch} model ({count_parameters(model) / 1e6:.2f}M parameters) at {path}/")
    return sizes


def load_split(cfg: Config, split: str, limit: int = 0) -> list[dict]:
    """Examples of one split (the first `limit` if > 0), or a one-line error saying how to create them."""
    path = split_path(cfg, split)
    if not path.is_file():
        raise ConfigError(f"{path}: split {split!r} not found; run `amft prepare` with the same preset first")
    examples = read_jsonl(path)
    if not examples:
        raise ConfigError(f"{path}: split {split!r} is empty")
    return examples[:limit] if limit > 0 else examples
