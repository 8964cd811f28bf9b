"""The `amft` command as a user runs it: user mistakes end in one line and exit code 2,
and a run directory is never silently overwritten."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amft_cli.config import Config
from amft_cli.config_io import to_toml

AMFT = str(Path(sys.executable).parent / "amft")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def amft(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([AMFT, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def small_sets(data_dir: Path, steps: int) -> list[str]:
    sets = [f"task.data_dir={data_dir}", f"model.path={data_dir / 'model'}", "task.train_size=300",
            "task.val_size=16", "task.test_size=16", "task.ood_size=16", f"train.steps={steps}",
            "train.sft_batch_size=8", "train.eval_at_end=false", "train.save_every=1"]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def trained_run(workdir) -> Path:
    """A 3-step SFT run; `amft train` prepares the missing data and model first."""
    run = workdir / "run"
    result = amft("train", "--algo", "sft", *small_sets(workdir / "data", 3), "--run-dir", str(run), "--plain",
                  cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "preparing first" in result.stdout and (workdir / "data" / "model" / "config.json").is_file()
    # off a terminal a message is one line however long (rich would wrap it at 80 columns)
    assert f"run directory: {run}  (next: amft eval --run {run} --ood ; amft plot curriculum {run})" \
        in result.stdout.splitlines()
    return run


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_unknown_preset(tmp_path):
    assert_one_line_error(amft("train", "--preset", "does-not-exist", cwd=tmp_path), "'does-not-exist'")


def test_preset_file_with_an_unknown_key(tmp_path):
    (tmp_path / "bad.toml").write_text('[train]\nsteps = 3\nbogus_knob = 1\n')
    result = amft("train", "--preset", str(tmp_path / "bad.toml"), cwd=tmp_path)
    assert_one_line_error(result, "bad.toml")
    assert "train.bogus_knob" in result.stderr


def test_preset_file_with_a_wrongly_typed_value(tmp_path):
    (tmp_path / "bad.toml").write_text('[train]\nsteps = "three"\n')
    assert_one_line_error(amft("train", "--preset", str(tmp_path / "bad.toml"), cwd=tmp_path), "train.steps")


@pytest.mark.parametrize("args, fragment", [
    (["--set", "train.lr=abc"], "train.lr: expected float, got 'abc'"),
    (["--set", "nosuch.key=1"], "'nosuch.key'"),
    (["--set", "train.steps"], "key.sub=value"),
    (["--algo", "bogus"], "train.algo"),
    (["--set", "rl.group_size=1"], "rl.group_size"),
    (["--set", "amft.mu_min=0.9", "--set", "amft.mu_max=0.5"], "amft.mu_min/mu_max: expected 0 <= mu_min < mu_max"),
    (["--set", "amft.mu_init=1.0"], "amft.mu_init: expected a value in [mu_min, mu_max] = [0.05, 0.95], got 1.0"),
])
def test_bad_train_flags(tmp_path, args, fragment):
    result = amft("train", *args, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()  # nothing started


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    assert_one_line_error(amft("train", "--resume", str(tmp_path), cwd=tmp_path), "config.toml")


def test_eval_of_a_folder_without_a_run(tmp_path):
    assert_one_line_error(amft("eval", "--run", str(tmp_path), cwd=tmp_path), "config.toml")
    assert_one_line_error(amft("eval", "--run", str(tmp_path / "nope"), cwd=tmp_path), "no such run directory")


def test_eval_of_a_run_without_checkpoints(tmp_path):
    (tmp_path / "config.toml").write_text(to_toml(Config()))
    assert_one_line_error(amft("eval", "--run", str(tmp_path), cwd=tmp_path), "no checkpoints")


def test_eval_of_a_missing_step(trained_run, tmp_path):
    result = amft("eval", "--run", str(trained_run), "--step", "999", cwd=tmp_path)
    assert_one_line_error(result, "--step 999")
    assert "available: 2, 3" in result.stderr  # keep_checkpoints = 2 of save_every = 1


def test_eval_of_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "weights.bin").write_text("x")
    result = amft("eval", "--model", str(tmp_path / "notamodel"), "--preset", "tiny-math", cwd=tmp_path)
    assert_one_line_error(result, "config.json")


def test_eval_with_a_bad_split(trained_run, tmp_path):
    assert_one_line_error(amft("eval", "--run", str(trained_run), "--split", "train", cwd=tmp_path), "--split")


def test_a_closed_stdout_stops_training_with_a_checkpoint(trained_run, workdir, tmp_path):
    """`amft train | head -3`: once the reader has gone, the run stops after its step with a
    checkpoint of it, says so on stderr and exits 130 (rich's default exits 1 at the failed write,
    without one)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([AMFT, "train", "--algo", "sft", *small_sets(workdir / "data", 400), "--set",
                             "train.save_every=1000", "--set", "train.log_every=1", "--run-dir", str(run), "--plain"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    head = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, (head, err)
    assert err.strip() == "stdout was closed by its reader: stopping (a run checkpoints its step first)"
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["step"]
    assert 1 <= last < 400 and sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{last}"]


def test_auto_resume_starts_continues_and_refuses_another_config(trained_run, workdir, tmp_path):
    """--auto-resume, one command for a job's first start and its restarts: it starts a run that is
    not there, continues a run of this config from its last checkpoint (train.steps may grow), starts
    afresh over a run killed before its first checkpoint, and refuses a run of another config."""
    run = tmp_path / "run"
    args = ["train", "--algo", "sft", "--run-dir", str(run), "--auto-resume", "--plain"]
    first = amft(*args, *small_sets(workdir / "data", 2), cwd=tmp_path)
    assert first.returncode == 0 and "resumed" not in first.stdout, first.stderr
    two_steps = (run / "metrics.jsonl").read_text()
    again = amft(*args, *small_sets(workdir / "data", 4), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {run / 'checkpoints' / 'step-2'} (step 2)" in again.stdout.replace("\n", "")
    metrics = (run / "metrics.jsonl").read_text()
    assert metrics.startswith(two_steps) and metrics.count("\n") == 4
    other = amft(*args, *small_sets(workdir / "data", 4), "--set", "train.lr=0.5", cwd=tmp_path)
    assert_one_line_error(other, f"--auto-resume: {run} holds a run with another config (train.lr differ): "
                                 f"--resume {run} continues it with these settings")
    assert (run / "metrics.jsonl").read_text() == metrics
    shutil.rmtree(run / "checkpoints")  # as if killed before its first checkpoint: nothing to continue
    fresh = amft(*args, *small_sets(workdir / "data", 1), cwd=tmp_path)
    assert fresh.returncode == 0 and "resumed" not in fresh.stdout, fresh.stderr
    assert f"--auto-resume: {run} holds no checkpoint to continue; starting the run afresh" in fresh.stdout
    assert (run / "metrics.jsonl").read_text().count("\n") == 1 and (run / "checkpoints" / "step-1").is_dir()
    both = amft(*args, *small_sets(workdir / "data", 1), "--overwrite", cwd=tmp_path)
    assert_one_line_error(both, "--auto-resume picks between starting and continuing itself")


def test_existing_run_dir_needs_overwrite(trained_run, workdir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "metrics.jsonl").read_bytes()
    sets = small_sets(workdir / "data", 2)
    refused = amft("train", "--algo", "sft", *sets, "--run-dir", str(run), "--plain", cwd=tmp_path)
    assert_one_line_error(refused, "--overwrite")
    assert (run / "metrics.jsonl").read_bytes() == before and (run / "checkpoints" / "step-3").is_dir()
    replaced = amft("train", "--algo", "sft", *sets, "--run-dir", str(run), "--overwrite", "--plain", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert (run / "metrics.jsonl").read_text().count("\n") == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
