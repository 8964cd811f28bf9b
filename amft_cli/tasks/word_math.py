"""word-math: generated arithmetic word problems for a small instruct model (the smol-math preset).

"Mia has 3 boxes with 7 marbles in each box. She finds 12 more. How many marbles
does Mia have now?" A problem starts with a quantity (a plain count, or boxes × items
per box, which is one multiplication) and changes it in steps (buys/finds more: +,
gives away/loses some: −). ID problems take one or two operations, OOD problems three
or four: the same sentences, more steps to chain.

The prompt is the math task's instruction-style user message (`math.math_prompt`, as
task.prompt = "instruction": the problem plus the boxed-answer instruction), wrapped in
the chat template with the template's own system prompt, and completions are graded by
the math task's grader (`math.grade`, rule "boxed": the last \\boxed{}, math-verify
behind an exact-integer fast path). LUFFY's <think> prompt and rule, which math-qwen2.5
uses with a reasoning model's demonstrations, would score a 135M instruct model 0 by
format alone. Demonstrations are worked, one equation per
operation ("3 * 7 = 21. 21 + 12 = 33. The answer is \\boxed{33}."): on SmolLM2-135M,
answer-only demonstrations taught nothing in five minutes of SFT and worked ones reached
48% (shared/MEASURED.md).

Splits are distinct problem texts: test and val never occur in train, and every
problem has a non-negative answer with no negative intermediate.
"""

from __future__ import annotations

import random

from amft_cli.tasks import math as math_task
from amft_cli.tasks.base import Score

SPLITS = ("train", "val", "test", "ood")
ID_OPS, OOD_OPS = (1, 2), (3, 4)  # operations per problem
NAMES = [("Tom", "He"), ("Mia", "She"), ("Sam", "He"), ("Lily", "She"), ("Ben", "He"), ("Emma", "She"),
         ("Leo", "He"), ("Zoe", "She"), ("Max", "He"), ("Ava", "She"), ("Noah", "He"), ("Nina", "She")]
ITEMS = ["apples", "marbles", "stickers", "books", "cookies", "coins", "pencils", "cards", "shells", "stamps"]
ADD = ["{P} buys {n} more.", "{P} finds {n} more.", "A friend gives {o} {n} more.", "{P} wins {n} more."]
SUB = ["{P} gives away {n}.", "{P} loses {n}.", "{P} sells {n}.", "{P} gives {n} to a friend."]
OBJECT = {"He": "him", "She": "her"}


def _start(rng: random.Random, item: str, boxes: bool) -> tuple[str, int, list[str]]:
    """Opening sentence (after the name), its value and the worked equations it needs."""
    if boxes:
        a, c = rng.randint(2, 12), rng.randint(2, 9)
        return f"has {a} boxes with {c} {item} in each box.", a * c, [f"{a} * {c} = {a * c}"]
    a = rng.randint(2, 60)
    return f"has {a} {item}.", a, []


def make_problem(rng: random.Random, ops: int, id: str) -> dict:
    """One problem with `ops` operations (boxes count as one), as a task example."""
    (name, pronoun), item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes = rng.random() < 0.5 if ops > 1 else rng.random() < 0.3
    opening, value, work = _start(rng, item, boxes)
    sentences = [f"{name} {opening}"]
    for _ in range(ops - len(work)):
        if value > 3 and rng.random() < 0.5:
            n = rng.randint(2, min(value - 1, 30))
            sentences.append(rng.choice(SUB).format(P=pronoun, n=n))
            work.append(f"{value} - {n} = {value - n}")
            value -= n
        else:
            n = rng.randint(2, 60)
            sentences.append(rng.choice(ADD).format(P=pronoun, n=n, o=OBJECT[pronoun]))
            work.append(f"{value} + {n} = {value + n}")
            value += n
    sentences.append(f"How many {item} does {name} have now?")
    problem = " ".join(sentences)
    demonstration = ". ".join(work) + f". The answer is \\boxed{{{value}}}."
    return {"id": id, "prompt": math_task.math_prompt(problem), "demonstration": demonstration,
            "answer": str(value), "meta": {"ops": ops, "problem": problem}}


def _distinct(rng: random.Random, n: int, ops: tuple[int, ...], prefix: str, taken: set) -> list[dict]:
    out = []
    while len(out) < n:
        ex = make_problem(rng, rng.choice(ops), f"{prefix}-{len(out)}")
        if ex["prompt"] not in taken:
            taken.add(ex["prompt"])
            out.append(ex)
    return out


def build_splits(tcfg) -> dict[str, list[dict]]:
    """train / val / test (one or two operations) and ood (three or four), deterministic given tcfg.seed.

    Test and val are drawn first, from their own generators, so train_size changes neither.
    """
    taken: set = set()
    test = _distinct(random.Random(f"word-math-test-{tcfg.seed}"), tcfg.test_size, ID_OPS, "test", taken)
    val = _distinct(random.Random(f"word-math-val-{tcfg.seed}"), tcfg.val_size, ID_OPS, "val", taken)
    ood = _distinct(random.Random(f"word-math-ood-{tcfg.seed}"), tcfg.ood_size, OOD_OPS, "ood", set())
    train = _distinct(random.Random(f"word-math-train-{tcfg.seed}"), tcfg.train_size, ID_OPS, "train", taken)
    return {"train": train, "val": val, "test": test, "ood": ood}


def score(example: dict, completion: str) -> Score:
    """The math task's grader against the example's answer."""
    return math_task.grade(completion, example["answer"])
