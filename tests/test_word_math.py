"""word-math (the smol-math task): distinct splits, worked demonstrations that add up, the math grader."""

import re
from types import SimpleNamespace

from amft_cli.tasks import word_math

TCFG = SimpleNamespace(seed=3, train_size=300, val_size=20, test_size=40, ood_size=40)


def _replay(example: dict) -> int:
    """The answer recomputed from the problem's own sentences (not from the demonstration)."""
    text = example["meta"]["problem"]
    boxes = re.search(r"has (\d+) boxes with (\d+) ", text)
    value = int(boxes[1]) * int(boxes[2]) if boxes else int(re.search(r"has (\d+) ", text)[1])
    for verb, n in re.findall(r"(buys|finds|wins|gives him|gives her|gives away|gives|loses|sells) (\d+)", text):
        sign = 1 if verb in ("buys", "finds", "wins", "gives him", "gives her") else -1
        value += sign * int(n)
    return value


def test_splits_are_disjoint_and_ood_takes_more_steps():
    splits = word_math.build_splits(TCFG)
    prompts = {s: {ex["prompt"] for ex in splits[s]} for s in ("train", "val", "test")}
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["val"])
    assert {ex["meta"]["ops"] for ex in splits["test"]} == {1, 2}
    assert {ex["meta"]["ops"] for ex in splits["ood"]} == {3, 4}
    assert word_math.build_splits(TCFG)["test"] == splits["test"]  # deterministic


def test_demonstrations_are_worked_and_graded_correct():
    splits = word_math.build_splits(TCFG)
    for ex in splits["train"][:100] + splits["ood"]:
        assert int(ex["answer"]) == _replay(ex) >= 0
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", ex["demonstration"])
        assert len(steps) == ex["meta"]["ops"]
        assert word_math.score(ex, ex["demonstration"]).correct
        assert ex["prompt"].endswith("write your final answer inside \\boxed{}.")


def test_a_hand_made_problem():
    ex = {"answer": "35"}
    assert word_math.score(ex, "6 * 5 = 30. 30 + 5 = 35. The answer is \\boxed{35}.").reward == 1.0
    assert word_math.score(ex, "The answer is \\boxed{36}.").status == "wrong"
    assert word_math.score(ex, "6 * 5 = 30, 30 + 5 = 35").status == "malformed"
