"""The math grader is bounded in time in any thread: hostile answers and hostile golds
each cost < 1 s, from a non-main thread (where math-verify's own signal timers are off)."""

import os
import signal
import threading
import time

import pytest

from amft_cli.tasks import bounded_verify as bv
from amft_cli.tasks.math_grader import MAX_NESTING, grade

NESTED_450 = "(" * 450 + "1" + ")" * 450
# (completion, gold, rule, statuses that may come back). The towers need sympy far longer than
# the deadline (main-thread math-verify: 2 s; in a thread: never returned in 10 min).
HOSTILE = [
    ("\\boxed{9^{9^{9}}}", "7", "boxed", {"timeout"}),
    ("\\boxed{10^{10^{10^{10}}}}", "7", "boxed", {"timeout"}),
    ("\\boxed{" + NESTED_450 + "}", "1", "boxed", {"wrong"}),  # refused before parsing
    ("\\boxed{7}", "9^{9^{9}}", "boxed", {"timeout"}),         # hostile gold
    ("\\boxed{7}", NESTED_450, "boxed", {"wrong"}),
    ("<think>a</think> so $9^{9^{9}}$", "7", "luffy", {"timeout"}),
    ("<think>a</think> it is 7", "10^{10^{10^{10}}}", "luffy", {"timeout"}),
    ("<think>a</think> " + NESTED_450, "1", "luffy", {"wrong"}),
]


def in_thread(fn):
    """fn() run in a daemon thread; its result, or a failure if it does not return in 30 s."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(30)
    assert out, "grading hung in a non-main thread"
    return out[0]


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    """Start a supervisor first: its one-off start (importing sympy) is not a grading call."""
    assert grade("\\boxed{1/2}", "\\frac{1}{2}", fast=False).correct


def timed_grade(completion, gold, rule):
    t0 = time.monotonic()
    score = grade(completion, gold, rule=rule)
    return score, time.monotonic() - t0


@pytest.mark.parametrize("completion, gold, rule, statuses", HOSTILE,
                         ids=["tower", "tower4", "nest450", "gold-tower", "gold-nest", "luffy-tower",
                              "luffy-gold-tower", "luffy-nest"])
def test_hostile_input_costs_under_a_second_off_the_main_thread(completion, gold, rule, statuses):
    score, seconds = in_thread(lambda: timed_grade(completion, gold, rule))
    assert seconds < 1.0 and score.reward == 0.0 and score.status in statuses, (seconds, score)


SPACES = " " * 100_000


@pytest.mark.parametrize("completion", [
    f"a</think> answer{SPACES}x",                 # the answer-phrase regex must not backtrack over runs
    f"a</think> answer is{SPACES}:{SPACES}(((",
    "a</think> " + "answer " * 50_000,
    f"a</think> \\boxed{{B{SPACES}x}}",           # the boxed-letter regex likewise (no length cap here)
])
def test_letter_extraction_is_linear_on_hostile_text(completion):
    score, seconds = in_thread(lambda: timed_grade(completion, "C", "luffy"))
    assert seconds < 1.0 and score.status == "malformed", (seconds, score)


def test_the_deadline_itself_bounds_what_the_precheck_would_refuse():
    """Past the nesting check, math-verify on 450 nested parentheses is stopped by the kill."""
    t0 = time.monotonic()
    status, error = in_thread(lambda: bv.check("boxed", "1", NESTED_450))
    assert time.monotonic() - t0 < 1.0 and status == "timeout" and "exceeded" in error


def test_a_killed_worker_is_replaced_and_grading_goes_on():
    assert in_thread(lambda: grade("\\boxed{9^{9^{9}}}", "7")).status == "timeout"
    t0 = time.monotonic()
    assert in_thread(lambda: grade("\\boxed{\\frac{2}{4}}", "0.5")).correct
    assert time.monotonic() - t0 < 1.0


def test_concurrent_callers_each_get_their_own_bound():
    barrier = threading.Barrier(2)
    results = []

    def call(completion):
        barrier.wait()
        t0 = time.monotonic()
        results.append((grade(completion, "7"), time.monotonic() - t0))

    threads = [threading.Thread(target=call, args=(c,), daemon=True)
               for c in ("\\boxed{9^{9^{9}}}", "\\boxed{7.0+0}")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = sorted(s.status for s, _ in results)
    assert statuses == ["correct", "timeout"]
    # the second caller may pay a supervisor start, the hostile one only its deadline
    assert [sec for s, sec in results if s.status == "timeout"][0] < 1.0 + bv.START_TIMEOUT_S


def test_nesting_up_to_the_cap_goes_to_math_verify_and_deeper_is_refused():
    answer = "(" * MAX_NESTING + "7" + ")" * MAX_NESTING  # the box content's depth is what counts
    at_cap = grade(f"\\boxed{{{answer}}}", "7", fast=False)
    assert at_cap.info["via"] == "math_verify" and "nested" not in at_cap.info.get("error", "")
    over = grade(f"\\boxed{{({answer})}}", "7", fast=False)
    assert (over.status, over.info["error"]) == ("wrong", f"nested deeper than {MAX_NESTING} brackets")


def test_a_dead_supervisor_is_replaced():
    sup = bv._Supervisor()
    assert sup.call(("boxed", "2", "2", bv.DEADLINE_S), 60) == ("correct", None)
    os.killpg(sup.proc.pid, signal.SIGKILL)
    sup.proc.wait()
    assert sup.call(("boxed", "2", "2", bv.DEADLINE_S), 5) is None  # dead: the caller gets no verdict
    sup.close()


def test_math_verify_errors_become_wrong(monkeypatch):
    """The worker loop turns an exception inside math-verify into a "wrong" verdict, named by type."""
    from multiprocessing import Pipe

    def boom(*a):
        raise ZeroDivisionError("sympy exploded")

    monkeypatch.setattr(bv, "_check", boom)
    ours, worker_end = Pipe()
    thread = threading.Thread(target=bv._work, args=(worker_end,), daemon=True)
    thread.start()
    ours.send(("boxed", "1", "2"))
    assert ours.recv() == ("wrong", "ZeroDivisionError")
    ours.close()
    thread.join(5)
    assert not thread.is_alive()
