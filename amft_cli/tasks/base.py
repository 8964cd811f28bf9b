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

    evaluate_episodes(examples, generate) -> (metrics: dict, samples: list[dict])
        generate(prompts: list[str]) -> list[str]   a model behind a plain callable

Tasks know nothing about models, tokenizers or torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

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
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
