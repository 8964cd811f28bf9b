"""Task families behind one contract (see tasks/base.py). Looked up by `task.name`."""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = {
    "tiny-math": "amft_cli.tasks.tiny_math",  # a+b*c, graded by math-verify (CPU default)
    "gp": "amft_cli.tasks.gp",                # General Points / 24 game
    "virl": "amft_cli.tasks.virl",            # V-IRL text navigation
    "math": "amft_cli.tasks.math",            # OpenR1-Math-46k + math/MC eval sets
    "word-math": "amft_cli.tasks.word_math",  # generated word problems, graded like math (smol-math)
}


def get_task(name: str) -> ModuleType:
    """The module implementing task `name` (build_splits, score, ...)."""
    if name not in TASKS:
        raise ValueError(f"task.name: unknown task {name!r} (known: {', '.join(TASKS)})")
    return importlib.import_module(TASKS[name])
