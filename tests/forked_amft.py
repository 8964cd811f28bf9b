"""Run `amft ARGS` many times, fast: each run is a process forked from a server that imported
torch, transformers and amft_cli once (multiprocessing's forkserver), so a start costs a fraction
of a second instead of the ~4 s of a fresh interpreter. The child then does what the installed
`amft` script does, `amft_cli.entry.main()` with sys.argv set, writing to real stdout/stderr files,
so exit codes, one-line errors, signal handling and SIGKILL behave as for the real command.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PRELOAD = ["torch", "transformers", "transformers.modeling_utils", "transformers.generation.utils",
           "transformers.models.qwen2.modeling_qwen2", "transformers.models.qwen2.tokenization_qwen2", "pydantic",
           "amft_cli.cli", "amft_cli.train", "amft_cli.dashboard", "amft_cli.evaluate", "amft_cli.tasks.math"]


def _child(args: list[str], cwd: str, out: str, err: str) -> None:
    import torch

    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_APPEND), fd)
    os.chdir(cwd)
    torch.set_num_threads(1)
    sys.argv = ["amft", *args]
    from amft_cli.entry import main

    main()


@dataclass
class Run:
    process: multiprocessing.Process
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            raise TimeoutError(f"amft did not end within {timeout} s: {self.err.read_text()[-2000:]}")
        return subprocess.CompletedProcess(["amft"], self.process.exitcode, self.out.read_text(),
                                           self.err.read_text())

    def running(self) -> bool:
        return self.process.exitcode is None and self.process.is_alive()


class ForkedAmft:
    """amft.start(*args) -> Run; amft(*args) -> CompletedProcess (returncode, stdout, stderr)."""

    def __init__(self, cwd: Path):
        self.cwd = Path(cwd)
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.count = 0

    def start(self, *args: str) -> Run:
        self.count += 1
        out, err = self.cwd / f".amft-{self.count}.out", self.cwd / f".amft-{self.count}.err"
        out.write_text("")
        err.write_text("")
        process = self.ctx.Process(target=_child, args=(list(args), str(self.cwd), str(out), str(err)))
        process.start()
        return Run(process, out, err)

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.start(*args).wait(timeout)


def wait_until(condition, run: Run | None = None, timeout: float = 120, poll: float = 0.002) -> bool:
    """Poll condition() until true (True), the run ends (False) or the timeout passes (fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if run is not None and not run.running():
            return bool(condition())
        time.sleep(poll)
    raise TimeoutError("condition not reached")
