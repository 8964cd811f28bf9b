"""evaluate.py: pass@k against hand-computed binomials, avg@k on a hand-made sample
file, evaluate_split on a tiny fake task with a deterministic generate, and the
files run_eval writes (model loading and generation replaced by fakes)."""

import errno
import hashlib
import json
import subprocess
import sys
import types
from math import comb
from pathlib import Path
from types import SimpleNamespace

import pytest

from amft_cli import evaluate
from amft_cli.config import Config
from amft_cli.fsio import FileProblem
from amft_cli.rundir import RunDirError
from amft_cli.evaluate import (EvalError, batched_generate, evaluate_split, pass_at_k, results_table,
                               splits_for, summarize, table_rows)
from amft_cli.tasks.base import Score, read_jsonl, write_jsonl

# ---------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),
    (5, 0, 1, 0.0),
    (5, 0, 5, 0.0),
    (5, 5, 3, 1.0),
    (4, 1, 2, 0.5),                    # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (10, 3, 5, 1 - 21 / 252),          # 1 - C(7,5)/C(10,5)
    (10, 8, 3, 1.0),                   # only 2 wrong: every 3-subset holds a correct one
])
def test_pass_at_k_hand_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_where_they_overflow_floats():
    n, c, k = 2000, 3, 100  # C(2000, 100) ~ 1e181: fine as ints, the product form never builds it
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------------
# summarize a sample file


def _row(id_, status, reward, mode="sample"):
    return {"id": id_, "mode": mode, "prompt": id_, "completion": "", "reward": reward, "status": status}


def test_avg_at_k_on_a_fixed_sample_file(tmp_path):
    rows = ([_row("a", "correct", 1.0)] * 3 + [_row("a", "wrong", -1.0)]
            + [_row("b", "wrong", -1.0)] * 3 + [_row("b", "malformed", -3.0)]
            + [_row("c", "correct", 1.0)] + [_row("c", "wrong", -1.0)] * 3
            + [_row("a", "correct", 1.0, "greedy"), _row("b", "wrong", -1.0, "greedy"),
               _row("c", "wrong", -1.0, "greedy")])
    path = tmp_path / "test.samples.jsonl"
    write_jsonl(path, rows)
    m = summarize(read_jsonl(path))
    assert m["k"] == 4 and m["n_examples"] == 3
    assert m["avg@k"] == pytest.approx((3 / 4 + 0 / 4 + 1 / 4) / 3)
    assert m["pass@1"] == pytest.approx(m["avg@k"])
    assert m["pass@k"] == pytest.approx(2 / 3)          # a and c solved at least once
    assert m["reward_mean"] == pytest.approx((3 - 1 - 3 - 3 + 1 - 3) / 12)
    assert m["status_counts"] == {"correct": 4, "wrong": 7, "malformed": 1}
    assert m["greedy_accuracy"] == pytest.approx(1 / 3)
    assert m["greedy_reward_mean"] == pytest.approx(-1 / 3)


# ---------------------------------------------------------------------------
# evaluate_split on a fake task


def _score(example, completion):
    if completion.strip() == str(example["answer"]):
        return Score(1.0, "correct")
    return Score(-1.0, "wrong") if completion.strip().isdigit() else Score(-3.0, "malformed")


FAKE_TASK = SimpleNamespace(SPLITS=("train", "val", "test", "ood"), score=_score)
EXAMPLES = [{"id": f"e{i}", "prompt": f"p{i}", "demonstration": "", "answer": a, "meta": {}}
            for i, a in enumerate((2, 4, 6), start=1)]
SAMPLED = {"p1": ["2", "2", "5", "x"], "p2": ["1", "1", "1", "1"], "p3": ["6", "0", "0", "0"]}
GREEDY = {"p1": "2", "p2": "8", "p3": "oops"}


def fake_generate(calls):
    def generate_fn(prompts, n, greedy):
        calls.append((list(prompts), n, greedy))
        return [[GREEDY[p]] if greedy else SAMPLED[p][:n] for p in prompts]
    return generate_fn


def test_evaluate_split_matches_hand_computed_metrics():
    calls = []
    m, rows = evaluate_split(FAKE_TASK, EXAMPLES, fake_generate(calls), k=4)
    assert calls == [(["p1", "p2", "p3"], 4, False), (["p1", "p2", "p3"], 1, True)]
    assert m["avg@k"] == pytest.approx((2 / 4 + 0 + 1 / 4) / 3)
    assert m["pass@k"] == pytest.approx(2 / 3)
    assert m["reward_mean"] == pytest.approx(-8 / 12)   # 3 correct, 8 wrong (-1), 1 malformed (-3)
    assert m["status_counts"] == {"correct": 3, "wrong": 8, "malformed": 1}
    assert m["greedy_accuracy"] == pytest.approx(1 / 3)
    assert m["greedy_status_counts"] == {"correct": 1, "wrong": 1, "malformed": 1}
    assert len(rows) == 12 + 3
    assert rows[2] == {"id": "e1", "mode": "sample", "sample": 2, "prompt": "p1", "completion": "5",
                       "reward": -1.0, "status": "wrong"}
    assert rows[-1]["mode"] == "greedy" and rows[-1]["status"] == "malformed"


def test_evaluate_split_greedy_only_skips_sampling():
    calls = []
    m, rows = evaluate_split(FAKE_TASK, EXAMPLES, fake_generate(calls), k=0)
    assert [c[1:] for c in calls] == [(1, True)]
    assert "avg@k" not in m and m["greedy_accuracy"] == pytest.approx(1 / 3) and m["n_examples"] == 3
    assert len(rows) == 3


def test_evaluate_split_uses_episodes_for_the_greedy_part():
    seen = []

    def evaluate_episodes(examples, generate, verify_iter=1):
        seen.append(generate(["p1", "p2"]))
        return {"step_accuracy": 0.5, "route_success": 0.25}, [{"id": "r1", "step": 0, "reward": 1.0,
                                                                  "status": "correct"}]

    task = SimpleNamespace(SPLITS=FAKE_TASK.SPLITS, score=_score, evaluate_episodes=evaluate_episodes)
    calls = []
    m, rows = evaluate_split(task, EXAMPLES, fake_generate(calls), k=2)
    assert seen == [["2", "8"]]                     # greedy, one completion per step prompt
    assert calls[1] == (["p1", "p2"], 1, True)
    assert m["step_accuracy"] == 0.5 and m["route_success"] == 0.25
    assert m["greedy_accuracy"] == 0.25             # route success is the task's success
    assert m["avg@k"] == pytest.approx((2 / 2 + 0 + 1 / 2) / 3)
    assert rows[-1]["mode"] == "episode" and sum(r["mode"] == "sample" for r in rows) == 6


def test_evaluate_split_without_examples_is_an_error():
    with pytest.raises(EvalError, match="no examples"):
        evaluate_split(FAKE_TASK, [], fake_generate([]), k=2)


def test_batched_generate_chunks_keeps_order_and_reports_progress():
    chunks, progress = [], []

    def sample(prompts, n, greedy, seed, first_row):
        chunks.append((list(prompts), seed, first_row))
        return [[f"{p}#{i}" for i in range(n)] for p in prompts]

    generate_fn = batched_generate(sample, batch_size=5, seed=100, on_progress=progress.append)
    out = generate_fn(["a", "b", "c", "d", "e"], 2, False)
    assert [c[0] for c in chunks] == [["a", "b"], ["c", "d"], ["e"]]   # 5 // 2 prompts per chunk
    assert [c[1:] for c in chunks] == [(100, 0), (100, 4), (100, 8)]  # one seed; rows numbered across chunks
    assert progress == [4, 4, 2]
    assert out == [[f"{p}#0", f"{p}#1"] for p in "abcde"]


# ---------------------------------------------------------------------------
# splits


def test_splits_for_generated_tasks():
    assert splits_for(FAKE_TASK, "id") == ["test"]
    assert splits_for(FAKE_TASK, "ood") == ["ood"]
    assert splits_for(FAKE_TASK, "all") == ["test", "ood"]
    with pytest.raises(EvalError, match="--split 'both'"):
        splits_for(FAKE_TASK, "both")


def test_splits_for_eval_sets_uses_ood_flag_and_files_on_disk(tmp_path):
    task = SimpleNamespace(SPLITS=("train",), EVAL_SETS={
        "gpqa": {"kind": "mc", "default_k": 8, "ood": True}, "math500": {"kind": "math", "default_k": 1, "ood": False},
        "aime24": {"kind": "math", "default_k": 32, "ood": False}, "arc_c": {"kind": "mc", "default_k": 1, "ood": True}})
    assert splits_for(task, "all") == ["math500", "aime24", "gpqa", "arc_c"]
    for name in ("aime24", "gpqa"):
        (tmp_path / f"{name}.jsonl").write_text("{}\n")
    assert splits_for(task, "id", tmp_path) == ["aime24"]
    assert splits_for(task, "ood", tmp_path) == ["gpqa"]
    assert evaluate.default_k(task, "aime24", 8) == 32 and evaluate.default_k(FAKE_TASK, "test", 8) == 8
    assert evaluate.is_ood(task, "gpqa") and not evaluate.is_ood(task, "aime24") and evaluate.is_ood(FAKE_TASK, "ood")


def test_load_split_errors_name_the_file(tmp_path):
    from amft_cli.config import Config, ConfigError
    from amft_cli.data import load_split

    cfg = Config()
    cfg.task.data_dir = str(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_split(cfg, "test")
    assert str(tmp_path / "test.jsonl") in str(e.value) and "amft prepare" in str(e.value)
    assert "\n" not in str(e.value)
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_split(cfg, "test")
    write_jsonl(tmp_path / "test.jsonl", EXAMPLES)
    assert [ex["id"] for ex in load_split(cfg, "test", limit=2)] == ["e1", "e2"]


# ---------------------------------------------------------------------------
# run_eval with the model replaced


def test_run_eval_rejects_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(EvalError) as e:
        evaluate.run_eval(Config(), tmp_path, tmp_path / "eval")
    assert f"{tmp_path}: not a model folder" in str(e.value) and "\n" not in str(e.value)


def scripted_eval(tmp_path, monkeypatch) -> tuple[Config, Path, list]:
    """A config, a checkpoint folder and the sampler's seeds list of run_eval with the model replaced
    by the scripted GREEDY/SAMPLED completions."""
    data = tmp_path / "data"
    write_jsonl(data / "test.jsonl", EXAMPLES)
    write_jsonl(data / "ood.jsonl", EXAMPLES[:2])
    ckpt = tmp_path / "step-10"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    seeds = []

    def sample_texts(model, tokenizer, prompts, n, *, greedy, seed, first_row, **kw):
        seeds.append((seed, first_row))
        return [[GREEDY[p]] * n if greedy else SAMPLED[p][:n] for p in prompts]

    monkeypatch.setitem(sys.modules, "amft_cli.rollout", types.SimpleNamespace(sample_texts=sample_texts))
    monkeypatch.setattr(evaluate, "_load_model", lambda cfg, path: (None, None))
    monkeypatch.setattr(evaluate, "get_task", lambda name: FAKE_TASK)
    cfg = Config()
    cfg.task.data_dir = str(data)
    return cfg, ckpt, seeds


def test_run_eval_writes_metrics_settings_and_samples(tmp_path, monkeypatch):
    cfg, ckpt, seeds = scripted_eval(tmp_path, monkeypatch)
    results = evaluate.run_eval(cfg, ckpt, tmp_path / "eval", which="all", k=4, batch_size=8,
                                seed=7, progress=False)
    assert list(results) == ["test", "ood"]
    record = json.loads((tmp_path / "eval" / "test.json").read_text())
    assert record["checkpoint"] == str(ckpt) and record["split"] == "test"
    assert record["settings"]["k"] == 4 and record["settings"]["temperature"] == cfg.eval.temperature
    assert record["metrics"]["avg@k"] == pytest.approx(0.25) and record["metrics"]["ood"] is False
    assert results["ood"]["ood"] is True and results["ood"]["avg@k"] == pytest.approx((2 / 4 + 0) / 2)
    samples = read_jsonl(tmp_path / "eval" / "test.samples.jsonl")
    assert len(samples) == 3 * 4 + 3 and {"id", "prompt", "completion", "reward", "status"} <= set(samples[0])
    assert seeds[:2] == [(7, 0), (7, 8)]  # 8 // 4 = 2 prompts of 4 rows per chunk


def test_a_second_evaluation_into_the_same_folder_is_refused_in_one_line(tmp_path, monkeypatch):
    """One writer per eval folder: another process holding it (here a bare RunLock, as `amft eval`
    takes) refuses this one before any work, naming the holder; once it ends, the eval runs."""
    cfg, ckpt, _ = scripted_eval(tmp_path, monkeypatch)
    out = tmp_path / "eval"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom amft_cli.rundir import RunLock\n"
                               f"with RunLock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError) as e:
            evaluate.run_eval(cfg, ckpt, out, which="id", k=2, progress=False)
        message = str(e.value)
        assert f"{out} is in use by another amft process" in message and f"pid {holder.pid}" in message
        assert message.endswith("wait for that evaluation to end or pass another --out") and "\n" not in message
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert list(evaluate.run_eval(cfg, ckpt, out, which="id", k=2, progress=False)) == ["test"]


def test_an_eval_write_that_fails_leaves_the_previous_scores_and_no_debris(tmp_path, monkeypatch):
    cfg, ckpt, _ = scripted_eval(tmp_path, monkeypatch)
    out = tmp_path / "eval"
    evaluate.run_eval(cfg, ckpt, out, which="id", k=2, progress=False)
    before = (out / "test.json").read_text()

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate.os, "replace", disk_full)
    with pytest.raises(FileProblem, match="writing the test results: no space left on device"):
        evaluate.run_eval(cfg, ckpt, out, which="id", k=4, progress=False)
    assert (out / "test.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == [".lock", "test.json", "test.samples.jsonl"]  # no temp file
    record = json.loads(before)  # and the samples are still the ones those scores name
    assert hashlib.sha256((out / "test.samples.jsonl").read_bytes()).hexdigest() == record["samples_sha256"]


def test_results_table_formats_percentages_and_k():
    results = {"test": {"k": 4, "avg@k": 0.25, "pass@k": 2 / 3, "greedy_accuracy": 1 / 3, "reward_mean": -0.5,
                        "n_examples": 3, "ood": False},
               "ood": {"greedy_accuracy": 0.5, "greedy_reward_mean": 1.0, "n_examples": 2, "ood": True,
                       "route_success": 0.5}}
    headers, rows = table_rows(results)
    assert headers[-1] == "route_success"
    assert rows[0] == ["test", "ID", "3", "25.0% @4", "66.7% @4", "33.3%", "-0.50", "—"]
    assert rows[1] == ["ood", "OOD", "2", "—", "—", "50.0%", "1.00", "50.0%"]
    table = results_table(results)
    assert [c.header for c in table.columns] == headers and table.row_count == 2


def test_run_eval_with_a_real_tiny_model_agrees_with_its_samples_file(tmp_path):
    """No fakes: a real (untrained) tiny model, the real sampler and the tiny-math verifier."""
    from amft_cli.cli import resolve_config
    from amft_cli.data import prepare
    from amft_cli.tasks import tiny_math

    cfg = resolve_config("tiny-math", [f"task.data_dir={tmp_path / 'data'}", f"model.path={tmp_path / 'model'}",
                                       "task.train_size=50", "task.val_size=4", "task.test_size=6",
                                       "task.ood_size=6", "model.hidden_size=32", "model.num_layers=1",
                                       "eval.max_new_tokens=6"])
    prepare(cfg, log=lambda msg: None)
    results = evaluate.run_eval(cfg, cfg.model.path, tmp_path / "eval", which="all", k=3, progress=False)
    assert list(results) == ["test", "ood"]
    for split in ("test", "ood"):
        rows = read_jsonl(tmp_path / "eval" / f"{split}.samples.jsonl")
        sampled = [r for r in rows if r["mode"] == "sample"]
        greedy = [r for r in rows if r["mode"] == "greedy"]
        assert len(sampled) == 6 * 3 and len(greedy) == 6
        assert all(len(r["completion"]) <= 6 for r in rows)  # char tokens: at most max_new_tokens chars
        by_id = {ex["id"]: ex for ex in read_jsonl(tmp_path / "data" / f"{split}.jsonl")}
        for r in rows:  # every recorded verdict is the verifier's verdict on that completion
            score = tiny_math.score(by_id[r["id"]], r["completion"])
            assert (r["status"], r["reward"]) == (score.status, score.reward)
        assert results[split]["avg@k"] == pytest.approx(sum(r["status"] == "correct" for r in sampled) / 18)
        assert results[split]["greedy_accuracy"] == pytest.approx(sum(r["status"] == "correct" for r in greedy) / 6)
    evaluate.run_eval(cfg, cfg.model.path, tmp_path / "eval2", which="id", k=3, progress=False)
    assert read_jsonl(tmp_path / "eval2" / "test.samples.jsonl") == read_jsonl(tmp_path / "eval" / "test.samples.jsonl")
