"""One writer, many readers for a data folder (data.reading): while a run reads a folder, a config
that needs it rebuilt is refused in one line instead of replacing the splits under the run (whose
end-of-training score came from another test set than its start's); two starts on a missing folder
prepare it once."""

from __future__ import annotations

import fcntl
import os
import shutil

from amft_cli.cli import resolve_config
from amft_cli.data import split_path
from amft_cli.datalock import reading
from amft_cli.tasks.base import read_jsonl
from amft_cli.train import train
from amft_runs import SECOND_LONG_STEPS, flags, one_line_error, snapshot, tiny_sets, wait_until

REFUSED = "in use by another amft process"


def test_a_folder_a_run_reads_is_not_rebuilt_under_it(amft, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    sets = tiny_sets(data) + SECOND_LONG_STEPS
    other = flags(sets + ["task.test_size=4"])
    before = snapshot(data)
    run = amft.start("train", "--steps", "40", "--plain", "--run-dir", str(tmp_path / "run"), *flags(sets))
    assert wait_until(lambda: (tmp_path / "run" / "metrics.jsonl").is_file(), run)  # training, past its start
    one_line_error(amft("prepare", *other), REFUSED, "task.test_size 8 there, 4 here")
    one_line_error(amft("train", "--steps", "1", "--run-dir", str(tmp_path / "other"), *other), REFUSED)
    one_line_error(amft("eval", "--model", str(data / "model"), "--preset", "tiny-math", "--limit", "1",
                        "--out", str(tmp_path / "eval"), *other), REFUSED, "task.test_size")
    one_line_error(amft("prepare", "--force", *flags(sets)), REFUSED, "(amft prepare --force rebuilds it)")
    same = amft("prepare", *flags(sets))  # the run's own config: nothing to rebuild, read beside it
    assert same.returncode == 0 and "is current" in same.stdout, same.stderr
    # the run's tiny model is locked too, wherever the data of the config that would rebuild it lives
    one_line_error(amft("prepare", *flags(sets + [f"task.data_dir={tmp_path / 'c'}", "model.hidden_size=16"])),
                   f"{data / 'model'}: {REFUSED}", "model.hidden_size 128 there, 16 here", "--set model.path=")
    own = amft("prepare", *flags(sets + [f"model.path={tmp_path / 'm16'}", "model.hidden_size=16"]))
    assert own.returncode == 0 and "built tiny" in own.stdout, own.stderr  # its own model folder: beside the run
    assert snapshot(data) == before and run.running()
    assert not (tmp_path / "other").exists()
    run.process.kill()  # the kernel drops a killed reader's lock
    run.wait()
    assert amft("prepare", *other).returncode == 0
    assert len(read_jsonl(data / "test.jsonl")) == 4


def test_a_library_train_holds_the_folder_too(amft, tiny_data, tmp_path):
    """train() itself reads under the lock (the CLI is not the only caller)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    sets = tiny_sets(data)
    refusals = []

    def during(step: int, metrics: dict) -> None:
        if step == 2:
            refusals.append(amft("prepare", *flags(sets + ["task.val_size=4"])))

    cfg = resolve_config("tiny-math", sets + ["train.steps=2"])
    train(cfg, tmp_path / "run", on_metrics=during, on_message=lambda msg: None)
    one_line_error(refusals[0], REFUSED, "task.val_size 8 there, 4 here")
    assert len(read_jsonl(split_path(cfg, "val"))) == 8


def test_two_starts_on_a_missing_folder_prepare_it_once(amft, tmp_path):
    sets = flags(tiny_sets(tmp_path / "data"))
    first, second = amft.start("prepare", *sets), amft.start("prepare", *sets)
    results = [first.wait(), second.wait()]
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    said = sorted("wrote" in r.stdout for r in results)
    assert said == [False, True], [r.stdout for r in results]  # one wrote, the other found it current
    assert any("is current" in r.stdout for r in results)
    assert len(read_jsonl(tmp_path / "data" / "train.jsonl")) == 200


def test_a_start_that_gets_the_folder_after_another_prepared_it_does_not_build_again(tiny_data):
    """`needed` is asked again once the exclusive lock is held: another start may have prepared the
    folder between this one's look and its lock."""
    cfg = resolve_config("tiny-math", tiny_sets(tiny_data))
    answers, built = iter([["data"], []]), []
    with reading(cfg, lambda: built.append(1), lambda: next(answers)):
        pass
    assert built == []
    with reading(cfg, lambda: built.append(1), lambda: [] if built else ["data"]):  # still needed: built once
        pass
    assert built == [1]


def test_a_start_waits_while_another_process_prepares_and_says_so(amft, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    fd = os.open(data / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a preparing process holds it
    try:
        run = amft.start("prepare", *flags(tiny_sets(data)))
        assert wait_until(lambda: "waiting for another amft process" in run.err.read_text(), run, timeout=60)
        assert run.running()
    finally:
        os.close(fd)
    result = run.wait()
    assert result.returncode == 0 and "is current" in result.stdout, result.stderr
    assert result.stderr.strip() == f"waiting for another amft process to finish preparing {data}/ ..."
