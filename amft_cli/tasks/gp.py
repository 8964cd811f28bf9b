"""General Points (the 24 game), after Chu et al. 2025, "SFT Memorizes, RL Generalizes".

Four card ranks (A=1 .. K=13) are drawn with replacement and redrawn until the
numbers can make 24 with + - * / and parentheses, each card used exactly once,
in exact rational arithmetic. ID rule: J, Q, K count as 10. OOD rule: they
count as 11, 12, 13, and every OOD hand holds at least one face card.

Formats (`task.format`):
- full: a prose prompt; the response is JSON {"cards", "number", "formula"}.
  The verifier takes the last {...} object in the text and parses `formula`
  with its own recursive-descent parser (integers, + - * /, parentheses).
- compact (the tiny character model): prompt `4,7,8,8;JQK=10:` (OOD
  `...;JQK=11,12,13:`), response comma-separated binary steps
  `7+4=11,11-8=3,8*3=24`, each combining two available numbers (cards not
  yet used, earlier results). Fraction or negative operands are written in
  parentheses, `8/(1/3)=24`; results bare. The verifier reads the first line
  of the completion, spaces ignored.

Reward (both formats): correct 5, valid numbers but wrong value -1, wrong /
reused / unused numbers -2 ("illegal"), malformed -3. Numbers are checked
before values, so a formula with wrong numbers is "illegal" even if it also
divides by zero. Division by zero with the right numbers is "wrong" (-1): the
expression has no value, so it is not 24; info["error"] says so. In compact
steps a false arithmetic claim is "wrong"; availability is tracked with the
claimed results, so one false claim is not also counted as illegal.

Departures from the paper, and why:
1. Text only (no card images); cards are listed in the prompt.
2. Val and test hands are unseen: hands are grouped by their ID numbers
   (so J,3,5,A and 10,3,5,A are one group) and 20% / 10% of the solvable
   groups are held out for test / val before train is drawn. The train split
   repeats hands (there are only 1820 multisets of 13 ranks).
3. Val, test and ood hold distinct hands while the pool lasts (weighted
   sampling without replacement, weights = the chance of drawing that multiset
   with replacement); train is drawn with replacement like the paper.
4. Demonstrations are canonical, to be as regular as possible for a tiny
   model: among all solutions, the one of least summed step cost, where a
   fractional or negative intermediate costs 100, a result above 24 costs 4,
   and an operation costs + 0, - 1, * 2, / 3 (easy arithmetic first). Ties go
   to a fixed enumeration order. Each step writes the larger operand first
   for + and *; independent steps come in the order their results are used.
   Compact prompts list the cards sorted by rank, so one multiset is one
   prompt; full prompts keep the drawn order, as dealt.
5. No sequential revision yet (DESIGN §5, later).

The arithmetic (solver, canonical steps, the step and formula checkers and
their hard caps) is in tasks/gp_arith.py; this module deals the hands, builds
splits and prompts, reads the answer out of a completion and maps statuses
to rewards.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections import Counter
from itertools import combinations_with_replacement

from amft_cli.tasks.base import Score
from amft_cli.tasks.gp_arith import (MAX_FORMULA_CHARS, TARGET, Malformed, check_formula, check_steps,
                                     solvable, solve, steps_to_formula)

SPLITS = ("train", "val", "test", "ood")
REWARDS = {"correct": 5.0, "wrong": -1.0, "illegal": -2.0, "malformed": -3.0}
FACES = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")  # FACES[rank - 1]
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1  # of the solvable ID number groups, held out

# hard caps on reading a completion (the arithmetic's own caps are in gp_arith)
MAX_COMPLETION_CHARS = 65536
MAX_JSON_CHARS = 1000      # the answer object is small; also bounds json's nesting
MAX_JSON_TRIES = 32        # '{' positions tried before the last '}'


# ---------------------------------------------------------------------------
# examples and splits


def _values(ranks, rule: str) -> list[int]:
    return [r if rule == "ood" else min(r, 10) for r in ranks]


def _prompt(cards: list[str], rule: str, format: str) -> str:
    if format == "compact":
        return f"{','.join(cards)};JQK={'11,12,13' if rule == 'ood' else '10'}:"
    faces = "J, Q and K count as 11, 12 and 13" if rule == "ood" else "J, Q and K each count as 10"
    return ("Let's play General Points, the 24 game. Your four cards are "
            f"{', '.join(cards)}. A card counts as its number: A counts as 1, and {faces}. "
            "Write a formula that equals exactly 24, using the number of every card exactly once "
            "and only +, -, *, / and parentheses. Reply with a JSON object such as "
            '{"cards": ["A", "2", "3", "4"], "number": [1, 2, 3, 4], "formula": "(1+2+3)*4"}.')


def make_example(ranks: list[int], rule: str, id: str, format: str = "compact") -> dict:
    """One hand (ranks 1..13, shown in the given order) under rule "id" or "ood"; must be solvable."""
    cards, values = [FACES[r - 1] for r in ranks], _values(ranks, rule)
    steps = solve(values)
    if steps is None:
        raise ValueError(f"gp: hand {cards} cannot make {TARGET} under rule {rule!r}")
    if format == "compact":
        demonstration = ",".join(steps)
    else:
        demonstration = json.dumps({"cards": cards, "number": values, "formula": steps_to_formula(steps)})
    return {"id": id, "prompt": _prompt(cards, rule, format), "demonstration": demonstration,
            "answer": {"cards": cards, "values": values, "target": TARGET, "format": format},
            "meta": {"rule": rule, "cards": cards, "values": values}}


@functools.lru_cache(maxsize=None)
def _pools(seed: int) -> dict[str, list[tuple]]:
    """split -> the sorted rank multisets it may draw; val/test groups never reach train."""
    hands = list(combinations_with_replacement(range(1, 14), 4))
    groups: dict[tuple, list] = {}
    for hand in hands:
        values = tuple(sorted(_values(hand, "id")))
        if solvable(values):
            groups.setdefault(values, []).append(hand)
    keys = sorted(groups)
    random.Random(f"gp-groups-{seed}").shuffle(keys)
    n_test, n_val = round(TEST_FRACTION * len(keys)), round(VAL_FRACTION * len(keys))
    parts = {"test": keys[:n_test], "val": keys[n_test:n_test + n_val], "train": keys[n_test + n_val:]}
    pools = {split: sorted(h for k in ks for h in groups[k]) for split, ks in parts.items()}
    pools["ood"] = [h for h in hands if max(h) >= 11 and solvable(_values(h, "ood"))]
    return pools


def _draw_weight(hand: tuple) -> int:
    """How many ordered draws with replacement give this multiset."""
    return math.factorial(4) // math.prod(math.factorial(c) for c in Counter(hand).values())


def _draw(rng: random.Random, pool: list[tuple], n: int, distinct: bool) -> list[tuple]:
    weights = [_draw_weight(h) for h in pool]
    if not distinct:
        return rng.choices(pool, weights, k=n)
    # weighted sampling without replacement (Efraimidis-Spirakis keys); cycle if n > pool
    keys = [rng.random() ** (1.0 / w) for w in weights]
    order = [pool[i] for i in sorted(range(len(pool)), key=lambda i: -keys[i])]
    return [order[i % len(order)] for i in range(n)]


def build_splits(tcfg) -> dict[str, list[dict]]:
    """train / val / test / ood examples, deterministic given tcfg.seed (tcfg: config.TaskConfig)."""
    pools = _pools(tcfg.seed)
    sizes = {"train": tcfg.train_size, "val": tcfg.val_size, "test": tcfg.test_size, "ood": tcfg.ood_size}
    out = {}
    for split in SPLITS:
        rng = random.Random(f"gp-{split}-{tcfg.seed}")  # one per split: sizes do not shift the others
        rule = "ood" if split == "ood" else "id"
        examples = []
        for i, hand in enumerate(_draw(rng, pools[split], sizes[split], distinct=split != "train")):
            ranks = list(hand)
            if tcfg.format != "compact":
                rng.shuffle(ranks)  # as dealt; compact keeps rank order (one prompt per multiset)
            examples.append(make_example(ranks, rule, f"gp-{split}-{i}", tcfg.format))
        out[split] = examples
    return out


# ---------------------------------------------------------------------------
# verifier


def _score(status: str, **info) -> Score:
    return Score(REWARDS[status], status, info)


def _extract_formula(completion: str) -> str:
    """`formula` of the last {...} object; single-quoted pseudo-JSON is tolerated."""
    end = completion.rfind("}")
    if end < 0:
        raise Malformed("no JSON object")
    low, start = max(0, end - MAX_JSON_CHARS), end
    for _ in range(MAX_JSON_TRIES):
        start = completion.rfind("{", low, start)
        if start < 0:
            break
        try:
            obj = json.loads(completion[start:end + 1])
        except (ValueError, RecursionError):
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("formula"), str):
            raise Malformed("the last JSON object has no string 'formula'")
        return obj["formula"]
    m = re.search(r"""["']formula["']\s*:\s*["']([^"'\n]{0,%d})["']""" % MAX_FORMULA_CHARS,
                  completion[low:end + 1])
    if m is None:
        raise Malformed("no JSON object with a 'formula'")
    return m[1]


def score(example: dict, completion: str) -> Score:
    """Verify a completion for `example` (format taken from example["answer"]); never eval/exec."""
    answer = example["answer"]
    try:
        if len(completion) > MAX_COMPLETION_CHARS:
            raise Malformed("completion too long")
        if answer.get("format", "full") == "compact":
            # the first line, spaces ignored
            status, info = check_steps(answer["values"], answer["target"],
                                       completion.strip().split("\n", 1)[0].replace(" ", ""))
        else:
            status, info = check_formula(answer["values"], answer["target"], _extract_formula(completion))
        return _score(status, **info)
    except Malformed as e:
        return _score("malformed", error=str(e))
