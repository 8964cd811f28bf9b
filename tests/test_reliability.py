"""Bad input ends in ONE line on stderr and exit 2, never a traceback, and changes nothing
(issue 11): dataset and math files with invalid UTF-8, truncated or incomplete rows; a preset of
random bytes; impossible knobs; damaged checkpoints; a read-only run directory; a disk that fills
up while a checkpoint is written (then --resume once space is freed equals an uninterrupted run).

Runs go through `amft_runs.ForkedAmft` (the real entry point, forked from a server that imported
torch once); the read-only and full-disk cases run the real executable in a private mount namespace."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amft_cli.checkpoint import load_trainer_state, save_checkpoint
from amft_cli.cli import resolve_config
from amft_cli.fsio import FileProblem
from amft_cli.metrics import read_metrics
from amft_cli.rundir import foreign_files
from amft_runs import assert_intact, comparable, flags, one_line_error, same_weights, snapshot, tiny_sets

AMFT = str(Path(sys.executable).parent / "amft")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(amft, tiny_data, tmp_path_factory) -> Path:
    """A finished 4-step SFT run with checkpoints step-2 and step-4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    result = amft("train", "--algo", "sft", "--steps", "4", *flags(tiny_sets(tiny_data)), "--set", "train.save_every=2",
                  "--set", "train.eval_at_end=false", "--run-dir", str(run), "--plain")
    assert result.returncode == 0, result.stderr
    return run


# ---------------------------------------------------------------------------
# bad input files: one line naming the file and the 1-based line, before training starts


def bad_data_dir(data: Path, tmp_path: Path, mutate) -> Path:
    bad = tmp_path / "bad-data"
    bad.mkdir()
    for split in ("train", "val", "test", "ood"):
        shutil.copy(data / f"{split}.jsonl", bad / f"{split}.jsonl")
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
def test_bad_dataset_rows_fail_before_training(amft, tiny_data, tmp_path, mutate, fragments):
    bad = bad_data_dir(tiny_data, tmp_path, mutate)
    run = tmp_path / "run"
    result = amft("train", *flags(tiny_sets(bad, tiny_data / "model")), "--run-dir", str(run), "--plain")
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
    (["--set", "task.train_size=-1"], "task.train_size: expected an integer >= 1"),
    (["--set", "task.val_size=0"], "task.val_size: expected an integer >= 1"),
    (["--set", "rl.temperature=0"], "rl.temperature: expected a float > 0, got 0.0"),
    (["--set", "rl.top_p=0"], "rl.top_p: expected a float in (0, 1], got 0.0"),
    (["--set", "eval.top_p=2"], "eval.top_p: expected a float in (0, 1], got 2.0"),
], ids=["seed-overflow", "save-every-0", "lr-inf", "lr-nan", "rl-lr-inf", "train-size", "val-size", "rl-temperature",
        "rl-top-p", "eval-top-p"])
def test_bad_knobs(amft, tmp_path, args, fragment):
    one_line_error(amft("train", *args, "--run-dir", str(tmp_path / "run")), fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, fragment", [
    (["train", "--steps", "abc"], "amft train: Invalid value for '--steps'"),
    (["train", "--stepz", "2"], "amft train: No such option: --stepz"),
    (["compare", "runs/a"], "amft compare: Missing argument"),
    (["export", "--run", "runs/a"], "amft export: Missing option '--out'"),
    (["sweep", "--jobs", "0"], "amft sweep: Invalid value for '--jobs'"),
    (["plot", "curve"], "amft plot: No such command 'curve'"),
], ids=["not-an-integer", "unknown-flag", "missing-argument", "missing-option", "below-min", "unknown-command"])
def test_usage_errors_are_one_line_too(amft, tmp_path, args, fragment):
    """What typer itself refuses (before any of our code runs) is one line as well, not its usage panel."""
    line = one_line_error(amft(*args), fragment)
    assert line.endswith(f"(see amft {args[0]} --help)")


@pytest.mark.parametrize("toml, sets, message", [
    ("[rl]\ngroup_size = -1\n", ["rl.group_size=-1"], "rl.group_size: expected an integer >= 2"),
    ("[amft]\nmu_init = 1.5\n", ["amft.mu_init=1.5"], "amft.mu_init: expected a value in [mu_min, mu_max]"),
    ("[amft]\nmu_min = 0.9\nmu_max = 0.2\nmu_init = 0.5\n", ["amft.mu_min=0.9", "amft.mu_max=0.2"],
     "amft.mu_min/mu_max: expected 0 <= mu_min < mu_max <= 1"),
    ("[train]\nalgo = \"amtf\"\n", ["train.algo=amtf"], "train.algo: unknown method 'amtf'"),
], ids=["group-size", "mu-init", "mu-min-max", "algo"])
def test_a_value_out_of_range_names_where_it_was_set(tmp_path, toml, sets, message):
    """From the preset file: the file is named; the same value from --set: the key alone (the command line)."""
    preset = tmp_path / "mine.toml"
    preset.write_text(toml)
    with pytest.raises(ValueError) as e:
        resolve_config(str(preset), [])
    assert str(e.value).startswith(f"{preset}: {message}")
    with pytest.raises(ValueError) as e:
        resolve_config("tiny-math", sets)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("args, fragment", [
    (["--k", "0"], "--k 0: expected an integer >= 1"),
    (["--limit", "-3"], "--limit -3: expected an integer >= 0"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: expected an integer >= 1"),
    (["--temperature", "-1"], "--temperature -1.0: expected a float > 0"),
    (["--top-p", "2"], "--top-p 2.0: expected a float in (0, 1]"),
], ids=["k", "limit", "batch-size", "max-new-tokens", "temperature", "top-p"])
def test_eval_flags_are_checked_as_their_keys(amft, trained, args, fragment):
    """Each flag refuses what its --set eval.<key> refuses (they were once passed on unchecked:
    --k 0 ran k = 8, --limit -3 every example); nothing is written."""
    before = snapshot(trained)
    one_line_error(amft("eval", "--run", str(trained), *args), fragment)
    assert snapshot(trained) == before


def test_a_file_where_a_folder_is_expected(amft, trained, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    in_the_way = "a file is in the way (a folder was expected there)"
    one_line_error(amft("train", "--run-dir", str(file)), str(file), in_the_way)
    one_line_error(amft("eval", "--run", str(trained), "--limit", "2", "--greedy", "--out", str(file)), str(file),
                   in_the_way)
    one_line_error(amft("prepare", "--set", f"task.data_dir={file}"), str(file), "writing the data splits", in_the_way)
    assert file.read_text() == "mine"


def test_a_run_dir_holding_other_files_needs_overwrite_which_keeps_them(amft, trained, tiny_data, tmp_path):
    """A fresh start among files no run writes (a project folder) is refused; --overwrite trains
    there and deletes only what a run wrote, keeping the rest (notes, a scheduler's log, .git);
    --auto-resume (its log may be in the folder) starts or continues as usual."""
    mine = tmp_path / "project"
    shutil.copytree(trained, mine)
    (mine / "notes.md").write_text("mine")
    (mine / ".git").mkdir()
    before = snapshot(mine)
    one_line_error(amft("train", "--run-dir", str(mine), "--steps", "1"),
                   f"{mine} holds files that are not a run's (notes.md): pick a new or empty --run-dir, or pass "
                   "--overwrite")
    assert snapshot(mine) == before
    sets = [*flags(tiny_sets(tiny_data)), "--set", "train.eval_at_end=false", "--plain"]
    result = amft("train", "--run-dir", str(mine), "--steps", "2", "--algo", "sft", "--overwrite", *sets)
    assert result.returncode == 0, result.stderr
    assert (mine / "notes.md").read_text() == "mine" and (mine / ".git").is_dir()
    assert sorted(p.name for p in (mine / "checkpoints").iterdir()) == ["step-2"]  # the old run's step-4 went
    scheduled = tmp_path / "scheduled"
    scheduled.mkdir()
    (scheduled / "slurm-1.out").write_text("")
    for steps in ("2", "4"):  # a first start, then a requeued one that continues
        result = amft("train", "--run-dir", str(scheduled), "--steps", steps, "--algo", "sft", "--auto-resume", *sets)
        assert result.returncode == 0, result.stderr
    assert (scheduled / "slurm-1.out").is_file() and len(read_metrics(scheduled)) == 4
    starts = [json.loads(line)["step"] for line in (scheduled / "environment.jsonl").read_text().splitlines()]
    assert starts == [0, 2]  # the second start continued from step 2
    assert foreign_files(mine) == ["notes.md"] and foreign_files(trained) == []


def test_resume_without_a_complete_checkpoint_refuses_instead_of_starting_over(amft, trained, tmp_path):
    """Starting over would rewrite the run's metrics; --resume names why there is nothing to continue."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for step in (2, 4):
        (run / "checkpoints" / f"step-{step}" / "trainer_state.pt").unlink()
    before = snapshot(run)
    one_line_error(amft("train", "--resume", str(run), "--steps", "6", "--plain"),
                   f"--resume {run}: no complete checkpoint to continue from: step-2, step-4 in "
                   f"{run / 'checkpoints'} lack trainer_state.pt (damaged); --overwrite starts the run afresh")
    shutil.rmtree(run / "checkpoints")
    one_line_error(amft("train", "--resume", str(run), "--steps", "6", "--plain"),
                   "it has none (stopped before its first save)")
    assert snapshot(run) == {k: v for k, v in before.items() if not k.startswith("checkpoints")}


def test_resume_refuses_a_config_whose_model_has_another_shape(amft, trained, tiny_data, tmp_path):
    """An edited config.toml (or --set) with another width or depth: refused before anything is
    prepared, so the shared base model is not rebuilt in that shape and no weights are loaded."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = run / "config.toml"
    config.write_text(config.read_text().replace("hidden_size = 128", "hidden_size = 64"))
    before, base = snapshot(run), snapshot(tiny_data / "model")
    one_line_error(amft("train", "--resume", str(run), "--steps", "6", "--plain"),
                   f"--resume {run}: model.hidden_size 64 (the checkpoint's: 128): the weights cannot change shape")
    one_line_error(amft("train", "--resume", str(trained), "--steps", "6", "--set", "model.num_layers=2", "--plain"),
                   "model.num_layers 2 (the checkpoint's: 4)")
    assert snapshot(run) == before and snapshot(tiny_data / "model") == base
    # flags that --resume would ignore (the run's own config.toml and folder are what it continues)
    one_line_error(amft("train", "--resume", str(run), "--preset", "tiny-gp", "--run-dir", str(tmp_path / "x"),
                        "--overwrite"), "continues that run with its own config.toml: drop --preset, --run-dir, "
                                        "--overwrite")
    assert snapshot(run) == before and not (tmp_path / "x").exists()
    one_line_error(amft("train", "--resume", str(run), "--run-dir", str(run), "--steps", "6", "--set",
                        "model.num_layers=2"), "model.num_layers 2")  # its own folder again: not refused as ignored


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


def test_disk_full_while_checkpointing_then_resume_once_space_is_freed(amft, tiny_data, tmp_path):
    """A 16 MiB tmpfs holds one 10.7 MiB checkpoint, not two: the step-4 save fails mid-write
    (torch.save's "unexpected pos"). After the disk grows, --resume finishes the run, equal to
    an uninterrupted one."""
    mount, keep = tmp_path / "small", tmp_path / "kept"
    mount.mkdir()
    sets = flags(tiny_sets(tiny_data) + ["train.save_every=2", "train.eval_at_end=false"])
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
def tiny_model(tiny_data):
    from amft_cli.model import load_policy

    return load_policy(resolve_config("tiny-math", tiny_sets(tiny_data)).model, torch.device("cpu"))


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
