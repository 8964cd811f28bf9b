"""tiny-math: generated a+b*c splits, graded through math.grade."""

import pytest

from amft_cli.config import TaskConfig
from amft_cli.tasks import tiny_math as tm


def _problem(ex):
    return ex["meta"]["a"], ex["meta"]["b"], ex["meta"]["c"]


@pytest.fixture(scope="module")
def splits():
    return tm.build_splits(TaskConfig())  # defaults: train 20000, val 256, test 500, ood 500


def test_example_format_by_hand():
    ex = tm.make_example(12, 3, 4, id="x")
    assert ex["prompt"] == "12+3*4="
    assert ex["demonstration"] == "3*4=12,12+12=24 \\boxed{24}"
    assert ex["answer"] == "24" and ex["meta"] == {"a": 12, "b": 3, "c": 4}
    full = tm.make_example(12, 3, 4, id="x", format="full")
    assert "12+3*4" in full["prompt"] and "\\boxed{}" in full["prompt"]
    assert full["demonstration"] == ex["demonstration"]


def test_split_sizes_and_names(splits):
    assert tuple(splits) == tm.SPLITS
    assert [len(splits[s]) for s in tm.SPLITS] == [20000, 256, 500, 500]


def test_held_out_problems_never_in_train(splits):
    train = {_problem(e) for e in splits["train"]}
    val = {_problem(e) for e in splits["val"]}
    test = {_problem(e) for e in splits["test"]}
    assert len(val) == 256 and len(test) == 500  # distinct
    assert not train & val and not train & test and not val & test
    # train cycles through every remaining problem (20000 > 9244)
    assert len(train) == 100 * 10 * 10 - 256 - 500 == 9244


def test_deterministic_given_the_seed(splits):
    again = tm.build_splits(TaskConfig())
    assert again == splits
    other = tm.build_splits(TaskConfig(seed=7))
    assert [e["prompt"] for e in other["test"]] != [e["prompt"] for e in splits["test"]]


def test_train_size_does_not_move_the_held_out_sets(splits):
    small = tm.build_splits(TaskConfig(train_size=50))
    assert len(small["train"]) == 50
    for name in ("val", "test", "ood"):
        assert small[name] == splits[name]


def test_every_demonstration_scores_correct(splits):
    for name in tm.SPLITS:
        for ex in splits[name]:
            a, b, c = _problem(ex)
            assert ex["answer"] == str(a + b * c)
            s = tm.score(ex, ex["demonstration"])
            assert (s.reward, s.status) == (1.0, "correct"), ex


def test_wrong_number_scores_wrong_and_no_box_is_malformed():
    ex = tm.make_example(12, 3, 4, id="x")
    s = tm.score(ex, "3*4=12,12+12=25 \\boxed{25}")
    assert (s.reward, s.status) == (0.0, "wrong")
    s = tm.score(ex, "3*4=12,12+12=24")
    assert (s.reward, s.status) == (0.0, "malformed")
    assert tm.score(ex, "\\boxed{24} junk after").correct


def test_ood_has_three_digit_a(splits):
    ood = splits["ood"]
    assert all(100 <= e["meta"]["a"] <= 999 for e in ood)
    assert all(e["prompt"][:3].isdigit() and e["prompt"][3] == "+" for e in ood)
    assert len({_problem(e) for e in ood}) == 500  # distinct


def test_too_many_held_out_problems_is_a_one_line_error():
    with pytest.raises(ValueError, match="task.test_size \\+ task.val_size"):
        tm.build_splits(TaskConfig(test_size=9000, val_size=1000))
