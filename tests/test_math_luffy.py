"""LUFFY's published eval files as they are, its prompt and its reward.

Every file here is built in LUFFY's exact schema (data_source; prompt as a list of
{role, content}; ability; reward_model {ground_truth, style}; extra_info {index,
split}; pandas' __index_level_0__; rows repeated) with MADE-UP problems.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from math_verify import parse, verify

from amft_cli.config import TaskConfig
from amft_cli.evaluate import evaluate_split
from amft_cli.tasks import math as mt
from amft_cli.tasks.math_grader import grade

SYSTEM = "Think first inside <think> </think>, then give the final answer in \\boxed{}."  # stands for LUFFY's
GPQA_HEAD = ("Answer the following multiple choice question. The last line of your response should be "
             "'ANSWER: $LETTER' where LETTER is one of ABCD.\n\n")

# data_source -> [(user message, gold, repeats)], in file order
ALL = {
    "math": [("What is 3 + 4?", "7", 1), ("Simplify $\\frac{6}{8}$.", "\\frac{3}{4}", 1),
             ("Solve $2x = 10$ for $x$.", "5", 1)],
    "aime": [("Find the remainder when 1000 is divided by 7.", "6", 4), ("What is 4 times 3?", "12", 4)],
    "aime25": [("Compute 11 squared.", "121", 4)],
    "minerva": [("A cart covers 60 m in 1.5 s. Its speed in m/s?", "40", 1)],
    "olympiad_bench": [("Find the positive x with $x^2 = 16$.", "$4$", 1)],
}
AMC = [("What is 15% of 40?", "6.0"), ("Half of 9?", "4.5")]  # interleaved: p1 p2 p1 p2 p1 p2
ARC = [("A ball is dropped. Which force pulls it down?\n\nA) friction\nB) magnetism\nC) gravity\nD) tension\n", "C")]
GPQA = [(GPQA_HEAD + "Which gas is most abundant in air?\n\nA) nitrogen\nB) oxygen\nC) argon\nD) helium", "A")]


def luffy_row(source: str, user: str, gold: str, index: int) -> dict:
    return {"data_source": source,
            "prompt": [{"content": SYSTEM, "role": "system"}, {"content": user, "role": "user"}],
            "ability": "math", "reward_model": {"ground_truth": gold, "style": "rule"},
            "extra_info": {"index": index, "split": "default"}}


def write_luffy_files(folder: Path) -> Path:
    rows = [luffy_row(src, q, g, i) for src, items in ALL.items() for i, (q, g, r) in enumerate(items)
            for _ in range(r)]
    rows += [luffy_row("amc", q, g, i) for _ in range(3) for i, (q, g) in enumerate(AMC)]
    for n, row in enumerate(rows):
        row["__index_level_0__"] = 1000 + n
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "valid.all.parquet")
    pq.write_table(pa.Table.from_pylist([luffy_row("arc_c", q, g, i) for i, (q, g) in enumerate(ARC)]),
                   folder / "valid.arc_c.parquet")
    pq.write_table(pa.Table.from_pylist([luffy_row("gpqa", q, g, i) for i, (q, g) in enumerate(GPQA)]),
                   folder / "valid.gpqa.parquet")
    return folder


@pytest.fixture
def luffy_dir(tmp_path) -> Path:
    return write_luffy_files(tmp_path / "luffy")


def tcfg(eval_dir, **kw) -> TaskConfig:
    return TaskConfig(name="math", format="full", eval_dir=str(eval_dir), **{"prompt": "file", "grader": "luffy", **kw})


def user_of(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


# ---------------------------------------------------------------------------
# reading the files


def test_the_combined_file_is_split_by_data_source_and_repeats_collapse(luffy_dir):
    splits = mt.build_eval_splits(tcfg(luffy_dir))
    assert list(splits) == ["math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench", "arc_c",
                            "gpqa_diamond"]
    sizes = {name: len(examples) for name, examples in splits.items()}
    assert sizes == {"math500": 3, "aime24": 2, "aime25": 1, "amc23": 2, "minerva": 1, "olympiadbench": 1,
                     "arc_c": 1, "gpqa_diamond": 1}
    assert [user_of(e["prompt"]) for e in splits["amc23"]] == [q for q, _ in AMC]  # first occurrence order
    assert [e["meta"]["repeats"] for e in splits["aime24"]] == [4, 4]
    assert [e["meta"]["repeats"] for e in splits["amc23"]] == [3, 3]
    assert [e["answer"] for e in splits["aime24"]] == ["6", "12"]
    assert splits["olympiadbench"][0]["answer"] == "4"
    assert {e["meta"]["k"] for e in splits["aime24"] + splits["aime25"] + splits["amc23"]} == {32}
    assert splits["arc_c"][0]["meta"]["ood"] and splits["gpqa_diamond"][0]["answer"] == "A"
    assert not splits["math500"][0]["meta"]["ood"]


def test_the_prompt_the_data_carries_is_kept(luffy_dir):
    example = mt.build_eval_splits(tcfg(luffy_dir))["aime24"][1]
    assert example["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 4 times 3?"}]
    assert example["meta"]["grader"] == "luffy"


def test_our_instruction_prompt_and_grader_are_knobs(luffy_dir):
    splits = mt.build_eval_splits(tcfg(luffy_dir, prompt="instruction", grader="boxed"))
    assert splits["aime24"][1]["prompt"] == "What is 4 times 3?\n\n" + mt.MATH_INSTRUCTION
    arc = splits["arc_c"][0]["prompt"]
    assert arc.startswith(ARC[0][0].strip()) and arc.endswith(mt.MC_INSTRUCTION) and SYSTEM not in arc
    assert splits["aime24"][1]["meta"]["grader"] == "boxed"


def test_named_sets_missing_from_the_folder_are_one_line_errors(luffy_dir):
    with pytest.raises(ValueError, match="'mmlu_pro' not found") as e:
        mt.build_eval_splits(tcfg(luffy_dir, eval_sets=["aime24", "mmlu_pro"]))
    assert "'mmlu_pro' in a valid.*.parquet" in str(e.value) and "\n" not in str(e.value)
    assert list(mt.build_eval_splits(tcfg(luffy_dir, eval_sets=["AIME24"]))) == ["aime24"]
    with pytest.raises(ValueError, match="no eval sets found"):
        mt.build_eval_splits(tcfg(luffy_dir.parent / "empty"))


def test_eval_only_needs_no_training_file(luffy_dir):
    cfg = tcfg(luffy_dir, train_path="")
    assert "aime24" in mt.build_eval_splits(cfg)
    with pytest.raises(ValueError, match="task.train_path is empty.*amft prepare --eval-only"):
        mt.build_splits(cfg)


# ---------------------------------------------------------------------------
# scoring: avg@k over distinct problems, letters


def test_avg_at_k_counts_distinct_problems(luffy_dir):
    aime = mt.build_eval_splits(tcfg(luffy_dir))["aime24"]
    answers = {"Find the remainder when 1000 is divided by 7.": ["ok</think> \\boxed{6}"] * 3 + ["ok</think> 7"],
               "What is 4 times 3?": ["ok</think> The answer is 12."] + ["ok</think> 11"] * 3}

    def generate(prompts, n, greedy):
        return [answers[user_of(p)][:1] if greedy else answers[user_of(p)][:n] for p in prompts]

    metrics, rows = evaluate_split(mt, aime, generate, k=4)
    assert metrics["n_examples"] == 2 and metrics["k"] == 4
    assert metrics["avg@k"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert metrics["pass@k"] == 1.0 and metrics["greedy_accuracy"] == 1.0
    assert len(rows) == 2 * 4 + 2


@pytest.mark.parametrize("response, status", [
    ("Gravity pulls.</think>\nThe answer is \\boxed{C}.", "correct"),
    ("Gravity pulls.</think>\nThe answer is \\boxed{\\text{(C)}}.", "correct"),
    ("Gravity pulls.</think>\nThe answer is (C).", "correct"),
    ("Gravity pulls.</think>\nANSWER: C", "correct"),
    ("Friction.</think>\nThe answer is \\boxed{A}.", "wrong"),
    ("Friction.</think>\nANSWER: A", "wrong"),
    ("Gravity, so C.", "malformed"),  # no </think>
    ("Gravity.</think>\nIt is gravity.", "malformed"),  # no letter
    ("Gravity.</think>\nAnswer: I think gravity.", "malformed"),  # "I" is a word here, not an option
    ("Gravity.</think>\nThe force is \\boxed{9.8}.\nANSWER: C", "correct"),  # a box without a letter
    ("Gravity.</think>\nThe answer is **C**\nbecause it pulls.", "correct"),
])
def test_multiple_choice_is_graded_by_letter(luffy_dir, response, status):
    arc = mt.build_eval_splits(tcfg(luffy_dir))["arc_c"][0]
    score = mt.score(arc, response)
    assert score.status == status and score.reward == float(status == "correct")


# ---------------------------------------------------------------------------
# LUFFY's reward: the nine responses on which it and our boxed rule disagree


def luffy_reference(response: str, gold: str) -> float:
    """LUFFY's rule written out from its code (main-thread math-verify), to check ours against."""
    parts = ("<think>\n" + response).split("</think>")
    if len(parts) < 2:
        return 0.0
    return float(verify(parse("$" + gold + "$"), parse(parts[1])))


DISAGREE = [  # (response, gold, LUFFY's reward, our boxed rule's reward)
    ("Adding the parts gives 42.</think>\nThe answer is 42.", "42", 1.0, 0.0),       # unboxed
    ("Six times three.</think>\nSo we get $18$.", "18", 1.0, 0.0),                    # unboxed
    ("Isolate the unknown.</think>\nTherefore x = 7", "7", 1.0, 0.0),                 # unboxed
    ("Divide both.</think>\nThe ratio is 3/4", "\\frac{3}{4}", 1.0, 0.0),             # unboxed
    ("I get \\boxed{5} here.</think>\nIt is 5.", "5", 1.0, 0.0),                       # box only in the thinking
    ("Check it.</think>\nFinal: $\\fbox{5}$", "5", 1.0, 0.0),                          # \fbox
    ("Check it.</think>\nFinal: \\boxed 5", "5", 1.0, 0.0),                            # \boxed without braces
    ("Let me compute: 2+3 = \\boxed{5}", "5", 0.0, 1.0),                               # no </think>
    ("Try.</think> first \\boxed{3} </think> final \\boxed{4}", "4", 0.0, 1.0),        # two </think>
]
AGREE = [("Sum.</think>\nThe answer is \\boxed{5}.", "5", 1.0, 1.0),
         ("Sum.</think>\nThe answer is \\boxed{6}.", "5", 0.0, 0.0)]


@pytest.mark.parametrize("response, gold, luffy, boxed", DISAGREE + AGREE)
def test_luffy_rule_against_its_reference_and_ours(response, gold, luffy, boxed):
    assert luffy_reference(response, gold) == luffy  # the hand-set value is LUFFY's
    assert grade(response, gold, rule="luffy").reward == luffy
    assert grade(response, gold, rule="boxed").reward == boxed


def test_the_luffy_rule_reaches_score_through_the_example(luffy_dir):
    example = mt.build_eval_splits(tcfg(luffy_dir))["math500"][0]  # gold 7
    assert mt.score(example, "3 plus 4.</think>\nThe answer is 7.").correct
    assert not mt.score(example, "3 plus 4 is \\boxed{7}").correct  # no </think>: LUFFY gives 0
    boxed = mt.build_eval_splits(tcfg(luffy_dir, grader="boxed"))["math500"][0]
    assert mt.score(boxed, "3 plus 4 is \\boxed{7}").correct


# ---------------------------------------------------------------------------
# the whole path: amft eval on LUFFY's layout, no training file


def tiny_chat_model(folder: Path) -> Path:
    """A tiny random model whose tokenizer has a chat template (system messages included)."""
    from amft_cli.config import ModelConfig
    from amft_cli.model import build_tiny_model
    from transformers import AutoTokenizer

    mcfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2)
    build_tiny_model(mcfg, [SYSTEM], folder, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    tokenizer.save_pretrained(folder)
    return folder


def test_amft_eval_on_luffy_files_without_a_training_set(luffy_dir, tmp_path):
    model = tiny_chat_model(tmp_path / "model")
    args = ["eval", "--model", str(model), "--preset", "math-qwen2.5", "--ood", "--limit", "1", "--greedy",
            "--max-new-tokens", "3", "--set", f"task.eval_dir={luffy_dir}", "--set", f"task.data_dir={tmp_path / 'data'}",
            "--set", "model.dtype=float32", "--set", "model.device=cpu", "--set", "model.gradient_checkpointing=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(Path(sys.executable).parent / "amft"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "eval-math-qwen2.5-model" / "eval"  # never inside the model folder
    sets = ["math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench", "arc_c", "gpqa_diamond"]
    records = {s: json.loads((out / f"{s}.json").read_text()) for s in sets}
    assert {s: r["set_size"] for s, r in records.items()} == {"math500": 3, "aime24": 2, "aime25": 1, "amc23": 2,
                                                              "minerva": 1, "olympiadbench": 1, "arc_c": 1,
                                                              "gpqa_diamond": 1}
    assert all(r["metrics"]["n_examples"] == 1 for r in records.values())
    assert records["arc_c"]["metrics"]["ood"] and not records["aime24"]["metrics"]["ood"]
    sample = json.loads((out / "aime24.samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"][0] == {"role": "system", "content": SYSTEM}
    assert not (tmp_path / "data" / "train.jsonl").exists()


def test_prepared_splits_follow_the_task_config(luffy_dir, tmp_path):
    from amft_cli.config import Config
    from amft_cli.data import prepare, split_path
    from amft_cli.tasks.base import read_jsonl

    cfg = Config()
    cfg.task = tcfg(luffy_dir, data_dir=str(tmp_path / "data"))
    sizes = prepare(cfg, log=lambda m: None, eval_only=True)
    assert sizes["aime24"] == 2 and "train" not in sizes
    assert prepare(cfg, log=lambda m: None, eval_only=True) == {}  # current: nothing rebuilt
    cfg.task.grader = "boxed"
    assert prepare(cfg, log=lambda m: None, eval_only=True)["aime24"] == 2  # stale: rebuilt
    assert read_jsonl(split_path(cfg, "aime24"))[0]["meta"]["grader"] == "boxed"
    cfg.task.eval_sets = ["aime24"]
    prepare(cfg, log=lambda m: None, eval_only=True)
    assert not split_path(cfg, "math500").exists()  # no split of the older build stays behind
