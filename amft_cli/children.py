"""The sweep's child processes (`amft train`, `amft eval`, `amft prepare`): each runs in a session
of its own with its output appended to a log, and the signals that stop a sweep reach each of them
once, through the sweep (a terminal's Ctrl-C reaches the sweep alone, so no cell gets it twice).
A sweep that dies without passing anything on (SIGKILL, the OOM killer) stops them too: each
child asks Linux for a signal when its parent dies, and stops as on SIGTERM (stop_with_parent)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Callable

PROGRESS_LINE = re.compile(r"^step (\d+)/(\d+)\b")
_LIVE: set[subprocess.Popen] = set()  # the cells' processes running now (signals are passed on to them)
_LIVE_LOCK = threading.Lock()
_TERMINATED = threading.Event()
PASSED_ON = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}
PARENT_ENV, LOG_ENV = "AMFT_STOP_WITH_PARENT", "AMFT_LOG"  # set for a child: the sweep's pid, the child's log


def stop_with_parent() -> None:
    """In a sweep's child (PARENT_ENV set): when the sweep dies, however it dies, Linux signals the
    child (PR_SET_PDEATHSIG; elsewhere nothing happens), which then writes its output to its log
    itself (the sweep's pipe is gone) and stops as if the sweep had passed SIGTERM on: a cell
    checkpoints. A sweep already gone by now counts the same."""
    parent, log = os.environ.pop(PARENT_ENV, ""), os.environ.pop(LOG_ENV, "")
    if not parent.isdigit() or not log:
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return

    def orphaned(signum, frame):
        sink = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        os.close(sink)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGUSR2, orphaned)
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    if prctl(pr_set_pdeathsig, int(signal.SIGUSR2), 0, 0, 0) == 0 and os.getppid() != int(parent):
        orphaned(signal.SIGUSR2, None)


def run_logged(argv: list[str], log: Path, env: dict, on_step: Callable[[int, int], None]) -> int:
    """Run argv with its output appended to log; report 'step N/M' lines as they come."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as sink:
        sink.write(f"$ {' '.join(argv)}\n")
        sink.flush()
        # its own session: a terminal's Ctrl-C reaches the sweep alone, which passes it on once
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**env, PARENT_ENV: str(os.getpid()), LOG_ENV: str(log)}, start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(proc)
            if _TERMINATED.is_set():  # started just as the sweep was told to stop
                proc.send_signal(signal.SIGTERM)
        try:
            for line in proc.stdout:
                sink.write(line)
                match = PROGRESS_LINE.match(line)
                if match:
                    on_step(int(match.group(1)), int(match.group(2)))
            return proc.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)


@contextlib.contextmanager
def pass_on_signals(stop: threading.Event):
    """Ctrl-C (from a terminal or `kill -INT PID`), SIGTERM, or the terminal closing (SIGHUP):
    the running cells, each in its own session, get it once (SIGHUP as SIGTERM), checkpoint and
    stop; no new cell starts. A second Ctrl-C is passed on too, and aborts them as it aborts
    `amft train`. A signal the sweep was started ignoring (nohup's SIGHUP) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        stop.set()
        with _LIVE_LOCK:
            _TERMINATED.set()
            for proc in _LIVE:
                proc.send_signal(PASSED_ON[signum])

    _TERMINATED.clear()
    caught = [sig for sig in PASSED_ON if signal.getsignal(sig) is not signal.SIG_IGN]  # nohup's SIGHUP
    previous = {sig: signal.signal(sig, handler) for sig in caught}
    try:
        yield
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
