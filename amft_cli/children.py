"""The sweep's child processes (`amft train`, `amft eval`, `amft prepare`): each runs in a session
of its own with its output appended to a log, and the signals that stop a sweep reach each of them
once, through the sweep (a terminal's Ctrl-C reaches the sweep alone, so no cell gets it twice)."""

from __future__ import annotations

import contextlib
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


def run_logged(argv: list[str], log: Path, env: dict, on_step: Callable[[int, int], None]) -> int:
    """Run argv with its output appended to log; report 'step N/M' lines as they come."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as sink:
        sink.write(f"$ {' '.join(argv)}\n")
        sink.flush()
        # its own session: a terminal's Ctrl-C reaches the sweep alone, which passes it on once
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
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
