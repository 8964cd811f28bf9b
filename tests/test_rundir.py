"""rundir.py: finding runs, checkpoints, config, metrics and eval results, with
one-line errors that name the directory and what is missing."""

import json
import os

import pytest

from amft_cli.config import Config
from amft_cli.config_io import to_toml
from amft_cli.rundir import (RunDirError, checkpoints, eval_path, latest_run, read_config, read_eval,
                             read_metrics, resolve_checkpoint, samples_path)


def one_line_error(func, *args):
    with pytest.raises(RunDirError) as e:
        func(*args)
    message = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in message
    return message


def make_run(root, name, mtime=None, metrics=True, steps=()):
    run = root / name
    run.mkdir(parents=True)
    if metrics:
        (run / "metrics.jsonl").write_text('{"step": 1, "balance/mu": 1.0}\n')
    for step in steps:
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
    if mtime is not None:
        for p in [run, *run.rglob("*")]:
            os.utime(p, (mtime, mtime))
    return run


def test_latest_run_picks_the_newest_run_and_skips_other_folders(tmp_path):
    make_run(tmp_path, "old", mtime=1_000)
    newest = make_run(tmp_path, "new", mtime=3_000, metrics=False, steps=[10])
    make_run(tmp_path, "mid", mtime=2_000)
    (tmp_path / "notes").mkdir()  # not a run: neither metrics nor checkpoints
    assert latest_run(tmp_path) == newest
    # appending a metrics line makes a run newest although its folder mtime is old
    os.utime(tmp_path / "old" / "metrics.jsonl", (4_000, 4_000))
    assert latest_run(tmp_path) == tmp_path / "old"
    # evaluating or plotting another run (eval/, plots/ created now) does not make it the latest
    (tmp_path / "mid" / "eval").mkdir()
    (tmp_path / "mid" / "plots").mkdir()
    assert latest_run(tmp_path) == tmp_path / "old"


def test_latest_run_without_runs_is_a_one_line_error(tmp_path):
    assert str(tmp_path / "runs") in one_line_error(latest_run, tmp_path / "runs")
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    assert "no runs found" in one_line_error(latest_run, tmp_path / "runs")


def test_checkpoints_lists_step_folders_in_order(tmp_path):
    run = make_run(tmp_path, "r", steps=[200, 10])
    (run / "checkpoints" / "step-30.tmp").mkdir()      # an unfinished save
    (run / "checkpoints" / "step-40").write_text("")   # a file, not a checkpoint
    assert checkpoints(run) == {10: run / "checkpoints" / "step-10", 200: run / "checkpoints" / "step-200"}
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-200"
    assert resolve_checkpoint(run, 10) == run / "checkpoints" / "step-10"


def test_resolve_checkpoint_errors_name_the_step_and_the_choices(tmp_path):
    run = make_run(tmp_path, "r", steps=[200, 10])
    message = one_line_error(resolve_checkpoint, run, 50)
    assert "--step 50" in message and "available: 10, 200" in message and str(run) in message
    bare = make_run(tmp_path, "bare")
    assert "no checkpoints" in one_line_error(resolve_checkpoint, bare, None)
    assert "no such run directory" in one_line_error(resolve_checkpoint, tmp_path / "nope", None)


def test_read_metrics_drops_a_truncated_last_line(tmp_path):
    run = make_run(tmp_path, "r", metrics=False)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss/sft": 2.5}\n{"step": 2, "loss/sft": null}\n{"step": 3, "lo')
    assert read_metrics(run) == [{"step": 1, "loss/sft": 2.5}, {"step": 2, "loss/sft": None}]


def test_read_metrics_errors(tmp_path):
    run = make_run(tmp_path, "r", metrics=False)
    assert one_line_error(read_metrics, run) == f"{run}: no metrics.jsonl — is this a run directory?"
    (run / "metrics.jsonl").write_text("")
    assert "is empty" in one_line_error(read_metrics, run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{oops\n{"step": 3}\n')
    assert "line 2" in one_line_error(read_metrics, run)


def test_read_config_round_trips_the_saved_config(tmp_path):
    run = make_run(tmp_path, "r")
    assert "no config.toml" in one_line_error(read_config, run)
    cfg = Config()
    cfg.train.algo, cfg.seed, cfg.amft.warmup_steps = "mix", 7, 3
    (run / "config.toml").write_text(to_toml(cfg))
    assert read_config(run) == cfg


def test_read_eval_orders_id_before_ood_and_rejects_foreign_json(tmp_path):
    run = make_run(tmp_path, "r")
    assert read_eval(run) == {}
    for split, ood in (("aime24", False), ("arc_c", True), ("math500", False)):
        path = eval_path(run, split)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"split": split, "metrics": {"avg@k": 0.5, "ood": ood}}))
    samples_path(run, "aime24").write_text("{}\n")  # sample files are not results
    assert list(read_eval(run)) == ["aime24", "math500", "arc_c"]
    eval_path(run, "zzz").write_text('{"scores": 1}')
    assert "no 'metrics' object" in one_line_error(read_eval, run)


def test_a_start_that_fails_at_once_leaves_no_folder(tmp_path):
    """A folder the lock made and nothing else wrote to goes with the lock; any other stays."""
    from amft_cli.rundir import RunLock

    with RunLock(tmp_path / "runs" / "new"):
        with RunLock(tmp_path / "runs" / "new"):  # re-entrant, as train() inside the CLI's lock
            pass
        assert (tmp_path / "runs" / "new" / ".lock").is_file()  # the outer one still holds it
    assert not (tmp_path / "runs" / "new").exists()
    with RunLock(tmp_path / "runs" / "used"):
        (tmp_path / "runs" / "used" / "config.toml").write_text("")
    assert sorted(p.name for p in (tmp_path / "runs" / "used").iterdir()) == [".lock", "config.toml"]
    (tmp_path / "mine").mkdir()
    with RunLock(tmp_path / "mine"):
        pass
    assert (tmp_path / "mine").is_dir()  # it was there before: kept
