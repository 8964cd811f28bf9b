"""The metric sink: strict JSON lines, resume truncation, tolerant reading."""

import json
import math

import pytest

from amft_cli.metrics import MetricSink, read_metrics


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_lines_are_strict_json_with_nan_and_inf_as_null(tmp_path):
    with MetricSink(tmp_path) as sink:
        sink.log(1, {"loss/sft": 0.5, "reward/mean": float("nan"), "policy/entropy": float("inf"),
                     "loss/rl": None, "balance/meta_update": 1.0})
        sink.log(2, {"loss/sft": 0.25})
    lines = _lines(tmp_path / "metrics.jsonl")
    assert len(lines) == 2
    # parse_constant rejects NaN/Infinity tokens, so this fails on non-strict JSON
    first = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert first["step"] == 1 and first["loss/sft"] == 0.5 and first["balance/meta_update"] == 1.0
    assert first["reward/mean"] is None and first["policy/entropy"] is None and first["loss/rl"] is None
    assert isinstance(first["time"], float)
    assert json.loads(lines[1])["step"] == 2 and "reward/mean" not in json.loads(lines[1])


def test_each_line_is_flushed_before_close(tmp_path):
    sink = MetricSink(tmp_path)
    sink.log(7, {"loss/sft": 1.5})
    # a killed run never reaches close(): the line must already be on disk
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss/sft"] == 1.5
    sink.close()


def test_fresh_run_starts_a_new_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0, "loss/sft": 9.0}\n')
    with MetricSink(tmp_path) as sink:
        sink.log(1, {"loss/sft": 2.0})
    assert [r["loss/sft"] for r in read_metrics(tmp_path)] == [2.0]


def test_resume_keeps_steps_up_to_checkpoint_and_appends(tmp_path):
    with MetricSink(tmp_path) as sink:
        for step in range(1, 8):
            sink.log(step, {"loss/sft": step / 10})
    # the run was killed mid-write of step 8
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss/s')
    before = _lines(tmp_path / "metrics.jsonl")[:5]
    with MetricSink(tmp_path, resume_step=5) as sink:
        assert _lines(tmp_path / "metrics.jsonl") == before  # kept lines byte-identical
        for step in range(6, 9):
            sink.log(step, {"loss/sft": step / 10})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss/sft"] for r in records] == [s / 10 for s in range(1, 9)]
    assert not list(tmp_path.glob("*.tmp"))  # the atomic rewrite left no temp file


def test_resume_without_a_file_creates_one(tmp_path):
    with MetricSink(tmp_path / "run", resume_step=3) as sink:
        sink.log(4, {"loss/sft": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [4]


def test_read_metrics_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss/sft": 0.5}\n{"step": 2, "loss/sft": null}\n{"step": 3, "lo')
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["loss/sft"] is None


def test_read_metrics_rejects_a_corrupt_middle_line_and_a_missing_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    with pytest.raises(ValueError, match="no metrics file"):
        read_metrics(tmp_path / "nowhere")
    # the line number counts blank lines; bytes that are not UTF-8 and records without a step are named too
    for body, message in ((b'{"step": 1}\n\n\nnot json\n{"step": 2}\n', "line 4 is not valid JSON"),
                          (b'{"step": 1}\n{"step": 2, "x": "\xff\xfe"}\n{"step": 3}\n', "line 2 is not valid UTF-8"),
                          (b'{"time": 1}\n{"step": 2}\n', "line 1 is not a step record"),
                          (b'{"step": "two"}\n{"step": 2}\n', "line 1 is not a step record"),
                          (b'[1]\n{"step": 2}\n', "line 1 is not a step record")):
        path.write_bytes(body)
        with pytest.raises(ValueError, match=f"^{path}: {message}"):
            read_metrics(path)
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "x": "\xff')  # a killed writer: dropped
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_numpy_like_scalars_are_written_as_plain_floats(tmp_path):
    class Scalar:  # stands in for a numpy scalar / 0-d tensor: only __float__
        def __float__(self):
            return 0.125

    with MetricSink(tmp_path) as sink:
        sink.log(1, {"optim/grad_norm": Scalar(), "optim/lr": 1e-6})
    record = read_metrics(tmp_path)[0]
    assert record["optim/grad_norm"] == 0.125 and math.isclose(record["optim/lr"], 1e-6)
