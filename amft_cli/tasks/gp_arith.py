"""Exact-fraction arithmetic for General Points (the 24 game): solver and checkers.

Pure arithmetic on numbers, with no notion of cards, prompts, splits or
rewards (those are in tasks/gp.py):
- `solve`: the canonical solution as binary steps "8/8=1", found by exact
  Fraction search. Canonical = least summed step cost, where a fractional or
  negative intermediate costs 100, a result above 24 costs 4, and an
  operation costs + 0, - 1, * 2, / 3 (easy arithmetic first); ties go to a
  fixed enumeration order. + and * write the larger operand first;
  independent steps come in the order their results are used.
- `steps_to_formula`: those steps as one formula with minimal parentheses.
- `check_steps` / `check_formula`: judge a step list or a formula against
  the numbers and the target, returning (status, info) with status
  "correct", "partial" (formulas only), "wrong" or "illegal"; unreadable
  text raises `Malformed`. An "illegal" verdict lists its number errors in
  info["errors"]: at most one for numbers that are no card or used too often,
  plus one for cards left unused (the reward adds a penalty per error, as the
  reference does). Formulas go through a recursive-descent parser (integers,
  + - * /, parentheses), never eval. The MAX_* caps bound the time whatever
  the model writes.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from fractions import Fraction

TARGET = 24

# hard caps that bound the verifier's time whatever the model writes
MAX_FORMULA_CHARS = 256
MAX_FORMULA_TOKENS = 64
MAX_DEPTH = 16             # parentheses nesting
MAX_DIGITS = 6             # per integer literal
MAX_STEPS_CHARS = 128

_OP_COST = {"+": 0, "-": 1, "*": 2, "/": 3}
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


class Malformed(ValueError):
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


def solvable(values: list[int] | tuple[int, ...], target: int = TARGET) -> bool:
    """Whether `values` can make `target` (same search as `solve`, no formatting, no size check)."""
    return _canonical(tuple(sorted(Fraction(v) for v in values)), Fraction(target)) is not None


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
# checking binary steps


def _fraction(text: str) -> Fraction:
    """A literal "7", "-5", "1/3" or "(1/3)"."""
    num, _, den = text.strip("()").partition("/")
    if den and int(den) == 0:
        raise Malformed(f"zero denominator in {text!r}")
    return Fraction(int(num), int(den) if den else 1)


_LIT = r"-?\d{1,%d}(?:/\d{1,%d})?" % (MAX_DIGITS, MAX_DIGITS)
_OPND = r"\d{1,%d}|\(%s\)" % (MAX_DIGITS, _LIT)
_STEP = re.compile(rf"({_OPND})([-+*/])({_OPND})=({_LIT}|\({_LIT}\))")


def _parse_step(text: str) -> tuple:
    """ "7-1=6" -> (Fraction(7), "-", Fraction(1), Fraction(6))."""
    m = _STEP.fullmatch(text)
    if m is None:
        raise Malformed(f"cannot read step {text[:40]!r}")
    return _fraction(m[1]), m[2], _fraction(m[3]), _fraction(m[4])


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b  # ZeroDivisionError is the caller's


def _unused_error(unused: list[Fraction]) -> str:
    return f"you did not use {', '.join(_num(x) for x in sorted(unused))}"


def check_steps(values: list[int], target: int, text: str) -> tuple[str, dict]:
    """(status, info) for comma-separated steps "7+4=11,11-8=3,8*3=24" (no spaces).

    Each step must combine two available numbers (unused values, earlier
    claimed results); availability is checked before arithmetic, so one false
    claim is "wrong", not also "illegal". An operand that is not available
    consumes nothing, so the card it stands in for shows up as unused: like a
    formula with a wrong number and a missing card, that is two errors.
    Raises Malformed on unreadable text.
    """
    if not text or len(text) > MAX_STEPS_CHARS:
        raise Malformed("empty" if not text else "too long")
    steps = [_parse_step(s) for s in text.split(",")]
    available, missing = [Fraction(v) for v in values], []
    for a, _, b, claimed in steps:
        for x in (a, b):
            if x in available:
                available.remove(x)
            else:
                missing.append(x)
        available.append(claimed)
    errors = [f"{', '.join(_num(x) for x in missing)} not available"] if missing else []
    if len(available) != 1:
        errors.append(_unused_error(available[:-1]))  # the last one is the answer
    if errors:
        return "illegal", {"error": "; ".join(errors), "errors": errors}
    for a, op, b, claimed in steps:
        try:
            if _apply(a, op, b) != claimed:
                return "wrong", {"error": f"{_num(a)}{op}{_num(b)} is not {_num(claimed)}"}
        except ZeroDivisionError:
            return "wrong", {"error": "division by zero"}
    if available[0] != target:
        return "wrong", {"error": f"result {_num(available[0])}, not {target}", "value": _num(available[0])}
    return "correct", {"value": str(target)}


# ---------------------------------------------------------------------------
# checking a formula


_SYMBOLS = {"+": "+", "-": "-", "\u2212": "-", "*": "*", "\u00d7": "*", "/": "/", "\u00f7": "/",
            "(": "(", ")": ")"}


def _tokenize(formula: str) -> list:
    if len(formula) > MAX_FORMULA_CHARS:
        raise Malformed("formula too long")
    tokens, i = [], 0
    while i < len(formula):
        j = i
        while j < len(formula) and formula[j] in "0123456789":
            j += 1
        if j > i:
            if j - i > MAX_DIGITS:
                raise Malformed("number too long")
            tokens.append(int(formula[i:j]))
        elif not formula[i].isspace():
            if formula[i] not in _SYMBOLS:
                raise Malformed(f"unexpected character {formula[i]!r}")
            tokens.append(_SYMBOLS[formula[i]])
        i = max(j, i + 1)
    if len(tokens) > MAX_FORMULA_TOKENS:
        raise Malformed("formula too long")
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
            raise Malformed(f"unexpected {self.tokens[self.pos]!r}")
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
            raise Malformed(f"expected a number or '(', got {token!r}")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise Malformed("parentheses nested too deep")
        tree = self.expr()
        if self.next() != ")":
            raise Malformed("unbalanced parentheses")
        self.depth -= 1
        return tree


def _leaves(tree) -> list[int]:
    return [tree] if isinstance(tree, int) else _leaves(tree[1]) + _leaves(tree[2])


def _evaluate(tree) -> Fraction:
    if isinstance(tree, int):
        return Fraction(tree)
    return _apply(_evaluate(tree[1]), tree[0], _evaluate(tree[2]))


def number_errors(used: list[int], values: list[int]) -> list[str]:
    """The number errors of a formula using `used` for cards `values` (as the reference counts
    them): one for numbers that are no card or appear too often, one for cards left unused."""
    used_count, card_count = Counter(used), Counter(values)
    errors = []
    invalid = sorted(n for n in used_count if n not in card_count)
    overused = sorted(n for n in used_count if n in card_count and used_count[n] > card_count[n])
    if invalid:
        errors.append(f"{', '.join(map(str, invalid))} {'is' if len(invalid) == 1 else 'are'} not on the cards")
    elif overused:
        errors.append(f"you used {', '.join(map(str, overused))} more often than dealt")
    unused = card_count - used_count
    if unused:
        errors.append(_unused_error([Fraction(n) for n in unused.elements()]))
    return errors


def _partial(tokens: list, values: list[int], target: int) -> bool:
    """Every card used, only closing parentheses missing, and closing them makes `target`:
    the one way a formula can be a proper prefix of a solution (the reference's "partial")."""
    unclosed = tokens.count("(") - tokens.count(")")
    if unclosed <= 0 or number_errors([t for t in tokens if isinstance(t, int)], values):
        return False
    try:
        return _evaluate(_Parser(tokens + [")"] * unclosed).parse()) == target
    except (Malformed, ZeroDivisionError):
        return False


def check_formula(values: list[int], target: int, formula: str) -> tuple[str, dict]:
    """(status, info) for a formula such as "(7-8/8)*4", optionally "...=24".

    Numbers are checked before the value, so wrong numbers are "illegal" even
    if the formula also divides by zero; division by zero with the right
    numbers is "wrong" (no value, so not the target). A formula that stops
    before its closing parentheses is "partial" when closing them solves the
    hand. Raises Malformed on unreadable text.
    """
    lhs, eq, rhs = formula.partition("=")  # "…=24" is allowed, as the paper's prompt invites
    tokens = _tokenize(lhs)
    try:
        tree = _Parser(tokens).parse()
    except Malformed:
        if not eq and _partial(tokens, values, target):
            return "partial", {"error": "the formula is unfinished: close its parentheses"}
        raise
    claimed = None
    if eq:
        rhs_tokens = _tokenize(rhs)
        if len(rhs_tokens) != 1 or not isinstance(rhs_tokens[0], int):
            raise Malformed("right of '=' is not one integer")
        claimed = rhs_tokens[0]
    errors = number_errors(_leaves(tree), values)
    if errors:
        return "illegal", {"error": "; ".join(errors), "errors": errors}
    try:
        value = _evaluate(tree)
    except ZeroDivisionError:
        return "wrong", {"error": "division by zero"}
    if value != target or claimed not in (None, target):
        said = "" if claimed is None else f" (claims {claimed})"
        return "wrong", {"error": f"value {_num(value)}{said}, not {target}", "value": _num(value)}
    return "correct", {"value": str(target)}
