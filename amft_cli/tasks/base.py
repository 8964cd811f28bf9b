"""The one task contract every family follows (DESIGN §5).

An example is a plain dict, so splits are JSONL files on disk:

    {"id": str, "prompt": str, "demonstration": str, "answer": Any, "meta": dict}

`prompt` is the exact text the model continues (compact format), the user
message (full format, wrapped by the tokenizer's chat template when the
model config asks for it), or whole chat messages [{"role", "content"}]
when the data carries its own (a system prompt: the math task's
task.prompt = "file"). `demonstration` is the target response, without
the prompt. A task module provides:

    SPLITS                      the split names it builds ("train", "val", "test", "ood", ...)
    build_splits(cfg) -> {split: [example]}   deterministic given cfg.seed
    score(example, completion) -> Score       the verifier; never eval/exec, time-bounded

and optionally, when a task needs multi-step eval (V-IRL routes):

    evaluate_episodes(examples, generate, verify_iter) -> (metrics: dict, samples: list[dict])
        generate(prompts: list[str | messages]) -> list[str]   a model behind a plain callable
        verify_iter: attempts per step (sequential revision, tasks/revision.py)

A failed Score says why in info["error"]: with sequential revision that
message goes back to the model ("You failed this trial because ...").

Tasks know nothing about models, tokenizers or torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

STATUSES = ("correct", "wrong", "illegal", "malformed", "timeout")


@dataclass(frozen=True)
class Score:
    """A verifier's verdict on one completion."""

    reward: float
    status: str  # one of STATUSES (tasks may add their own, e.g. "unused_numbers")
    info: dict = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return self.status == "correct"


def prompt_text(prompt: str | list[dict]) -> str:
    """A prompt's text: the string itself, or its messages' contents joined by newlines."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines through a temp file renamed into place: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


class DataError(ValueError):
    """A data file is unreadable or malformed; the message names the file and 1-based line."""


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-blank line. Invalid UTF-8, invalid JSON (a truncated last line
    included) or a non-object row is a DataError naming the file and the 1-based line."""
    return [row for _, row in numbered_rows(path)]


def read_examples(path: Path) -> list[dict]:
    """A split file's examples, each checked against the contract above (DataError names the
    file and line): id (string or integer, unique), prompt (a string or chat messages),
    demonstration (a string), answer, and meta (an object) when present."""
    examples, seen = [], set()
    for number, row in numbered_rows(path):
        where = f"{path}, line {number}"
        missing = [name for name in ("id", "prompt", "demonstration", "answer") if name not in row]
        if missing:
            raise DataError(f"{where}: missing field {missing[0]!r} (every example needs id, prompt, "
                            "demonstration and answer)")
        for name, types, expected in (("id", (str, int), "a string or an integer"),
                                      ("prompt", (str, list), "a string or a list of chat messages"),
                                      ("demonstration", str, "a string"), ("meta", dict, "a JSON object")):
            if name in row and (not isinstance(row[name], types) or isinstance(row[name], bool)):
                raise DataError(f"{where}: field {name!r} must be {expected}, got {type(row[name]).__name__}")
        if isinstance(row["prompt"], list) and not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in row["prompt"]):
            raise DataError(f"{where}: field 'prompt' is a list, so each item must be "
                            '{"role": "...", "content": "..."}')
        if row["id"] in seen:
            raise DataError(f"{where}: id {row['id']!r} appears twice (ids key the tokenization cache)")
        seen.add(row["id"])
        examples.append(row)
    return examples


def numbered_rows(path: Path):
    """(1-based line number, object) for every non-blank line."""
    try:
        with open(path, "rb") as f:
            lines = list(f)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    for number, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            cut = "; the file ends mid-line (truncated?)" if not raw.endswith(b"\n") else ""
            raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}){cut}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        yield number, row
