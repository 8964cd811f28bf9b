"""Nothing lost, nothing silent (issue 11), reproduced as a hostile-but-fair user would:
every bad input ends in ONE line on stderr and exit 2 (no traceback) and leaves what was there
intact; a second writer is refused; a non-finite step never reaches the weights; a full disk
while checkpointing names the disk, leaves no debris and the run resumes once space is freed;
SIGKILL at random moments (mid-checkpoint included) then --resume equals an uninterrupted run.

Most runs go through `forked_amft` (the real `amft` entry point in processes forked from a server
that imported torch once); the two-writer, Ctrl-C and full-disk cases start real executables."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amft_cli.checkpoint import checkpoint_dirs, load_trainer_state, save_checkpoint
from amft_cli.cli import resolve_config
from amft_cli.data import prepare
from amft_cli.fsio import FileProblem
from amft_cli.metrics import read_metrics
from forked_amft import ForkedAmft, wait_until

AMFT = str(Path(sys.executable).parent / "amft")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tiny_sets(data_dir: Path, model_dir: Path | None = None) -> list[str]:
    """A tiny-math AMFT run of ~0.1 s per step (warm-up 3, then rollouts and meta-gradients)."""
    return [f"task.data_dir={data_dir}", f"model.path={model_dir or data_dir / 'model'}",
            "task.train_size=200", "task.val_size=8", "task.test_size=8", "task.ood_size=8",
            "train.sft_batch_size=4", "train.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=6",
            "amft.warmup_steps=3", "amft.meta_every=2", "amft.meta_prompts=1", "train.eval_limit=4",
            "eval.batch_size=16", "eval.max_new_tokens=6", "train.save_every=3", "train.log_every=1"]


def flags(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-data")
    prepare(resolve_config("tiny-math", tiny_sets(path)), log=lambda msg: None)
    return path


@pytest.fixture(scope="module")
def amft(tmp_path_factory) -> ForkedAmft:
    return ForkedAmft(tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def trained(amft, data_dir, tmp_path_factory) -> Path:
    """A finished 4-step SFT run with checkpoints step-2 and step-4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    result = amft("train", "--algo", "sft", "--steps", "4", *flags(tiny_sets(data_dir)), "--set", "train.save_every=2",
                  "--set", "train.eval_at_end=false", "--run-dir", str(run), "--plain")
    assert result.returncode == 0, result.stderr
    return run


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout[-1500:], result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file but the lock (which a clean exit empties)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_intact(run: Path) -> None:
    """Nothing lost: metrics parse and every checkpoint loads with finite weights."""
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert checkpoint_dirs(run)
    for step, folder in checkpoint_dirs(run).items():
        assert load_trainer_state(folder)["cursors"]["step"] == step
        assert all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values())


# ---------------------------------------------------------------------------
# bad input files: one line naming the file and the 1-based line, before training starts


def bad_data_dir(data_dir: Path, tmp_path: Path, mutate) -> Path:
    bad = tmp_path / "bad-data"
    bad.mkdir()
    for split in ("train", "val", "test", "ood"):
        shutil.copy(data_dir / f"{split}.jsonl", bad / f"{split}.jsonl")
    lines = (bad / "train.jsonl").read_bytes().splitlines(keepends=True)
    (bad / "train.jsonl").write_bytes(b"".join(mutate(lines)))
    return bad


def drop_field(line: bytes, field: str) -> bytes:
    row = json.loads(line)
    del row[field]
    return json.dumps(row).encode() + b"\n"


@pytest.mark.parametrize("mutate, fragments", [
    (lambda ls: ls[:6] + [ls[6][:5] + b"\xff\xfe" + ls[6][5:]] + ls[7:], ["line 7: not valid UTF-8"]),
    (lambda ls: ls[:-1] + [ls[-1][: len(ls[-1]) // 2]], ["line 200: not valid JSON", "truncated"]),
    (lambda ls: ls[:41] + [drop_field(ls[41], "demonstration")] + ls[42:], ["line 42: missing field 'demonstration'"]),
    (lambda ls: ls[:2] + [b"[1, 2]\n"] + ls[3:], ["line 3: expected a JSON object"]),
], ids=["invalid-utf8", "truncated-last-line", "missing-field", "not-an-object"])
def test_bad_dataset_rows_fail_before_training(amft, data_dir, tmp_path, mutate, fragments):
    bad = bad_data_dir(data_dir, tmp_path, mutate)
    run = tmp_path / "run"
    result = amft("train", *flags(tiny_sets(bad, data_dir / "model")), "--run-dir", str(run), "--plain")
    one_line_error(result, str(bad / "train.jsonl"), *fragments)
    assert "untrained" not in result.stdout and not (run / "metrics.jsonl").exists()


def write_math_rows(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in rows))
    return path


def math_row(i: int) -> dict:
    return {"prompt": [{"role": "user", "content": f"{i}+1?"}], "target": f"\\boxed{{{i + 1}}}",
            "reward_model": {"ground_truth": str(i + 1)}}


@pytest.mark.parametrize("rows, fragments", [
    ([math_row(0), math_row(1), b'{"prompt": "\xff"}\n'], ["line 3: not valid UTF-8"]),
    ([math_row(0), math_row(1), {"prompt": "no answer"}, math_row(3)], ["line 3: lacks"]),
    ([], ["the file has no rows"]),
    ([math_row(0), b'{"prompt": [{"ro'], ["line 2: not valid JSON", "truncated"]),
], ids=["invalid-utf8", "missing-answer", "empty", "truncated"])
def test_math_loader_names_file_and_line(amft, tmp_path, rows, fragments):
    path = write_math_rows(tmp_path / "train.jsonl", rows)
    result = amft("prepare", "--preset", "math-qwen2.5", "--set", f"task.train_path={path}",
                  "--set", f"task.data_dir={tmp_path / 'prepared'}", "--set", "task.val_size=1")
    line = one_line_error(result, "task.train_path", str(path), *fragments)
    assert "val_size" not in line
    assert not (tmp_path / "prepared").exists()


def test_preset_of_random_bytes(amft, tmp_path):
    preset = tmp_path / "noise.toml"
    preset.write_bytes(b"\xff" + random.Random(0).randbytes(300))
    one_line_error(amft("train", "--preset", str(preset), "--run-dir", str(tmp_path / "run")), str(preset), "UTF-8")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--seed", "99999999999999999999"], "seed: expected an integer in 0..4294967295"),
    (["--set", "train.save_every=0"], "train.save_every: expected an integer >= 1"),
    (["--set", "train.lr=inf"], "train.lr: expected a finite number, got inf"),
    (["--set", "train.lr=nan"], "train.lr"),
    (["--set", "train.rl_lr=inf"], "train.rl_lr: expected a finite number"),
], ids=["seed-overflow", "save-every-0", "lr-inf", "lr-nan", "rl-lr-inf"])
def test_bad_knobs(amft, tmp_path, args, fragment):
    one_line_error(amft("train", *args, "--run-dir", str(tmp_path / "run")), fragment)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------
# damaged checkpoints: eval and --resume refuse in one line and change nothing


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, fragment", [
    (lambda ckpt: (ckpt / "model.safetensors").unlink(), "model.safetensors: missing"),
    (lambda ckpt: truncate(ckpt / "model.safetensors"), "model.safetensors: truncated"),
    (lambda ckpt: (ckpt / "model.safetensors").write_bytes((10).to_bytes(8, "little") + b"{not json}"),
     "not a safetensors file"),
], ids=["missing", "truncated", "garbage"])
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_damaged_weights(amft, trained, tmp_path, damage, fragment, command):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run / "checkpoints" / "step-4")
    before = snapshot(run)
    args = (["eval", "--run", str(run), "--limit", "2", "--greedy"] if command == "eval"
            else ["train", "--resume", str(run), "--steps", "6", "--plain"])
    one_line_error(amft(*args), str(run / "checkpoints" / "step-4"), fragment)
    assert snapshot(run) == before
    assert load_file(str(run / "checkpoints" / "step-2" / "model.safetensors"))


def test_truncated_trainer_state(amft, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    truncate(run / "checkpoints" / "step-4" / "trainer_state.pt")
    before = snapshot(run)
    result = amft("train", "--resume", str(run), "--steps", "6", "--plain")
    one_line_error(result, "trainer_state.pt: damaged or truncated", f"delete {run / 'checkpoints' / 'step-4'}")
    assert snapshot(run) == before


def test_read_only_run_directory(trained, tmp_path):
    """A run directory on a read-only file system (a read-only bind mount in a private mount
    namespace) fails in one line at the lock, before anything is written."""
    mount, src = tmp_path / "ro", tmp_path / "src"
    mount.mkdir()
    shutil.copytree(trained, src / "run")
    before = snapshot(src / "run")
    results = namespace(tmp_path, f"mount --bind {src} {mount} && mount -o remount,bind,ro {mount} || exit 99",
                        resume=f"{AMFT} train --resume {mount / 'run'} --steps 6 --plain",
                        fresh=f"{AMFT} train --run-dir {mount / 'fresh'} --steps 2 --plain")
    one_line_error(results["resume"], str(mount / "run"), "read-only file system")
    one_line_error(results["fresh"], str(mount / "fresh"), "read-only file system")
    assert snapshot(src / "run") == before


def namespace(tmp_path: Path, setup: str, **commands: str) -> dict[str, subprocess.CompletedProcess]:
    """Run `setup` then each command as root of a private user and mount namespace (tmpfs and
    read-only mounts without privileges); skips where the kernel or container forbids it."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("needs `unshare -rm` (user namespaces) for a real read-only or full file system")
    out = tmp_path / "ns"
    out.mkdir()
    script = "; ".join([setup] + [f"{cmd} > {out}/{name}.out 2> {out}/{name}.err; echo $? > {out}/{name}.rc"
                                  for name, cmd in commands.items()])
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True, text=True,
                            timeout=600)
    if result.returncode == 99:
        pytest.skip(f"mounting inside the namespace failed: {result.stderr.strip()}")
    return {name: subprocess.CompletedProcess(cmd, int((out / f"{name}.rc").read_text()),
                                              (out / f"{name}.out").read_text(), (out / f"{name}.err").read_text())
            for name, cmd in commands.items()}


# ---------------------------------------------------------------------------
# a full disk while checkpointing


def test_disk_full_while_checkpointing_then_resume_once_space_is_freed(amft, data_dir, tmp_path):
    """A 16 MiB tmpfs holds one 10.7 MiB checkpoint, not two: the step-4 save fails mid-write
    (torch.save's "unexpected pos"). After the disk grows, --resume finishes the run, equal to
    an uninterrupted one."""
    mount, keep = tmp_path / "small", tmp_path / "kept"
    mount.mkdir()
    sets = flags(tiny_sets(data_dir) + ["train.save_every=2", "train.eval_at_end=false"])
    train = f"{AMFT} train --algo sft --steps 6 {' '.join(sets)} --plain"
    results = namespace(tmp_path, f"mount -t tmpfs -o size=16m none {mount} || exit 99",
                        full=f"{train} --run-dir {mount / 'run'}",
                        keep=f"cp -a {mount / 'run'} {keep}",
                        grow=f"mount -o remount,size=64m {mount}",
                        resume=f"{AMFT} train --resume {mount / 'run'} --plain",
                        final=f"cp -a {mount / 'run'} {tmp_path / 'final'}")
    one_line_error(results["full"], f"{mount / 'run' / 'checkpoints'}: no space left on device writing checkpoint "
                   f"step-4 (disk {mount}:", "removed the partial folder, the last complete checkpoint is step-2",
                   f"--resume {mount / 'run'}")
    assert sorted(p.name for p in (keep / "checkpoints").iterdir()) == ["step-2"]  # no debris
    assert_intact(keep)
    assert results["resume"].returncode == 0, results["resume"].stderr
    assert "step 2" in results["resume"].stdout
    reference = tmp_path / "reference"
    assert amft("train", "--algo", "sft", "--steps", "6", *sets, "--run-dir", str(reference)).returncode == 0
    assert comparable(read_metrics(tmp_path / "final")) == comparable(read_metrics(reference))
    assert same_weights(tmp_path / "final" / "checkpoints" / "step-6", reference / "checkpoints" / "step-6")


@pytest.fixture(scope="module")
def tiny_model(data_dir):
    from amft_cli.model import load_policy

    return load_policy(resolve_config("tiny-math", tiny_sets(data_dir)).model, torch.device("cpu"))


@pytest.mark.parametrize("code, fragment", [
    (errno.ENOSPC, "no space left on device writing checkpoint step-2"),
    (errno.EROFS, "writing checkpoint step-2: read-only file system"),
])
def test_a_failed_checkpoint_write_leaves_no_debris(tmp_path, tiny_model, monkeypatch, code, fragment):
    """ENOSPC / EROFS injected at the trainer-state write (after the weights were written)."""
    model, tokenizer = tiny_model
    save_checkpoint(tmp_path, 1, model, tokenizer, {"cursors": {"step": 1}})

    def failing_write(obj, path, *args, **kwargs):
        assert (Path(path).parent / "model.safetensors").is_file()
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(torch, "save", failing_write)
    with pytest.raises(FileProblem, match=fragment) as caught:
        save_checkpoint(tmp_path, 2, model, tokenizer, {"cursors": {"step": 2}})
    monkeypatch.undo()
    if code == errno.ENOSPC:
        assert "the last complete checkpoint is step-1" in str(caught.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]
    assert load_trainer_state(tmp_path / "checkpoints" / "step-1") == {"cursors": {"step": 1}}


# ---------------------------------------------------------------------------
# one writer per run directory; Ctrl-C during start-up


def holder(run: Path) -> str:
    return (run / ".lock").read_text().strip() if (run / ".lock").is_file() else ""


def test_a_second_writer_is_refused_and_a_killed_run_resumes(data_dir, tmp_path):
    run, sets = tmp_path / "run", flags(tiny_sets(data_dir))
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


def test_ctrl_c_during_start_up(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([AMFT, "train", *flags(tiny_sets(data_dir)), "--run-dir", str(run), "--plain"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: holder(run) != "")  # the lock is taken first; torch is still loading
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: stopped by Ctrl-C"), err
    assert "Traceback" not in out + err
    assert holder(run) == "" and not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


# ---------------------------------------------------------------------------
# the non-finite guard


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


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


def test_a_huge_learning_rate_stops_in_one_line_with_finite_checkpoints(amft, data_dir, tmp_path):
    run = tmp_path / "run"
    result = amft("train", "--algo", "sft", "--steps", "20", *flags(tiny_sets(data_dir)), "--set", "train.lr=1e6",
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


def test_nan_rewards_are_skipped_and_mu_stays_finite(amft, data_dir, tmp_path):
    run = tmp_path / "run"
    result = amft("train", "--steps", "14", *flags(tiny_sets(data_dir)), "--set", "train.save_every=1",
                  "--set", "train.keep_checkpoints=30", "--set", "task.reward=test_reliability:sometimes_nan",
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


def comparable(records: list[dict]) -> list[dict]:
    """Metrics minus wall-clock quantities."""
    return [{k: v for k, v in r.items() if k not in ("time", "rollout/tokens_per_s") and not k.startswith("time/")}
            for r in records]


def test_random_sigkills_then_resume_equal_an_uninterrupted_run(amft, data_dir, tmp_path):
    """≥ 20 SIGKILLs across a 60-step AMFT run (at start-up, mid-checkpoint, and some time after a
    checkpoint), each followed by --resume: the final metrics, weights and summary equal an
    uninterrupted run's, and the run directory holds no debris."""
    steps, rng = 60, random.Random(11)
    sets = [*flags(tiny_sets(data_dir)), "--steps", str(steps), "--plain"]
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
