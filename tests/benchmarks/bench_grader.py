"""Per-call cost of the math grader's time bound: math-verify in a supervised worker
process (tasks/bounded_verify.py) vs math-verify in this process, as LUFFY calls it.

    python tests/benchmarks/bench_grader.py [--rounds N]

Rows (each a typical answer; every call gets a fresh prediction string, so no
parse cache answers for it):

    boxed, number      rule "boxed" on "\\boxed{N}" vs gold N: the integer fast path, no math-verify
    boxed, fraction    rule "boxed" on "\\boxed{\\frac{N}{2N}}" vs gold 0.5: math-verify
    luffy, sentence    rule "luffy" on "...</think> The answer is $\\frac{N}{2N}$." vs gold 1/2

For the last two, "in-process" is parse + verify called here in the main
thread with math-verify's signal timers (what LUFFY's reward does, here with
the parsed gold kept like the worker keeps it); "bounded" is `grade`, the
same work shipped to the worker. Calls alternate between the
two, so load from other programs hits both alike; each cell is the median of
N calls and the overhead column is their difference, the claim to read.
"""

from __future__ import annotations

import argparse
import statistics
import time

from math_verify import parse, verify

from amft_cli.tasks.math_grader import grade, luffy_answer_text


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_golds: dict = {}


def in_process(gold_text: str, pred_text: str) -> bool:
    """parse + verify here; the gold parsed once and kept, as the worker keeps it."""
    if gold_text not in _golds:
        _golds[gold_text] = parse(gold_text)
    return verify(_golds[gold_text], parse(pred_text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    grade("\\boxed{\\frac{1}{2}}", "0.5")  # start the supervisor (a one-off second), warm both paths
    in_process("\\boxed{0.5}", "\\boxed{\\frac{1}{2}}")

    rows = {"boxed, number": ([], None), "boxed, fraction": ([], []), "luffy, sentence": ([], [])}
    for n in range(1, args.rounds + 1):
        rows["boxed, number"][0].append(timed(lambda: grade(f"so \\boxed{{{n}}}", str(n))))
        boxed = f"\\boxed{{\\frac{{{n}}}{{{2 * n}}}}}"
        rows["boxed, fraction"][0].append(timed(lambda: grade(boxed, "0.5")))
        rows["boxed, fraction"][1].append(timed(lambda: in_process("\\boxed{0.5}", boxed)))
        response = f"Halve it.</think> The answer is $\\frac{{{n}}}{{{2 * n}}}$."
        rows["luffy, sentence"][0].append(timed(lambda: grade(response, "1/2", rule="luffy")))
        rows["luffy, sentence"][1].append(timed(lambda: in_process("$1/2$", luffy_answer_text(response))))

    print(f"| grading call ({args.rounds} calls each, median) | bounded (ms) | in-process (ms) | overhead (ms) |")
    print("|---|---|---|---|")
    for name, (bounded, local) in rows.items():
        b = statistics.median(bounded) * 1e3
        if local is None:
            print(f"| {name} | {b:.3f} | — (no math-verify) | — |")
        else:
            l_ = statistics.median(local) * 1e3
            print(f"| {name} | {b:.3f} | {l_:.3f} | {b - l_:+.3f} |")


if __name__ == "__main__":
    main()
