"""General Points (the 24 game), after Chu et al. 2025, "SFT Memorizes, RL Generalizes".

Four card ranks (A=1 .. K=13) are dealt and redealt until the numbers can
make 24 with + - * / and parentheses, each card used exactly once, in exact
rational arithmetic. ID rule: J, Q, K count as 10. OOD rule: they count as
11, 12, 13. The deal follows the reference (LeslieTrue/SFTvsRL,
gym/gym_cards/envs/general_points_oneline.py, `GeneralPointEnv_oneline.
_generate_cards` and `reset`): ID hands are 4 ranks drawn uniformly with
replacement; OOD hands are 3 such ranks plus one forced face card (J/Q/K),
shuffled, so an OOD hand holds 1.62 face cards on average (`deal`).

Formats (`task.format`):
- full: a prose prompt; the response is JSON {"cards", "number", "formula"}.
  The verifier takes the last {...} object in the text and parses `formula`
  with its own recursive-descent parser (integers, + - * /, parentheses).
- compact (the tiny character model): prompt `4,7,8,J;JQK=10,10,10:` (OOD
  `...;JQK=11,12,13:`; the face values are always stated), response
  comma-separated binary steps `7+4=11,11-8=3,8*3=24`, each combining two
  available numbers (cards not yet used, earlier results). Fraction or
  negative operands are written in parentheses, `8/(1/3)=24`; results bare.
  The verifier reads the first line of the completion, spaces ignored.

Reward, as the reference's `step_rewards` (utils_rl.py) pays it: correct 5;
partial 1 (a formula that uses every card but stops before its closing
parentheses, and closing them solves the hand: the only way a formula that
uses every card can be a proper prefix of a solution); valid numbers but a
wrong value -1; -2 for numbers that are no card or used too often AND another
-2 for cards left unused (so -4 with both); malformed -3. Numbers are checked
before values, so a formula with wrong numbers is "illegal" even if it also
divides by zero. Division by zero with the right numbers is "wrong" (-1). In
compact steps a false arithmetic claim is "wrong"; availability is tracked
with the claimed results, so one false claim is not also counted as illegal.

The pretraining mix (split "pretrain", only when task.pretrain_size > 0)
states random face values (each of J, Q, K in 10..13, never exactly the OOD
rule 11, 12, 13) and uses them; it never holds the numbers of a val or test
hand. It gives a tiny from-scratch model the skill the OOD split tests (read
the stated rule), as a pretrained LLM has it, before fine-tuning on the ID
rule alone (DESIGN §5).

Departures from the reference, and why:
1. Text only (no card images); cards are listed in the prompt.
2. Exact fractions. The reference checks `eval(formula) == 24` in floats, so
   8/(3-8/3), the only solution of hand 3,3,8,8, evaluates to 23.99999999999999
   and can never score as solved; we do not copy that bug.
3. Lenient format: spaces, the symbols × ÷ −, single-quoted pseudo-JSON and
   text around the JSON are accepted (the reference scores any character
   outside digits + - * / ( ) as illegal, -3). "…=24" is read and the claimed
   value must be 24 (the reference drops whatever follows '=').
4. A formula our parser cannot read is malformed (-3) once; the reference
   adds -3 per bad token sequence on top of its number penalties. "Partial"
   accepts any bracketing that closes to 24, where the reference matches its
   own enumerated solution strings.
5. Val and test hands are unseen: hands are grouped by their ID numbers
   (so J,3,5,A and 10,3,5,A are one group) and 20% / 10% of the solvable
   groups are held out for test / val before train is drawn. The train split
   repeats hands (there are only 1820 multisets of 13 ranks). Val and test hold
   distinct hands while the pool lasts (weighted sampling without replacement,
   weights = the chance of drawing that multiset with replacement); train and
   ood are dealt with replacement like the reference.
6. Demonstrations are canonical, to be as regular as possible for a tiny
   model: among all solutions, the one of least summed step cost, where a
   fractional or negative intermediate costs 100, a result above 24 costs 4,
   and an operation costs + 0, - 1, * 2, / 3 (easy arithmetic first). Ties go
   to a fixed enumeration order. Each step writes the larger operand first
   for + and *; independent steps come in the order their results are used.
   Compact prompts list the cards sorted by rank, so one multiset is one
   prompt; full prompts keep the dealt order.

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

SPLITS = ("train", "val", "test", "ood", "pretrain")  # pretrain only when task.pretrain_size > 0
# reward per status; "illegal" pays ILLEGAL_PENALTY per number error (1 or 2 of them)
REWARDS = {"correct": 5.0, "partial": 1.0, "wrong": -1.0, "malformed": -3.0}
ILLEGAL_PENALTY = -2.0
FACE_VALUES = {"id": (10, 10, 10), "ood": (11, 12, 13)}  # J, Q, K under each rule
FACES = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")  # FACES[rank - 1]
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1  # of the solvable ID number groups, held out

# hard caps on reading a completion (the arithmetic's own caps are in gp_arith)
MAX_COMPLETION_CHARS = 65536
MAX_JSON_CHARS = 1000      # the answer object is small; also bounds json's nesting
MAX_JSON_TRIES = 32        # '{' positions tried before the last '}'


# ---------------------------------------------------------------------------
# examples and splits


def _values(ranks, faces: tuple) -> list[int]:
    return [r if r <= 10 else faces[r - 11] for r in ranks]


def _faces_text(faces: tuple) -> str:
    if len(set(faces)) == 1:
        return f"J, Q and K each count as {faces[0]}"
    return f"J, Q and K count as {faces[0]}, {faces[1]} and {faces[2]}"


def _prompt(cards: list[str], faces: tuple, format: str) -> str:
    if format == "compact":
        return f"{','.join(cards)};JQK={','.join(map(str, faces))}:"
    return ("Let's play General Points, the 24 game. Your four cards are "
            f"{', '.join(cards)}. A card counts as its number: A counts as 1, and {_faces_text(faces)}. "
            "Write a formula that equals exactly 24, using the number of every card exactly once "
            "and only +, -, *, / and parentheses. Reply with a JSON object such as "
            '{"cards": ["A", "2", "3", "4"], "number": [1, 2, 3, 4], "formula": "(1+2+3)*4"}.')


def make_example(ranks: list[int], rule: str, id: str, format: str = "compact", faces: tuple | None = None) -> dict:
    """One hand (ranks 1..13, shown in the given order) under rule "id", "ood" or "mix" (pretraining,
    with explicit `faces`: the values of J, Q, K); must be solvable."""
    faces = tuple(faces) if faces is not None else FACE_VALUES[rule]
    cards, values = [FACES[r - 1] for r in ranks], _values(ranks, faces)
    steps = solve(values)
    if steps is None:
        raise ValueError(f"gp: hand {cards} cannot make {TARGET} under rule {rule!r}")
    if format == "compact":
        demonstration = ",".join(steps)
    else:
        demonstration = json.dumps({"cards": cards, "number": values, "formula": steps_to_formula(steps)})
    meta = {"rule": rule, "cards": cards, "values": values}
    if rule == "mix":
        meta["faces"] = list(faces)
    return {"id": id, "prompt": _prompt(cards, faces, format), "demonstration": demonstration,
            "answer": {"cards": cards, "values": values, "target": TARGET, "format": format}, "meta": meta}


def deal(rng: random.Random, forced_face: bool, faces: tuple, accept=lambda values: True) -> list[int]:
    """Ranks of one hand in dealt order, as the reference deals: 4 uniform ranks (ID), or 3 plus
    one forced J/Q/K, shuffled (OOD); redealt until solvable under `faces` and accepted."""
    while True:
        if forced_face:
            ranks = [rng.randint(1, 13) for _ in range(3)] + [rng.randint(11, 13)]
            rng.shuffle(ranks)
        else:
            ranks = [rng.randint(1, 13) for _ in range(4)]
        values = _values(ranks, faces)
        if solvable(values) and accept(values):
            return ranks


@functools.lru_cache(maxsize=None)
def _pools(seed: int) -> dict[str, list[tuple]]:
    """split -> the sorted rank multisets it may draw; val/test groups never reach train.
    "held_out" holds the sorted ID numbers of every val and test group."""
    hands = list(combinations_with_replacement(range(1, 14), 4))
    groups: dict[tuple, list] = {}
    for hand in hands:
        values = tuple(sorted(_values(hand, FACE_VALUES["id"])))
        if solvable(values):
            groups.setdefault(values, []).append(hand)
    keys = sorted(groups)
    random.Random(f"gp-groups-{seed}").shuffle(keys)
    n_test, n_val = round(TEST_FRACTION * len(keys)), round(VAL_FRACTION * len(keys))
    parts = {"test": keys[:n_test], "val": keys[n_test:n_test + n_val], "train": keys[n_test + n_val:]}
    pools = {split: sorted(h for k in ks for h in groups[k]) for split, ks in parts.items()}
    pools["held_out"] = keys[:n_test + n_val]
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


def _mix_example(rng: random.Random, held_out: frozenset, i: int, format: str) -> dict:
    """One pretraining example: random stated face values (never the OOD rule), either deal."""
    while True:
        faces = tuple(rng.randint(10, 13) for _ in range(3))
        if faces != FACE_VALUES["ood"]:
            break
    ranks = deal(rng, rng.random() < 0.5, faces, lambda values: tuple(sorted(values)) not in held_out)
    return make_example(sorted(ranks) if format == "compact" else ranks, "mix", f"gp-pretrain-{i}", format, faces)


def build_splits(tcfg) -> dict[str, list[dict]]:
    """train / val / test / ood (and pretrain when tcfg.pretrain_size > 0) examples,
    deterministic given tcfg.seed (tcfg: config.TaskConfig)."""
    pools = _pools(tcfg.seed)
    out = {}
    for split in ("train", "val", "test"):
        rng = random.Random(f"gp-{split}-{tcfg.seed}")  # one per split: sizes do not shift the others
        examples = []
        for i, hand in enumerate(_draw(rng, pools[split], getattr(tcfg, f"{split}_size"), split != "train")):
            ranks = list(hand)
            if tcfg.format != "compact":
                rng.shuffle(ranks)  # as dealt; compact keeps rank order (one prompt per multiset)
            examples.append(make_example(ranks, "id", f"gp-{split}-{i}", tcfg.format))
        out[split] = examples
    rng = random.Random(f"gp-ood-{tcfg.seed}")
    hands = [deal(rng, True, FACE_VALUES["ood"]) for _ in range(tcfg.ood_size)]
    out["ood"] = [make_example(sorted(h) if tcfg.format == "compact" else h, "ood", f"gp-ood-{i}", tcfg.format)
                  for i, h in enumerate(hands)]
    if tcfg.pretrain_size > 0:
        rng, held_out = random.Random(f"gp-pretrain-{tcfg.seed}"), frozenset(pools["held_out"])
        out["pretrain"] = [_mix_example(rng, held_out, i, tcfg.format) for i in range(tcfg.pretrain_size)]
    return out


# ---------------------------------------------------------------------------
# verifier


def _score(status: str, **info) -> Score:
    if status == "illegal":
        return Score(ILLEGAL_PENALTY * len(info["errors"]), status, info)
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
