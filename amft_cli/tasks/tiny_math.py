"""tiny-math, the embedded CPU default: a+b*c with a in 0..99 and b, c in 0..9.

The 10,000 distinct problems are shuffled once (seeded); the first test_size
go to test, the next val_size to val, and train cycles through the rest,
reshuffled each pass, until it holds train_size examples (so with the
defaults every remaining problem appears about twice and none is missing).
OOD problems have a three-digit a (100..999), never seen in training.

Completions are graded by math.grade, the same path as the full math task
(the integer fast path answers every well-formed tiny completion).
"""

from __future__ import annotations

import random

from amft_cli.tasks import math as math_task
from amft_cli.tasks.base import Score

SPLITS = ("train", "val", "test", "ood")
N_PROBLEMS = 100 * 10 * 10


def make_example(a: int, b: int, c: int, id: str, format: str = "compact") -> dict:
    """One problem. Compact prompt `12+3*4=`, demonstration `3*4=12,12+12=24 \\boxed{24}`."""
    p = b * c
    n = a + p
    prompt = f"{a}+{b}*{c}=" if format == "compact" else math_task.math_prompt(f"Compute {a}+{b}*{c}.")
    return {"id": id, "prompt": prompt, "demonstration": f"{b}*{c}={p},{a}+{p}={n} \\boxed{{{n}}}",
            "answer": str(n), "meta": {"a": a, "b": b, "c": c}}


def _problem(index: int, a_min: int = 0) -> tuple[int, int, int]:
    """Index -> (a, b, c), with index = (a - a_min) * 100 + b * 10 + c."""
    return a_min + index // 100, index // 10 % 10, index % 10


def build_splits(tcfg) -> dict[str, list[dict]]:
    """train / val / test / ood, deterministic given tcfg.seed; val and test never in train."""
    held = tcfg.test_size + tcfg.val_size
    if held >= N_PROBLEMS:
        raise ValueError(f"task.test_size + task.val_size: expected < {N_PROBLEMS} "
                         f"(there are {N_PROBLEMS} distinct problems), got {held}")
    # one generator per purpose, so changing train_size leaves test, val and ood unchanged
    order = list(range(N_PROBLEMS))
    random.Random(tcfg.seed).shuffle(order)
    test, val, rest = order[:tcfg.test_size], order[tcfg.test_size:held], order[held:]
    train_rng = random.Random(tcfg.seed + 1)
    train: list[int] = []
    while len(train) < tcfg.train_size:
        train_rng.shuffle(rest)
        train += rest[:tcfg.train_size - len(train)]
    ood = random.Random(tcfg.seed + 2).sample(range(900 * 100), min(tcfg.ood_size, 900 * 100))

    def make(split: str, indices: list[int], a_min: int = 0) -> list[dict]:
        return [make_example(*_problem(k, a_min), id=f"{split}-{i}", format=tcfg.format)
                for i, k in enumerate(indices)]

    return {"train": make("train", train), "val": make("val", val),
            "test": make("test", test), "ood": make("ood", ood, a_min=100)}


def score(example: dict, completion: str) -> Score:
    """1.0 if the last \\boxed{} holds a+b*c (via math.grade), else 0.0."""
    return math_task.grade(completion, example["answer"])
