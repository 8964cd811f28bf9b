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
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections import Counter
from fractions import Fraction
from itertools import combinations_with_replacement

from amft_cli.tasks.base import Score

SPLITS = ("train", "val", "test", "ood")
TARGET = 24
REWARDS = {"correct": 5.0, "wrong": -1.0, "illegal": -2.0, "malformed": -3.0}
FACES = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")  # FACES[rank - 1]
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1  # of the solvable ID number groups, held out

# hard caps that bound the verifier's time whatever the model writes
MAX_COMPLETION_CHARS = 65536
MAX_JSON_CHARS = 1000      # the answer object is small; also bounds json's nesting
MAX_JSON_TRIES = 32        # '{' positions tried before the last '}'
MAX_FORMULA_CHARS = 256
MAX_FORMULA_TOKENS = 64
MAX_DEPTH = 16             # parentheses nesting
MAX_DIGITS = 6             # per integer literal
MAX_STEPS_CHARS = 128

_OP_COST = {"+": 0, "-": 1, "*": 2, "/": 3}
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


class _Malformed(ValueError):
    """Text the verifier cannot read; carries the reason."""


# ---------------------------------------------------------------------------
# solver


def _combine(a: Fraction, b: Fraction) -> list[tuple]:
    """Every step (x, op, y, result) on a and b; + and * put the larger operand first."""
    hi, lo = (a, b) if a >= b else (b, a)
    steps = [(hi, "+", lo, hi + lo), (hi, "*", lo, hi * lo), (hi, "-", lo, hi - lo)]
    if hi != lo:
        steps.append((lo, "-", hi, lo - hi))
    if lo != 0:
        steps.append((hi, "/", lo, hi / lo))
    if hi != 0 and hi != lo:
        steps.append((lo, "/", hi, lo / hi))
    return steps


def _step_cost(step: tuple) -> int:
    result = step[3]
    cost = _OP_COST[step[1]] + (4 if result > TARGET else 0)
    return cost + (100 if result.denominator != 1 else 0) + (100 if result < 0 else 0)


def _splits(values: tuple):
    """Each unordered split of a sorted multiset into two non-empty sorted parts, once."""
    n, seen = len(values), set()
    for mask in range(1, 2 ** (n - 1)):  # the last element always goes right: no mirror splits
        left = tuple(v for i, v in enumerate(values) if mask >> i & 1)
        right = tuple(v for i, v in enumerate(values) if not mask >> i & 1)
        key = (min(left, right), max(left, right))
        if key not in seen:
            seen.add(key)
            yield left, right


def _last_steps(values: tuple, partners):
    """(cost, steps) of every solution tree over `values`, one per root step.

    The root joins the two parts of a split; each part is made the cheapest
    way (_reach). partners(a, reach_right) picks the right-part values b to try.
    """
    for left, right in _splits(values):
        reach_right = _reach(right)
        for a, (cost_a, steps_a) in _reach(left).items():
            for b in partners(a, reach_right):
                cost_b, steps_b = reach_right[b]
                for step in _combine(a, b):
                    # the sub-steps of the step's first operand come first
                    sub = steps_a + steps_b if step[0] == a else steps_b + steps_a
                    yield cost_a + cost_b + _step_cost(step), sub + (step,)


@functools.lru_cache(maxsize=None)
def _reach(values: tuple) -> dict:
    """value -> (cost, steps): the cheapest way to make each value from all of `values`."""
    if len(values) == 1:
        return {values[0]: (0, ())}
    best: dict = {}
    for cost, steps in _last_steps(values, lambda a, reach: reach):
        result = steps[-1][3]
        if result not in best or cost < best[result][0]:
            best[result] = (cost, steps)
    return best


def _partners(a: Fraction, target: Fraction, reach: dict) -> list:
    """The b in `reach` for which some a-op-b can equal target (inverting each op)."""
    if a == 0 and target == 0:
        return list(reach)
    wanted = [target - a, a - target, a + target]
    if a != 0:
        wanted += [target / a, a * target]
    if target != 0:
        wanted.append(a / target)
    return [b for b in dict.fromkeys(wanted) if b in reach]


@functools.lru_cache(maxsize=None)
def _canonical(values: tuple, target: Fraction) -> tuple | None:
    """The cheapest steps making `target` from the sorted Fractions `values`, or None."""
    if len(values) == 1:
        return () if values[0] == target else None
    # only the root step is inverted (_partners): far cheaper than _reach(values)
    best = None
    for cost, steps in _last_steps(values, lambda a, reach: _partners(a, target, reach)):
        if steps[-1][3] == target and (best is None or cost < best[0]):
            best = (cost, steps)
    return None if best is None else best[1]


def _num(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _operand(x: Fraction) -> str:
    return _num(x) if x.denominator == 1 and x >= 0 else f"({_num(x)})"


def solve(values: list[int], target: int = TARGET) -> list[str] | None:
    """The canonical solution as binary steps ["8/8=1", "7-1=6", "6*4=24"], or None.

    Exact Fraction search over every way to combine two remaining numbers;
    the result does not depend on the order of `values`.
    """
    if not 1 <= len(values) <= 6:
        raise ValueError(f"solve: expected 1 to 6 numbers, got {len(values)}")
    steps = _canonical(tuple(sorted(Fraction(v) for v in values)), Fraction(target))
    if steps is None:
        return None
    return [f"{_operand(a)}{op}{_operand(b)}={_num(r)}" for a, op, b, r in steps]


def steps_to_formula(steps: list[str]) -> str:
    """One formula with minimal parentheses: ["8/8=1", "7-1=6", "6*4=24"] -> "(7-8/8)*4"."""
    pool: list[tuple] = []  # (value, text, precedence) of results not yet used

    def take(value: Fraction) -> tuple:
        # equal values are interchangeable: any choice uses every card once
        for i, item in enumerate(pool):
            if item[0] == value:
                return pool.pop(i)
        return value, _operand(value), _ATOM

    for step in steps:
        a, op, b, result = _parse_step(step)
        (_, left, left_prec), (_, right, right_prec) = take(a), take(b)
        if left_prec < _PREC[op]:
            left = f"({left})"
        if right_prec < _PREC[op] or (right_prec == _PREC[op] and op in "-/"):
            right = f"({right})"
        pool.append((result, f"{left}{op}{right}", _PREC[op]))
    if len(pool) != 1:
        raise ValueError(f"steps_to_formula: steps leave {len(pool)} results, expected 1")
    return pool[0][1]


# ---------------------------------------------------------------------------
# examples and splits


def _values(ranks, rule: str) -> list[int]:
    return [r if rule == "ood" else min(r, 10) for r in ranks]


def _solvable(values: list[int]) -> bool:
    return _canonical(tuple(sorted(Fraction(v) for v in values)), Fraction(TARGET)) is not None


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
        if _solvable(list(values)):
            groups.setdefault(values, []).append(hand)
    keys = sorted(groups)
    random.Random(f"gp-groups-{seed}").shuffle(keys)
    n_test, n_val = round(TEST_FRACTION * len(keys)), round(VAL_FRACTION * len(keys))
    parts = {"test": keys[:n_test], "val": keys[n_test:n_test + n_val], "train": keys[n_test + n_val:]}
    pools = {split: sorted(h for k in ks for h in groups[k]) for split, ks in parts.items()}
    pools["ood"] = [h for h in hands if max(h) >= 11 and _solvable(_values(h, "ood"))]
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


def _fraction(text: str) -> Fraction:
    """A literal "7", "-5", "1/3" or "(1/3)"."""
    num, _, den = text.strip("()").partition("/")
    if den and int(den) == 0:
        raise _Malformed(f"zero denominator in {text!r}")
    return Fraction(int(num), int(den) if den else 1)


_LIT = r"-?\d{1,%d}(?:/\d{1,%d})?" % (MAX_DIGITS, MAX_DIGITS)
_OPND = r"\d{1,%d}|\(%s\)" % (MAX_DIGITS, _LIT)
_STEP = re.compile(rf"({_OPND})([-+*/])({_OPND})=({_LIT}|\({_LIT}\))")


def _parse_step(text: str) -> tuple:
    """ "7-1=6" -> (Fraction(7), "-", Fraction(1), Fraction(6))."""
    m = _STEP.fullmatch(text)
    if m is None:
        raise _Malformed(f"cannot read step {text[:40]!r}")
    return _fraction(m[1]), m[2], _fraction(m[3]), _fraction(m[4])


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b  # ZeroDivisionError is the caller's


def _score(status: str, **info) -> Score:
    return Score(REWARDS[status], status, info)


def _score_steps(values: list[int], target: int, completion: str) -> Score:
    text = completion.strip().split("\n", 1)[0].replace(" ", "")
    if not text or len(text) > MAX_STEPS_CHARS:
        raise _Malformed("empty" if not text else "too long")
    steps = [_parse_step(s) for s in text.split(",")]
    available = [Fraction(v) for v in values]
    for a, _, b, claimed in steps:
        for x in (a, b):
            if x not in available:
                return _score("illegal", error=f"{_num(x)} is not available")
            available.remove(x)
        available.append(claimed)
    if len(available) != 1:
        return _score("illegal", error=f"unused numbers: {[_num(x) for x in available]}")
    for a, op, b, claimed in steps:
        try:
            if _apply(a, op, b) != claimed:
                return _score("wrong", error=f"{_num(a)}{op}{_num(b)} is not {_num(claimed)}")
        except ZeroDivisionError:
            return _score("wrong", error="division by zero")
    if available[0] != target:
        return _score("wrong", error=f"result {_num(available[0])}, not {target}", value=_num(available[0]))
    return _score("correct", value=str(target))


_SYMBOLS = {"+": "+", "-": "-", "\u2212": "-", "*": "*", "\u00d7": "*", "/": "/", "\u00f7": "/",
            "(": "(", ")": ")"}


def _tokenize(formula: str) -> list:
    if len(formula) > MAX_FORMULA_CHARS:
        raise _Malformed("formula too long")
    tokens, i = [], 0
    while i < len(formula):
        j = i
        while j < len(formula) and formula[j] in "0123456789":
            j += 1
        if j > i:
            if j - i > MAX_DIGITS:
                raise _Malformed("number too long")
            tokens.append(int(formula[i:j]))
        elif not formula[i].isspace():
            if formula[i] not in _SYMBOLS:
                raise _Malformed(f"unexpected character {formula[i]!r}")
            tokens.append(_SYMBOLS[formula[i]])
        i = max(j, i + 1)
    if len(tokens) > MAX_FORMULA_TOKENS:
        raise _Malformed("formula too long")
    return tokens


class _Parser:
    """Recursive descent over tokens to a tree: int leaves, (op, left, right) nodes.

    expr := term (("+" | "-") term)*   term := factor (("*" | "/") factor)*
    factor := INT | "(" expr ")"       (no unary minus; nesting capped at MAX_DEPTH)
    """

    def __init__(self, tokens: list):
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def parse(self):
        tree = self.expr()
        if self.pos != len(self.tokens):
            raise _Malformed(f"unexpected {self.tokens[self.pos]!r}")
        return tree

    def next(self):
        self.pos += 1
        return self.tokens[self.pos - 1] if self.pos <= len(self.tokens) else None

    def expr(self):
        return self.binary(("+", "-"), self.term)

    def term(self):
        return self.binary(("*", "/"), self.factor)

    def binary(self, ops: tuple, operand):
        tree = operand()
        while self.pos < len(self.tokens) and self.tokens[self.pos] in ops:
            tree = (self.next(), tree, operand())
        return tree

    def factor(self):
        token = self.next()
        if isinstance(token, int):
            return token
        if token != "(":
            raise _Malformed(f"expected a number or '(', got {token!r}")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Malformed("parentheses nested too deep")
        tree = self.expr()
        if self.next() != ")":
            raise _Malformed("unbalanced parentheses")
        self.depth -= 1
        return tree


def _leaves(tree) -> list[int]:
    return [tree] if isinstance(tree, int) else _leaves(tree[1]) + _leaves(tree[2])


def _evaluate(tree) -> Fraction:
    if isinstance(tree, int):
        return Fraction(tree)
    return _apply(_evaluate(tree[1]), tree[0], _evaluate(tree[2]))


def _extract_formula(completion: str) -> str:
    """`formula` of the last {...} object; single-quoted pseudo-JSON is tolerated."""
    end = completion.rfind("}")
    if end < 0:
        raise _Malformed("no JSON object")
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
            raise _Malformed("the last JSON object has no string 'formula'")
        return obj["formula"]
    m = re.search(r"""["']formula["']\s*:\s*["']([^"'\n]{0,%d})["']""" % MAX_FORMULA_CHARS,
                  completion[low:end + 1])
    if m is None:
        raise _Malformed("no JSON object with a 'formula'")
    return m[1]


def _score_formula(values: list[int], target: int, completion: str) -> Score:
    formula = _extract_formula(completion)
    lhs, eq, rhs = formula.partition("=")  # "…=24" is allowed, as the paper's prompt invites
    tree = _Parser(_tokenize(lhs)).parse()
    claimed = None
    if eq:
        rhs_tokens = _tokenize(rhs)
        if len(rhs_tokens) != 1 or not isinstance(rhs_tokens[0], int):
            raise _Malformed("right of '=' is not one integer")
        claimed = rhs_tokens[0]
    used = _leaves(tree)
    if Counter(used) != Counter(values):
        return _score("illegal", error=f"numbers {sorted(used)}, cards {sorted(values)}")
    try:
        value = _evaluate(tree)
    except ZeroDivisionError:
        return _score("wrong", error="division by zero")
    if value != target or claimed not in (None, target):
        said = "" if claimed is None else f" (claims {claimed})"
        return _score("wrong", error=f"value {_num(value)}{said}, not {target}", value=_num(value))
    return _score("correct", value=str(target))


def score(example: dict, completion: str) -> Score:
    """Verify a completion for `example` (format taken from example["answer"]); never eval/exec."""
    answer = example["answer"]
    try:
        if len(completion) > MAX_COMPLETION_CHARS:
            raise _Malformed("completion too long")
        if answer.get("format", "full") == "compact":
            return _score_steps(answer["values"], answer["target"], completion)
        return _score_formula(answer["values"], answer["target"], completion)
    except _Malformed as e:
        return _score("malformed", error=str(e))
