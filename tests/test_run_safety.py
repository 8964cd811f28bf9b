"""Nothing lost under concurrency, kills and divergence (issue 11): a second writer is refused
while a SIGKILLed run resumes at once; Ctrl-C during start-up says so; a non-finite loss, gradient
or μ never reaches the weights; and 23 SIGKILLs at random moments (mid-checkpoint included), each
followed by --resume, end equal to an uninterrupted run."""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amft_cli.checkpoint import checkpoint_dirs, load_trainer_state
from amft_cli.metrics import read_metrics
from amft_runs import (SECOND_LONG_STEPS, assert_intact, comparable, flags, one_line_error, same_weights,
                       tiny_sets, wait_until)

AMFT = str(Path(sys.executable).parent / "amft")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------
# one writer per run directory; Ctrl-C during start-up


def holder(run: Path) -> str:
    return (run / ".lock").read_text().strip() if (run / ".lock").is_file() else ""


def test_a_second_writer_is_refused_and_a_killed_run_resumes(tiny_data, tmp_path):
    run, sets = tmp_path / "run", flags(tiny_sets(tiny_data))
    first = subprocess.Popen([AMFT, "train", "--steps", "24", *sets, "--run-dir", str(run), "--plain"], cwd=tmp_path,
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: holder(run) != "")
    for args in (["--algo", "sft", *sets, "--run-dir", str(run)], [*sets, "--run-dir", str(run), "--overwrite"],
                 ["--resume", str(run)]):
        second = subprocess.run([AMFT, "train", *args, "--plain"], cwd=tmp_path, env=ENV, capture_output=True,
                                text=True, timeout=120)
        one_line_error(second, f"{run} is in use by another amft process (amft train, pid {first.pid} on ")
        assert second.stdout == ""
    wait_until(lambda: bool(checkpoint_dirs(run)) or first.poll() is not None)
    assert first.poll() is None, first.communicate()
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert f"pid {first.pid} on" in holder(run)  # the killed holder's record: a crash is detectable
    with open(run / ".lock") as f:  # ... but the lock itself died with it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
    resumed = subprocess.run([AMFT, "train", "--resume", str(run), "--plain"], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"the last process writing {run} was killed (amft train, pid {first.pid}" in resumed.stdout
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 25))
    assert 'algo = "amft"' in (run / "config.toml").read_text()
    assert holder(run) == ""  # a clean exit leaves no holder


def test_ctrl_c_during_start_up(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([AMFT, "train", *flags(tiny_sets(tiny_data)), "--run-dir", str(run), "--plain"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: holder(run) != "")  # the lock is taken first; torch is still loading
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: stopped by Ctrl-C"), err
    assert lines[0].endswith("(a run keeps its last checkpoint: --resume continues it)")  # the hint for train
    assert "Traceback" not in out + err
    assert holder(run) == "" and not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_a_burst_of_sigterms_while_preparing_stops_once_without_debris(tmp_path):
    """Outside the training loop a SIGTERM ends the command with its cleanup; further ones (Slurm
    signals every process, a sweep passes its own on) change nothing. Before, each repeat raised
    again inside the cleanup and the exit: tracebacks, and death by SIGTERM instead of exit 130."""
    data = tmp_path / "data"
    sets = [f"task.data_dir={data}", f"model.path={data / 'model'}", "task.train_size=200", "task.val_size=8",
            "task.test_size=8", "task.ood_size=8", "task.pretrain_size=200", "model.pretrain_steps=100000",
            "model.pretrain_batch_size=4"]
    proc = subprocess.Popen([AMFT, "prepare", "--preset", "tiny-gp", *flags(sets)], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (data.is_dir() and any(data.glob(".model-*"))) or proc.poll() is not None, timeout=120)
    time.sleep(0.5)  # pre-training the tiny model
    for _ in range(10):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted: stopped by SIGTERM (nothing half-written is kept: run the command again)"
    assert not list(data.glob(".model-*")) and not (data / "model").exists()


def test_sigterm_checkpoints_and_stops_and_a_second_one_changes_nothing(tiny_data, tmp_path):
    """A scheduler's SIGTERM (preemption) stops training after the current step with a checkpoint
    of it, exit 130 and the --resume line, as Ctrl-C does; --resume then goes on. A second SIGTERM
    during that step (Slurm signals every process, and a sweep or torchrun passes its own on) is
    the same request: the step still ends with its checkpoint. Steps here take ~1 s (a second
    SIGTERM used to kill the process at once: exit -15, no checkpoint of that step)."""
    run, sets = tmp_path / "run", flags(tiny_sets(tiny_data) + SECOND_LONG_STEPS)
    reached = 0
    for attempt in ("first", "resumed"):
        args = [*sets, "--run-dir", str(run)] if attempt == "first" else ["--resume", str(run)]
        proc = subprocess.Popen([AMFT, "train", "--steps", "400", *args, "--plain"], cwd=tmp_path, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: (run / "metrics.jsonl").is_file()
                   and (run / "metrics.jsonl").read_text().count("\n") >= reached + 4, timeout=300)
        proc.send_signal(signal.SIGTERM)
        if attempt == "resumed":
            time.sleep(0.1)  # handled by then (two signals before it would count as one)
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 130, err
        last = read_metrics(run)[-1]["step"]
        assert reached + 4 <= last < 400 and max(checkpoint_dirs(run)) == last  # save_every never came: the stop saved
        assert f"--resume {run}" in out.replace("\n", "") and "Traceback" not in out + err
        reached = last
    assert_intact(run)


# ---------------------------------------------------------------------------
# the non-finite guard


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def assert_skips_left_everything_alone(run: Path, records: list[dict]) -> list[int]:
    """For each skipped step s: checkpoint s holds exactly the weights, optimizer state and μ
    controller of checkpoint s-1. Returns the skipped steps."""
    skipped = [r["step"] for r in records if r.get("optim/skipped") == 1.0]
    ckpts = checkpoint_dirs(run)
    for s in skipped:
        if s - 1 in ckpts and s in ckpts:
            assert same_weights(ckpts[s - 1], ckpts[s]), s
            before, after = load_trainer_state(ckpts[s - 1]), load_trainer_state(ckpts[s])
            assert same_state(before["optimizers"], after["optimizers"]) and before["method"] == after["method"]
    for r in records:
        assert r["balance/mu"] is not None and math.isfinite(r["balance/mu"])
        skipped_step = r.get("optim/skipped") == 1.0
        assert (r["optim/grad_norm"] is None or not math.isfinite(r["optim/grad_norm"])) == skipped_step, r
    return skipped


def test_a_huge_learning_rate_stops_in_one_line_with_finite_checkpoints(amft, tiny_data, tmp_path):
    run = tmp_path / "run"
    # lr 1e6 makes sdpa's attention non-finite after a step (eager attention saturates instead, finite)
    result = amft("train", "--algo", "sft", "--steps", "20", *flags(tiny_sets(tiny_data)), "--set", "train.lr=1e6",
                  "--set", "model.attention=sdpa",
                  "--set", "train.save_every=1", "--set", "train.keep_checkpoints=30", "--set", "train.eval_at_end=false",
                  "--run-dir", str(run), "--plain")
    one_line_error(result, "training diverged: 5 steps in a row", "lower train.lr")
    records = read_metrics(run)
    skipped = assert_skips_left_everything_alone(run, records)
    assert skipped == list(range(records[-1]["step"] - 4, records[-1]["step"] + 1))
    assert_intact(run)
    assert max(checkpoint_dirs(run)) == records[-1]["step"] - 1  # the stopping step saved nothing


_calls = {"n": 0}


def sometimes_nan(prompts, completions, **columns):
    """Every third call scores a whole batch NaN (a reward model gone wrong)."""
    _calls["n"] += 1
    nan = _calls["n"] % 3 == 0
    return [float("nan") if nan else float(len(c) % 3) for c in completions]


def test_nan_rewards_are_skipped_and_mu_stays_finite(amft, tiny_data, tmp_path):
    run = tmp_path / "run"
    result = amft("train", "--steps", "14", *flags(tiny_sets(tiny_data)), "--set", "train.save_every=1",
                  "--set", "train.keep_checkpoints=30", "--set", "task.reward=test_run_safety:sometimes_nan",
                  "--set", "train.eval_at_end=false", "--run-dir", str(run), "--plain")
    assert result.returncode == 0, result.stderr
    records = read_metrics(run)
    skipped = assert_skips_left_everything_alone(run, records)
    reasons = {r["optim/skip_reason"] for r in records if r["step"] in skipped}
    assert len(skipped) >= 2 and reasons <= {"loss/rl is nan"}, reasons
    applied = [r["step"] for r in records if r["step"] > 4 and r["step"] not in skipped]
    ckpts = checkpoint_dirs(run)
    assert applied and all(not same_weights(ckpts[s - 1], ckpts[s]) for s in applied)
    assert "skipped (loss/rl is nan)" in result.stdout
    assert_intact(run)


def test_keep_finite_rolls_the_controller_back():
    from amft_cli.config import Config
    from amft_cli.guard import KeepFinite
    from amft_cli.methods.amft import AMFT, ControllerState

    method = AMFT(Config(), policy=None)
    method.state = ControllerState(mu=0.7, entropy_target=1.5, meta_grad=0.1, entropy_term=0.01)
    with KeepFinite(method) as kept:
        method.state.mu, method.state.meta_grad = 0.75, 0.2
    assert kept.problem is None and method.state == ControllerState(0.75, 1.5, 0.2, 0.01)
    with KeepFinite(method) as kept:
        method.state.meta_grad, method.state.mu = float("nan"), float("nan")
    assert kept.problem == "the method's mu came out nan"
    assert method.state == ControllerState(mu=0.75, entropy_target=1.5, meta_grad=0.2, entropy_term=0.01)


def test_nonfinite_signal_names_the_part_and_reports_the_raw_norm():
    from amft_cli.guard import nonfinite_signal

    g_sft, g_rl = [torch.tensor([1.0, 1.0]), torch.tensor([1.0])], [torch.tensor([2.0, 0.0])]
    assert nonfinite_signal({"loss/sft": 0.5, "loss/rl": 0.1}, g_sft, g_rl) == (None, pytest.approx(7.0 ** 0.5))
    assert nonfinite_signal({"loss/sft": 0.5}, g_sft, None) == (None, pytest.approx(3.0 ** 0.5))
    problem, norm = nonfinite_signal({"loss/sft": 0.5, "loss/rl": 0.1}, g_sft, [torch.tensor([float("inf"), 0.0])])
    assert problem == "the gradient of loss/rl is not finite" and norm == math.inf
    assert nonfinite_signal({"loss/sft": float("nan")}, g_sft, None)[0] == "loss/sft is nan"


def test_grad_norm_reports_nan_instead_of_hiding_it():
    from amft_cli.config import Config
    from amft_cli.policy import Policy
    from amft_cli.train import apply_update, make_optimizers

    policy = Policy(torch.nn.Linear(2, 2), tokenizer=None, device=torch.device("cpu"))
    cfg = Config()
    grads = [torch.full_like(p, float("nan")) for p in policy.params]
    norm = apply_update(policy, make_optimizers(policy, cfg), grads, None, 1.0, cfg, 1.0)
    assert math.isnan(norm)  # max(0.0, nan) == 0.0 used to log a NaN gradient as 0


# ---------------------------------------------------------------------------
# the stress test: SIGKILL at random moments, --resume after each


def test_random_sigkills_then_resume_equal_an_uninterrupted_run(amft, tiny_data, tmp_path):
    """≥ 20 SIGKILLs across a 60-step AMFT run (at start-up, mid-checkpoint, and some time after a
    checkpoint), each followed by --resume: the final metrics, weights and summary equal an
    uninterrupted run's, and the run directory holds no debris."""
    steps, rng = 60, random.Random(11)
    sets = [*flags(tiny_sets(tiny_data)), "--steps", str(steps), "--plain"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    started = time.monotonic()
    assert amft("train", *sets, "--run-dir", str(reference)).returncode == 0
    plan = ["after-save"] * 12 + ["mid-checkpoint"] * 7 + ["start-up"] * 3
    rng.shuffle(plan)
    plan.insert(0, "after-save")  # the first kill comes after config.toml exists, so --resume applies
    kills, mid_write = 0, 0
    args = ["train", *sets, "--run-dir", str(run)]
    for mode in plan:
        child = amft.start(*args)
        resumed_at = max(checkpoint_dirs(run), default=0)
        if mode == "start-up":
            time.sleep(rng.uniform(0.0, 0.4))
        elif mode == "mid-checkpoint":  # this child's temp folder: it is writing a checkpoint now
            wait_until(lambda: any((run / "checkpoints").glob(f".tmp-step-*-{child.pid}")), child)
        else:
            target = resumed_at + 3 * rng.choice([1, 2])
            wait_until(lambda: max(checkpoint_dirs(run), default=0) >= target, child)
            time.sleep(rng.uniform(0.0, 0.15))
        if not child.running():
            break
        os.kill(child.pid, signal.SIGKILL)
        child.wait(60)
        kills += 1
        mid_write += bool(list((run / "checkpoints").glob(f".tmp-step-*-{child.pid}")))
        named = [d for d in (run / "checkpoints").glob("step-*")] if (run / "checkpoints").is_dir() else []
        assert all((d / "model.safetensors").is_file() and (d / "trainer_state.pt").is_file() for d in named)
        args = ["train", "--resume", str(run), "--plain"]
    final = amft(*args)
    assert final.returncode == 0, final.stderr
    elapsed = time.monotonic() - started
    print(f"\n{kills} SIGKILLs ({mid_write} mid-checkpoint write) and resumes: {elapsed:.0f} s with the reference run")
    assert kills >= 20 and mid_write >= 3
    assert comparable(read_metrics(run)) == comparable(read_metrics(reference))
    assert same_weights(run / "checkpoints" / f"step-{steps}", reference / "checkpoints" / f"step-{steps}")
    assert json.loads((run / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{steps - 3}", f"step-{steps}"]
