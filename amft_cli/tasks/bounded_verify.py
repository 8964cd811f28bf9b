"""math-verify with a hard time bound, from any thread or process.

math-verify's own timeouts use `signal.alarm`, which works only in the main
thread and cannot interrupt C code: computing `9^{9^{9}}` inside sympy ran
for ten minutes in a daemon thread and could not even be joined. So no
parse or verify runs in the caller's process. Each call goes, over a pipe,
to a small supervisor process (`python -m amft_cli.tasks.bounded_verify`),
which hands it to a worker it forked and waits at most `deadline_s`; a late
worker is killed (SIGKILL) and re-forked. The caller's wait is bounded by
construction, whatever sympy does, in whichever thread it runs; a grading
call that hits the deadline answers "timeout".

Why a supervisor and not a multiprocessing pool in the caller: forking the
training process (threads, CUDA) is unsafe, and spawn/forkserver children
re-import the caller's `__main__` script. The supervisor is a clean
single-threaded interpreter that imported math-verify once, so forking a
replacement worker takes milliseconds.

Cost per call: a round trip through two pipes on top of math-verify
itself, which is mostly the wait for the other processes to be scheduled:
measured +1.9 to +2.0 ms per call on this 2-core host at load average 7-9
(tests/benchmarks/bench_grader.py, interleaved with in-process calls of
0.2-1.4 ms). Answers that need no math-verify (the integer fast path of rule
"boxed", letters, refused inputs) never leave the caller. The first call
starts the supervisor (about a second: importing sympy). Each calling thread
borrows its own supervisor, so concurrent callers never queue. Parsed gold
answers are cached in the worker (a group's rollouts share one gold). POSIX
only (pass_fds, process groups).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from functools import lru_cache
from multiprocessing.connection import Connection
from pathlib import Path

DEADLINE_S = 0.75         # per call (parse + verify): hostile input must cost < 1 s, kill included
START_TIMEOUT_S = 120.0   # starting a supervisor imports sympy; a loaded host can be slow
GRACE_S = 10.0            # the caller's own backstop beyond the deadline, should a supervisor hang


# ---------------------------------------------------------------------------
# the worker (a forked child of the supervisor): math-verify itself


@lru_cache(maxsize=4096)
def _parsed_gold(gold: str, wrap: str) -> tuple:
    from math_verify import parse

    return tuple(parse(wrap.format(gold), parsing_timeout=None))


def _check(rule: str, gold: str, pred: str) -> tuple[str, str | None]:
    """("correct" | "wrong", error or None).

    rule "boxed": `pred` is the content of a box; the gold is wrapped in \\boxed{}.
    rule "luffy": `pred` is free text; the gold is wrapped in $...$ (LUFFY's
    math_verify_reward.labeling_responses).
    """
    from math_verify import parse, verify

    if rule == "luffy":
        golds, text = _parsed_gold(gold, "${}$"), pred
    else:
        golds, text = _parsed_gold(gold, "{}" if "\\boxed" in gold else "\\boxed{{{}}}"), "\\boxed{" + pred + "}"
    if not golds:
        return "wrong", "gold answer not parseable"
    preds = parse(text, parsing_timeout=None)
    if not preds:
        return "wrong", "answer not parseable"
    return ("correct" if verify(list(golds), preds, timeout_seconds=None) else "wrong"), None


def _work(conn: Connection) -> None:
    while True:
        try:
            rule, gold, pred = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = _check(rule, gold, pred)
        except Exception as e:  # sympy errors on odd input; never str(e): it may be huge
            reply = ("wrong", type(e).__name__)
        conn.send(reply)


# ---------------------------------------------------------------------------
# the supervisor process: forks a worker, enforces the deadline


class _Child:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")  # safe here: this process has one thread
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=_work, args=(child_end,), daemon=True)
        self.proc.start()
        child_end.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


def _supervise(read_fd: int, write_fd: int) -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we bound it
    for rule in ("boxed", "luffy"):  # import and warm math-verify's lazy parsers once; forks inherit them
        _check(rule, "\\frac{1}{2}", "so $x = 0.5$")
    client_in, client_out = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    child = _Child()
    client_out.send("ready")
    while True:
        try:
            rule, gold, pred, deadline_s = client_in.recv()
        except (EOFError, OSError):
            break
        child.conn.send((rule, gold, pred))
        reply = None
        try:
            if child.conn.poll(deadline_s):
                reply = child.conn.recv()
        except (EOFError, OSError):
            pass
        if reply is None:  # late or dead: answer first, then replace the worker
            child.kill()
            client_out.send(("timeout", f"math-verify exceeded {deadline_s} s"))
            child = _Child()
        else:
            client_out.send(reply)
    child.kill()


# ---------------------------------------------------------------------------
# the caller's side


class _Supervisor:
    def __init__(self) -> None:
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # so `-m` finds amft_cli from a bare checkout too
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(to_child), str(from_child)],
                                     pass_fds=(to_child, from_child), env=env, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        os.close(to_child)
        os.close(from_child)
        self.send_conn = Connection(from_parent, readable=False)
        self.recv_conn = Connection(to_parent, writable=False)
        self.ready = False

    def call(self, request: tuple, wait_s: float) -> tuple | None:
        """The supervisor's reply, or None if it died or hung (then it must be closed)."""
        try:
            if not self.ready:
                if not self.recv_conn.poll(START_TIMEOUT_S):
                    raise RuntimeError(f"the math-verify process did not start within {START_TIMEOUT_S:.0f} s")
                self.recv_conn.recv()
                self.ready = True
            self.send_conn.send(request)
            return self.recv_conn.recv() if self.recv_conn.poll(wait_s) else None
        except (EOFError, OSError, BrokenPipeError):
            if not self.ready:
                raise RuntimeError("the math-verify process failed to start (its error is printed above)") from None
            return None

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the supervisor and its worker
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.send_conn.close()
        self.recv_conn.close()


class Pool:
    """Idle supervisors, lent to one calling thread at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Supervisor] = []

    def check(self, rule: str, gold: str, pred: str, deadline_s: float = DEADLINE_S) -> tuple[str, str | None]:
        """("correct" | "wrong" | "timeout", error or None), back within deadline_s plus a kill."""
        with self._lock:
            sup = self._idle.pop() if self._idle else None
        sup = sup or _Supervisor()
        reply = sup.call((rule, gold, pred, deadline_s), deadline_s + GRACE_S)
        if reply is None:
            sup.close()
            return "timeout", "math-verify process stopped answering"
        with self._lock:
            self._idle.append(sup)
        return reply

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sup in idle:
            sup.close()


POOL = Pool()
atexit.register(POOL.close)


def check(rule: str, gold: str, pred: str, deadline_s: float = DEADLINE_S) -> tuple[str, str | None]:
    """math-verify's verdict on `pred` against `gold` under `rule` ("boxed" | "luffy"), time-bounded."""
    return POOL.check(rule, gold, pred, deadline_s)


if __name__ == "__main__":
    _supervise(int(sys.argv[1]), int(sys.argv[2]))
