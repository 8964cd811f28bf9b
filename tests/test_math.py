"""The math task: grading with real math-verify, loading OpenR1-style data and eval sets."""

import socket

import pytest

from amft_cli.config import TaskConfig
from amft_cli.tasks import math as mt
from amft_cli.tasks.base import write_jsonl


# ---------------------------------------------------------------------------
# grading


@pytest.mark.parametrize("gold", ["\\frac{1}{2}", "0.5"])
@pytest.mark.parametrize("pred", ["\\frac{1}{2}", "0.5", "1/2", "\\dfrac12"])
def test_equivalent_forms_are_correct(gold, pred):
    s = mt.grade(f"So the answer is \\boxed{{{pred}}}.", gold)
    assert (s.reward, s.status) == (1.0, "correct")


def test_wrong_value_scores_zero():
    s = mt.grade("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}")
    assert (s.reward, s.status, s.info["pred"]) == (0.0, "wrong", "\\frac{1}{3}")


def test_symbolic_answers_go_through_math_verify():
    assert mt.grade("\\boxed{x^2+1}", "1+x^2").correct
    assert mt.grade("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}").correct
    assert not mt.grade("\\boxed{x^2-1}", "1+x^2").correct


def test_last_boxed_matches_nested_braces():
    assert mt.last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert mt.last_boxed("\\boxed{\\frac{\\sqrt{3}}{2}}") == "\\frac{\\sqrt{3}}{2}"
    assert mt.last_boxed("\\boxed{\\frac{1}{2}") is None  # cut off
    assert mt.last_boxed("no answer") is None
    assert mt.grade("\\boxed{\\frac{1}{2}}", "0.5").correct


def test_only_text_after_the_last_think_end_counts():
    text = "<think>maybe \\boxed{3}</think> first</think> final \\boxed{4}"
    assert mt.grade(text, "4").correct
    assert not mt.grade(text, "3").correct
    # a box inside the thinking is not an answer
    assert mt.grade("<think>\\boxed{4}</think> done", "4").status == "malformed"


def test_missing_think_end_grades_the_whole_text():
    # documented choice: no </think> -> the whole completion is the answer text
    assert mt.grade("<think>thinking... \\boxed{4}", "4").correct
    assert mt.grade("3+1 = \\boxed{4}", "4").correct


@pytest.mark.parametrize("completion", ["", "the answer is 4", "\\boxed{}", "\\boxed{  }", "\\boxed{4"])
def test_no_or_empty_answer_is_malformed(completion):
    s = mt.grade(completion, "4")
    assert (s.reward, s.status) == (0.0, "malformed")


def test_overlong_answer_is_wrong_without_parsing():
    s = mt.grade("\\boxed{" + "1+" * 600 + "1}", "1201")
    assert (s.reward, s.status) == (0.0, "wrong")


@pytest.mark.parametrize("pred, ok", [("B", True), ("b", True), ("(B)", True), ("\\text{B}", True),
                                      ("\\textbf{(B)}", True), ("B.", True), ("C", False),
                                      ("B and C", False), ("42", False)])
def test_multiple_choice_letters(pred, ok):
    s = mt.grade(f"\\boxed{{{pred}}}", "B")
    assert s.correct is ok and s.info["via"] == "letter"


def test_multiple_choice_without_box_is_malformed():
    assert mt.grade("The answer is B", "B").status == "malformed"


@pytest.mark.parametrize("gold, pred", [("12", "12"), ("12", "012"), ("12", "-12"), ("12", "13"),
                                        ("12", "12.0"), ("0.5", "0.50"), ("0.5", "0.6"),
                                        ("5", "+5"), ("-3", "-3.0"), ("100", "1000")])
def test_fast_path_agrees_with_math_verify(gold, pred):
    fast = mt.fast_compare(gold, pred)
    assert fast is not None
    slow = mt.grade(f"\\boxed{{{pred}}}", gold, fast=False)
    assert slow.info["via"] == "math_verify"
    assert fast == slow.correct
    assert mt.grade(f"\\boxed{{{pred}}}", gold).info["via"] == "fast"


def test_fast_path_defers_when_unsure():
    assert mt.fast_compare("12", "12.0000001") is None  # within math-verify's rounding
    assert mt.fast_compare("\\frac{1}{2}", "0.5") is None
    assert mt.fast_compare("1,000", "1000") is None


def test_score_uses_the_example_answer():
    ex = {"id": "x", "prompt": "p", "demonstration": "", "answer": "\\frac{1}{2}", "meta": {}}
    assert mt.score(ex, "</think> \\boxed{0.5}").reward == 1.0


# ---------------------------------------------------------------------------
# loading


def _openr1_rows(n):
    return [{"data_source": "openr1",
             "prompt": [{"role": "system", "content": "You are a careful solver."},
                        {"role": "user", "content": f"What is {i}+1?"}],
             "target": [{"role": "assistant", "content": f"<think>{i}+1</think> \\boxed{{{i + 1}}}"}],
             "reward_model": {"style": "rule", "ground_truth": str(i + 1)}} for i in range(n)]


def test_load_train_jsonl_openr1_layout(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = _openr1_rows(3) + [{"prompt": "Compute 2*3.", "target": "\\boxed{6}",
                               "reward_model": {"ground_truth": "6"}}]
    write_jsonl(path, rows)
    exs = mt.load_train(str(path))
    assert len(exs) == 4
    first = exs[0]
    assert first["prompt"].startswith("What is 0+1?") and "\\boxed{}" in first["prompt"]
    assert "careful solver" not in first["prompt"] and first["meta"]["grader"] == "boxed"
    assert first["demonstration"] == "<think>0+1</think> \\boxed{1}"
    assert first["answer"] == "1"
    assert exs[3]["demonstration"] == "\\boxed{6}" and exs[3]["answer"] == "6"
    assert all(mt.score(e, e["demonstration"]).correct for e in exs)


def test_load_train_parquet_matches_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _openr1_rows(4)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    write_jsonl(tmp_path / "train.jsonl", rows)
    assert mt.load_train(str(tmp_path / "train.parquet")) == mt.load_train(str(tmp_path / "train.jsonl"))


def test_row_without_answer_is_a_one_line_error(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"prompt": "1+1?", "target": "2"}])
    with pytest.raises(ValueError, match=r"t\.jsonl, line 1: lacks"):  # the file and its 1-based line
        mt.load_train(str(tmp_path / "t.jsonl"))


@pytest.mark.parametrize("path", ["data/nope.parquet", "/tmp/definitely/missing.jsonl", ""])
def test_missing_train_file_names_the_key(path):
    with pytest.raises(ValueError, match="task.train_path") as e:
        mt.load_train(path)
    assert "\n" not in str(e.value)


def test_hub_id_without_network_fails_fast_in_one_line(monkeypatch):
    from huggingface_hub import constants

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match="hub is unreachable") as e:
        mt.load_train("Elliott/Openr1-Math-46k-8192")
    msg = str(e.value)
    assert "\n" not in msg and "task.train_path" in msg and "--set task.train_path=" in msg


# ---------------------------------------------------------------------------
# splits and eval sets


def _eval_dir(tmp_path):
    d = tmp_path / "evals"
    write_jsonl(d / "math500.jsonl", [{"problem": "Half of one?", "answer": "\\frac{1}{2}"}])
    write_jsonl(d / "arc_c.jsonl", [{"question": "Sky colour?", "answerKey": "b",
                                     "choices": {"text": ["red", "blue", "green"], "label": ["A", "B", "C"]}}])
    write_jsonl(d / "mmlu_pro.jsonl", [{"question": "2+2?", "options": ["3", "4"], "answer_index": 1,
                                        "answer": 1}])
    return d


def _tcfg(tmp_path, **kw):
    write_jsonl(tmp_path / "train.jsonl", _openr1_rows(10))
    return TaskConfig(name="math", format="full", train_path=str(tmp_path / "train.jsonl"), val_size=3, **kw)


def test_build_splits_holds_out_the_last_rows_and_loads_present_eval_sets(tmp_path):
    splits = mt.build_splits(_tcfg(tmp_path, eval_dir=str(_eval_dir(tmp_path))))
    assert set(splits) == {"train", "val", "math500", "arc_c", "mmlu_pro"} and set(splits) <= set(mt.SPLITS)
    assert [e["answer"] for e in splits["val"]] == ["8", "9", "10"]
    assert len(splits["train"]) == 7
    assert not {e["prompt"] for e in splits["train"]} & {e["prompt"] for e in splits["val"]}
    arc = splits["arc_c"][0]
    assert "A. red\nB. blue\nC. green" in arc["prompt"] and "\\boxed{" in arc["prompt"]
    assert arc["answer"] == "B" and arc["meta"]["ood"] is True
    assert mt.score(arc, "\\boxed{B}").correct and not mt.score(arc, "\\boxed{A}").correct
    assert splits["mmlu_pro"][0]["answer"] == "B"
    m = splits["math500"][0]
    assert m["meta"] == {"benchmark": "math500", "kind": "math", "ood": False, "k": 1, "grader": "boxed", "repeats": 1}
    assert mt.score(m, "\\boxed{0.5}").correct


def test_no_eval_dir_means_train_and_val_only(tmp_path):
    assert set(mt.build_splits(_tcfg(tmp_path))) == {"train", "val"}


def test_named_eval_sets_must_exist(tmp_path):
    tcfg = _tcfg(tmp_path, eval_dir=str(_eval_dir(tmp_path)), eval_sets=["MATH500", "aime24"])
    with pytest.raises(ValueError, match="'aime24' not found"):
        mt.build_splits(tcfg)
    tcfg.eval_sets = ["math500", "gsm8k"]
    with pytest.raises(ValueError, match="unknown gsm8k"):
        mt.build_splits(tcfg)
    tcfg.eval_sets = ["math500"]
    assert set(mt.build_splits(tcfg)) == {"train", "val", "math500"}


def test_avg_at_32_sets():
    assert {n for n, s in mt.EVAL_SETS.items() if s["default_k"] == 32} == {"aime24", "aime25", "amc23"}
    assert {n for n, s in mt.EVAL_SETS.items() if s["ood"]} == {"arc_c", "gpqa_diamond", "mmlu_pro"}


def test_val_size_must_leave_training_rows(tmp_path):
    tcfg = _tcfg(tmp_path)
    tcfg.val_size = 10
    with pytest.raises(ValueError, match="task.val_size"):
        mt.build_splits(tcfg)
