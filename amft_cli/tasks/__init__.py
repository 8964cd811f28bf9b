"""Task families behind one contract (see tasks/base.py). Looked up by `task.name`."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
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


def verifier_version() -> str:
    """A hash of this package's code (every task's parser, verifier and reward): stored with each
    eval's scores, so `amft sweep` re-evaluates a cell scored by other code instead of tabulating
    it beside cells scored by this one. Conservative: any edit under tasks/ counts as a change."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]
