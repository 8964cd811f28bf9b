"""train.report_to: TensorBoard and W&B (offline) mirror metrics.jsonl through a real tiny run and
its resume; a tracker whose package is missing stops the start in one line, before any work."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from amft_cli import metrics
from amft_cli.cli_options import is_user_error, resolve_config
from amft_cli.metrics import TrackerError, read_metrics
from amft_cli.train import train
from amft_runs import tiny_sets, wait_until

KEYS = ("balance/mu", "loss/sft", "policy/entropy", "optim/lr")


def crash_and_resume(run: Path, tiny_data: Path, tracker: str) -> list[dict]:
    """4 steps (checkpoints at 3 and 4), step 4's checkpoint lost as in a crash after its metrics
    were logged, then a resume to 5: the trackers see step 4 twice, metrics.jsonl once. The
    cosine learning rate spans train.steps, so the two step 4s differ (optim/lr)."""
    sets = tiny_sets(tiny_data) + [f"train.report_to={tracker}", "train.eval_at_end=false"]
    train(resolve_config("tiny-math", sets + ["train.steps=4"]), run, on_message=lambda msg: None)
    shutil.rmtree(run / "checkpoints" / "step-4")
    train(resolve_config("tiny-math", sets + ["train.steps=5"]), run, resume=True, on_message=lambda msg: None)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    return records


def test_tensorboard_holds_every_number_of_metrics_jsonl_across_a_resume(tmp_path, tiny_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = crash_and_resume(tmp_path / "run", tiny_data, "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    for key in KEYS:
        logged = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        assert len(logged) >= 2, key
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(key)] == logged


@pytest.fixture
def fresh_wandb():
    """W&B keeps process-wide state (settings, its service) from one wandb.init to the next; a
    user's run is one process, so each test here starts from none and leaves none."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb transaction log (a LevelDB-style log: 32 KiB blocks of
    [crc32, length, type] chunks after a 7-byte header), as W&B's offline mode writes it."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def closed(log: Path) -> bool:
    """Whether a .wandb log ends with W&B's exit record (a log still being written may end mid-chunk)."""
    try:
        records = wandb_records(log)
    except Exception:  # noqa: BLE001 - a protobuf cut short
        return False
    return bool(records) and records[-1].WhichOneof("record_type") == "exit"


def test_wandb_gets_every_number_and_the_config_and_a_resume_continues_the_same_run(tmp_path, tiny_data,
                                                                                   monkeypatch, fresh_wandb):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network here; the files are what a sync uploads
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    records = crash_and_resume(run, tiny_data, "wandb")
    run_id = (run / "wandb" / "amft-run-id").read_text()
    logs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and {p.name for p in logs} == {f"run-{run_id}.wandb"}  # one W&B run, two starts
    # run.finish() can return before W&B's service process has written a start's log out (once, in a
    # clean-clone CI run, a log read here held no run record; read later, it held every record); a
    # user's process waits for the service at exit, as teardown does
    import wandb

    wandb.teardown()
    wait_until(lambda: all(closed(log) for log in logs), timeout=60, poll=0.1)
    by_step = {r["step"]: r for r in records}
    steps = []
    for start_index, log in enumerate(logs):
        parsed = wandb_records(log)
        (start,) = [r.run for r in parsed if r.WhichOneof("record_type") == "run"]
        config = {u.key: json.loads(u.value_json) for u in start.config.update}
        assert start.run_id == run_id and start.display_name == "run" and config["train"]["report_to"] == ["wandb"]
        for r in parsed:
            if r.WhichOneof("record_type") != "history":
                continue
            row = {item.nested_key[0]: json.loads(item.value_json) for item in r.history.item}
            steps.append(row["_step"])
            record = by_step[row["_step"]]
            same = start_index == 1 or row["_step"] < 4  # the first start's step 4 is the lost one
            assert (row["optim/lr"] == pytest.approx(record["optim/lr"], rel=1e-9)) == same
            for key in KEYS:
                if same and record.get(key) is not None:
                    assert row[key] == pytest.approx(record[key], rel=1e-9), key
    assert steps == [1, 2, 3, 4, 4, 5]  # step 4 again after the resume (W&B keeps its first)


def test_a_tracker_that_is_not_installed_stops_the_start_in_one_line(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setitem(metrics.TRACKERS, "wandb", "amft_no_such_package")
    cfg = resolve_config("tiny-math", tiny_sets(tiny_data) + ["train.report_to=tensorboard,wandb"])
    with pytest.raises(TrackerError) as raised:
        train(cfg, tmp_path / "run", on_message=lambda msg: None)
    assert str(raised.value).startswith("train.report_to: wandb needs the amft_no_such_package package: pip install")
    assert is_user_error(raised.value)  # the CLI prints it as one line, exit 2
    assert not (tmp_path / "run").exists()  # nothing written: the folder the start made is gone again


def test_wandb_that_cannot_start_stops_the_start_in_one_line(tmp_path, tiny_data, monkeypatch, fresh_wandb):
    """Online W&B without an account (none here): its error in one line, with the offline way out."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = resolve_config("tiny-math", tiny_sets(tiny_data) + ["train.report_to=wandb", "train.eval_at_end=false"])
    with pytest.raises(TrackerError) as raised:
        train(cfg, tmp_path / "run", on_message=lambda msg: None)
    message = str(raised.value)
    assert message.startswith("train.report_to: W&B did not start: ") and "WANDB_MODE=offline" in message
    assert "\n" not in message and is_user_error(raised.value)


def test_report_to_names_only_known_trackers():
    with pytest.raises(ValueError, match="train.report_to: expected a list of tensorboard and wandb"):
        resolve_config("tiny-math", ["train.report_to=mlflow"])
