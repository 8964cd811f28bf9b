"""The math verifier: two grading rules over math-verify, time-bounded in any thread.

rule "luffy" (the math-qwen2.5 preset's default) is LUFFY's training reward,
`reward_impl_version: 3` (ElliottYan/LUFFY, luffy/verl/verl/mix_src/
main_mix_ppo.py: `RewardManager.__call__` prefixes the decoded response with
"<think>\\n" and `_select_rm_score_fn` picks `reward_fn_math_verify` from
mix_src/math_verify_reward.py; there `RewardMathFn.__call__` keeps
`response.split("</think>")[1]`, and `labeling_responses` calls
`verify(parse("$" + gold + "$"), parse(text))`): the text after the first
`</think>` (up to a second one, if any) is parsed whole, so an unboxed final
answer ("The answer is 42.", "$18$", "x = 7") counts; no `</think>` at all
scores 0. Reward 1.0 or 0.0 (LUFFY's `is_correct`).

rule "boxed" (ours; the tiny and word-problem tasks): the answer is the last
`\\boxed{...}` in the text after the LAST `</think>`, or in the whole text when
there is none; no box scores 0 ("malformed"). The gold is parsed as
`\\boxed{gold}`.

Where both rules depart from LUFFY's code:

1. A gold answer that is one letter A-J is a multiple-choice answer graded by
   letter, not by math-verify: the letter in the last `\\boxed{}` (`B`, `(b)`,
   `\\text{B}`), and under rule "luffy", when no box holds a letter, the last
   "ANSWER: B" / "the answer is (B)." phrase that ends its line (GPQA's prompt
   in LUFFY's file asks for "ANSWER: $LETTER"). math-verify credits a letter
   only inside LaTeX and would take any single-letter symbol ("$c$") for one.
2. Time bound: every math-verify call runs in a worker process killed after
   bounded_verify.DEADLINE_S (0.75 s) and then scores 0 ("timeout"); LUFFY
   runs it in-process with math-verify's 5 s signal timers. Answers nested
   deeper than MAX_NESTING brackets score 0 without parsing (they only come
   from degenerate generations and cost math-verify seconds).
3. rule "boxed" only: plain integers/decimals on both sides skip math-verify
   (`fast_compare`), deciding only where math-verify's verdict is certain;
   boxed answers longer than MAX_ANSWER_CHARS score 0 without parsing.

math-verify's own errors on odd input become a "wrong" Score, never a crash.
"""

from __future__ import annotations

import re
from fractions import Fraction

from amft_cli.tasks import bounded_verify
from amft_cli.tasks.base import Score

THINK_START, THINK_END = "<think>", "</think>"
RULES = ("luffy", "boxed")
MAX_ANSWER_CHARS = 1000  # rule "boxed": longer boxed answers are wrong without parsing
MAX_NESTING = 20         # deeper ({[ nesting is wrong without parsing: math-verify's boxed regex slows
                         # with every level (5 levels: ~0.1 s; 450: seconds), real answers stay under 6
LETTERS = "ABCDEFGHIJ"


# ---------------------------------------------------------------------------
# where the answer is


def answer_text(completion: str) -> str:
    """Rule "boxed": the text after the last `</think>`, or the whole text when there is none."""
    return completion.rsplit(THINK_END, 1)[-1]


def luffy_answer_text(completion: str) -> str | None:
    """Rule "luffy": the text after the first `</think>` up to a second one; None without any."""
    parts = (THINK_START + "\n" + completion).split(THINK_END)
    return parts[1] if len(parts) > 1 else None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces matched; None if absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    begin = start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None  # cut off before the closing brace


def nesting_depth(text: str) -> int:
    """Deepest nesting of (), [] and {} (unbalanced closers ignored)."""
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}" and depth:
            depth -= 1
    return deepest


_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def fast_compare(gold: str, pred: str) -> bool | None:
    """math-verify's verdict on two plain numbers, without calling it; None = unsure.

    Integers compare exactly, as math-verify compares two sympy Integers. With
    a decimal on either side math-verify rounds both to 6 decimals, so here
    only exact equality (correct) and a gap of at least 1e-5 (wrong) are
    decided, for values under 1e6 with at most 12 significant digits, where
    float error (< 1e-9) cannot flip the rounding.
    """
    gold, pred = gold.strip(), pred.strip()
    if not (_NUMBER.fullmatch(gold) and _NUMBER.fullmatch(pred)):
        return None
    if "." not in gold and "." not in pred:
        return int(gold) == int(pred) if max(len(gold), len(pred)) <= MAX_ANSWER_CHARS else None
    if max(len(re.sub(r"\D", "", s).lstrip("0")) for s in (gold, pred)) > 12:
        return None
    g, p = Fraction(gold), Fraction(pred)
    if max(abs(g), abs(p)) >= 10**6:
        return None
    if g == p:
        return True
    return False if abs(g - p) >= Fraction(1, 10**5) else None


# ---------------------------------------------------------------------------
# multiple choice


def _mc_letter(answer: str) -> str | None:
    """The option letter in a boxed answer: `B`, `(b)`, `\\text{B}`, `B.`; else None."""
    text = answer
    for _ in range(3):  # unwrap nested \text{\textbf{B}}
        text = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", text)
    text = text.strip().strip("$").strip()
    m = re.fullmatch(r"\(?\s*([A-Ja-j])\s*(?:\)\s*)?[.:]?", text)
    return m.group(1).upper() if m else None


def gold_letter(gold: str) -> str | None:
    """The gold's option letter when it is one (`B`, `(B)`), else None."""
    text = gold.strip().strip("()").strip()
    return text if len(text) == 1 and text in LETTERS else None


# "ANSWER: C", "The answer is (C).", "answer: **C**": the letter ends its line, so "Answer: I think" is no answer
# (no two repeats of one character class meet, so matching stays linear on hostile text)
_ANSWER_PHRASE = re.compile(r"answer(?:\s+is)?\s*(?:[:\-]\s*)?[*(]*\$?([A-J])\$?[)*.]*[ \t]*(?:\n|$)", re.IGNORECASE)


def _letter_in_text(text: str) -> str | None:
    """Rule "luffy": the letter in the last box, else in the last "answer: X" phrase ending its line."""
    boxed = last_boxed(text)
    letter = _mc_letter(boxed) if boxed is not None else None
    if letter is None:
        phrases = [m.group(1) for m in _ANSWER_PHRASE.finditer(text) if m.group(1).isupper()]
        letter = phrases[-1] if phrases else None
    return letter


def _grade_letter(letter: str | None, gold: str, pred) -> Score:
    if letter is None:
        return Score(0.0, "malformed", {"pred": pred, "error": "no option letter", "via": "letter"})
    ok = letter == gold
    return Score(float(ok), "correct" if ok else "wrong", {"pred": letter, "via": "letter"})


# ---------------------------------------------------------------------------
# the two rules


def _math_verify(rule: str, gold: str, pred: str, shown: str) -> Score:
    info = {"pred": shown, "via": "math_verify"}
    if nesting_depth(pred) > MAX_NESTING or nesting_depth(gold) > MAX_NESTING:
        return Score(0.0, "wrong", {**info, "error": f"nested deeper than {MAX_NESTING} brackets"})
    status, error = bounded_verify.check(rule, gold, pred)
    return Score(float(status == "correct"), status, {**info, "error": error} if error else info)


def _grade_boxed(completion: str, gold: str, fast: bool) -> Score:
    pred = last_boxed(answer_text(completion))
    if pred is None or not pred.strip():
        return Score(0.0, "malformed", {"pred": pred, "error": "no \\boxed{} answer"})
    if len(pred) > MAX_ANSWER_CHARS:
        return Score(0.0, "wrong", {"pred": pred[:100], "error": "answer too long"})
    letter = gold_letter(gold)
    if letter is not None:
        return _grade_letter(_mc_letter(pred), letter, pred)
    verdict = fast_compare(gold, pred) if fast else None
    if verdict is not None:
        return Score(float(verdict), "correct" if verdict else "wrong", {"pred": pred, "via": "fast"})
    return _math_verify("boxed", gold, pred, pred)


def _grade_luffy(completion: str, gold: str) -> Score:
    text = luffy_answer_text(completion)
    if text is None:
        return Score(0.0, "malformed", {"pred": None, "error": "no </think>"})
    letter = gold_letter(gold)
    if letter is not None:
        return _grade_letter(_letter_in_text(text), letter, text[-100:])
    return _math_verify("luffy", gold, text, text[-100:])


def grade(completion: str, gold: str, fast: bool = True, rule: str = "boxed") -> Score:
    """Reward 1.0 if `completion` answers `gold` under `rule` ("boxed" | "luffy"), else 0.0.

    Statuses: correct, wrong, malformed (no box / no `</think>` / no letter),
    timeout (math-verify ran past its deadline). `fast=False` forces
    math-verify even for plain numbers (tests compare both paths).
    """
    if rule not in RULES:
        raise ValueError(f"task.grader: expected one of {', '.join(RULES)}, got {rule!r}")
    gold = str(gold).strip().strip("$").strip()
    return _grade_luffy(completion, gold) if rule == "luffy" else _grade_boxed(completion, gold, fast)
