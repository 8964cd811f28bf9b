"""The metric sink: one JSON line per optimizer step in run_dir/metrics.jsonl.

The JSONL file is the record of a run; plots and comparisons read it back
with `read_metrics`. Each line is `{"step": N, "time": unix_s, **metrics}`
with the namespaced keys of DESIGN §6. Lines are flushed as they are
written, so a run killed mid-way keeps every finished step; NaN and inf are
written as null so every line is strict JSON. On `--resume` the file is cut
back to the checkpoint's step first, so a resumed run's file equals an
uninterrupted one's apart from "time". TensorBoard and W&B are optional mirrors (train.report_to).
Events (a meta-gradient update, the end of warm-up) are metric keys too,
e.g. `balance/meta_update = 1.0`, so the file stays one kind of line.

This module never imports torch at module level (plots read metrics on
machines without it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from amft_cli.fsio import user_io

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    """A JSON-safe value: numbers become float/int, NaN/inf/None become None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    try:
        number = float(value)  # also unwraps numpy scalars and 0-d tensors
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def _parse_lines(data: bytes, path: Path) -> list[tuple[str, dict]]:
    """(raw line, record) pairs; an unparseable LAST line (a killed writer) is dropped. Any other
    bad line is a ValueError naming the file and its 1-based line (blank lines counted)."""
    lines = [(number, line) for number, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    parsed = []
    for i, (number, raw) in enumerate(lines):
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == len(lines) - 1:
                break
            what = "not valid UTF-8" if isinstance(e, UnicodeDecodeError) else "not valid JSON"
            raise ValueError(f"{path}: line {number} is {what}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}: line {number} is not a step record (a JSON object with an integer \"step\")")
        parsed.append((line, record))
    return parsed


def read_metrics(path: Path) -> list[dict]:
    """All step records of a metrics.jsonl (or of the run directory holding one).

    Tolerates a truncated last line, as left by a killed run or one still
    writing. Raises ValueError for a missing file or a corrupt middle line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no metrics file (expected a run directory or its {METRICS_FILE})")
    with user_io(path, "reading the metrics"):
        data = path.read_bytes()
    return [record for _, record in _parse_lines(data, path)]


def _truncate_to_step(path: Path, last_step: int) -> None:
    """Keep only lines with step <= last_step, replacing the file atomically."""
    if not path.is_file():
        return
    kept = [line for line, record in _parse_lines(path.read_bytes(), path) if record["step"] <= last_step]
    fd, tmp = tempfile.mkstemp(prefix=".metrics-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in kept)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TrackerError(ValueError):
    """A tracker named in train.report_to cannot run here; printed as one line."""


# train.report_to name -> the package it needs (pip install amft-cli[name] brings it)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_trackers(names: list[str]) -> None:
    """Before any work: every tracker asked for is installed (a run of hours should not find out
    at its first step, nor log nowhere after a warning that scrolled away)."""
    for name in names:
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            raise TrackerError(f"train.report_to: {name} needs the {package} package: pip install {package} "
                               f"(or pip install 'amft-cli[{name}]'), or drop it from train.report_to")


class TensorBoard:
    """Scalars to RUN/tensorboard/; on resume, events past the checkpoint are purged (purge_step),
    as metrics.jsonl is cut back."""

    def __init__(self, run_dir: Path, resume_step: int | None, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        # flush_secs 10 (torch's default 120): a killed run's events lag metrics.jsonl by seconds, not minutes
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge, flush_secs=10)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run named after the run directory, in project $WANDB_PROJECT (default amft-cli), files
    under RUN/wandb/, the resolved config as its config; WANDB_MODE (online, offline, disabled) is
    the user's. A resume continues the same W&B run (its id is kept in RUN/wandb/amft-run-id). W&B
    ignores steps it has already seen: those logged past the checkpoint before a crash keep their
    first values there (metrics.jsonl and TensorBoard are cut back exactly)."""

    def __init__(self, run_dir: Path, resume_step: int | None, config: dict) -> None:
        import wandb

        id_file = run_dir / "wandb" / "amft-run-id"
        with user_io(id_file, "keeping the W&B run id"):
            if resume_step is None or not id_file.is_file():
                id_file.parent.mkdir(parents=True, exist_ok=True)
                id_file.write_text(secrets.token_hex(4))  # W&B ids: lowercase letters and digits
            run_id = id_file.read_text().strip()
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "amft-cli"), name=run_dir.name, id=run_id,
                                  dir=str(run_dir), config=config, resume="allow")
        except wandb.errors.Error as e:  # no account, no network, a bad setting: the user's to fix
            raise TrackerError(f"train.report_to: W&B did not start: {e} (WANDB_MODE=offline logs without an "
                               "account or a network; `wandb sync` uploads later)") from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricSink:
    """Writes one metrics line per step; mirrors its numbers to the trackers of train.report_to.

    A fresh run (resume_step None) starts a new metrics.jsonl; a resumed run
    keeps the lines up to and including resume_step and appends after them.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, trackers: list[str] = (),
                 config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        with user_io(self.path, "opening the metrics file"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.run_dir.glob(".metrics-*.tmp"):  # a truncation killed half-way
                stale.unlink()
            if resume_step is None:
                self._file = open(self.path, "w", encoding="utf-8")
            else:
                _truncate_to_step(self.path, resume_step)
                self._file = open(self.path, "a", encoding="utf-8")
        kinds = {"tensorboard": TensorBoard, "wandb": WandB}
        self._trackers = [kinds[name](self.run_dir, resume_step, config or {}) for name in trackers]

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append {"step", "time", **metrics} as one flushed JSON line; numbers go to the trackers."""
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({key: _clean(value) for key, value in metrics.items()
                       if key not in ("step", "time")})
        with user_io(self.path, "writing metrics"):
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
        if not self._trackers:
            return
        scalars = {key: value for key, value in record.items() if key not in ("step", "time")
                   and isinstance(value, (int, float)) and not isinstance(value, bool)}
        for tracker in self._trackers:
            tracker.log(record["step"], scalars)

    def close(self) -> None:
        if not self._file.closed:
            with user_io(self.path, "writing metrics"):
                self._file.close()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []

    def __enter__(self) -> MetricSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
