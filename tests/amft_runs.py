"""Helpers for tests that run `amft` as a user does.

`ForkedAmft` runs `amft ARGS` many times, fast: each run is a process forked from a server that imported
torch, transformers and amft_cli once (multiprocessing's forkserver), so a start costs a fraction
of a second instead of the ~4 s of a fresh interpreter. The child then does what the installed
`amft` script does, `amft_cli.entry.main()` with sys.argv set, writing to real stdout/stderr files,
so exit codes, one-line errors, signal handling and SIGKILL behave as for the real command.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from amft_cli.checkpoint import checkpoint_dirs, load_trainer_state
from amft_cli.metrics import read_metrics

PRELOAD = ["torch", "transformers", "transformers.modeling_utils", "transformers.generation.utils",
           "transformers.models.qwen2.modeling_qwen2", "transformers.models.qwen2.tokenization_qwen2", "pydantic",
           "amft_cli.cli", "amft_cli.train", "amft_cli.dashboard", "amft_cli.evaluate", "amft_cli.tasks.math"]


def _child(args: list[str], cwd: str, out: str, err: str) -> None:
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


# ---------------------------------------------------------------------------
# tiny runs and what a test checks about them


def tiny_sets(data_dir: Path, model_dir: Path | None = None) -> list[str]:
    """A tiny-math AMFT run of ~0.1 s per step (warm-up 3, then rollouts and meta-gradients)."""
    return [f"task.data_dir={data_dir}", f"model.path={model_dir or data_dir / 'model'}",
            "task.train_size=200", "task.val_size=8", "task.test_size=8", "task.ood_size=8",
            "train.sft_batch_size=4", "train.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=6",
            "amft.warmup_steps=3", "amft.meta_every=2", "amft.meta_prompts=1", "train.eval_limit=4",
            "eval.batch_size=16", "eval.max_new_tokens=6", "train.save_every=3", "train.log_every=1"]


# tiny_sets' RL steps made ~1 s long, so a signal sent during one lands before it ends
SECOND_LONG_STEPS = ["train.prompts_per_step=32", "rl.group_size=8", "rl.max_new_tokens=32", "train.save_every=1000"]


def flags(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, exactly one line on stderr starting with 'error: ', no traceback anywhere."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout[-1500:], result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file but the locks (.lock, .NAME.lock: a clean exit empties them)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".lock"))}


def assert_intact(run: Path) -> None:
    """Nothing lost: metrics parse and every checkpoint loads with finite weights."""
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert checkpoint_dirs(run)
    for step, folder in checkpoint_dirs(run).items():
        assert load_trainer_state(folder)["cursors"]["step"] == step
        assert all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values())


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def comparable(records: list[dict]) -> list[dict]:
    """Metrics minus wall-clock quantities."""
    return [{k: v for k, v in r.items() if k not in ("time", "rollout/tokens_per_s") and not k.startswith("time/")}
            for r in records]
