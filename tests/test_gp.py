"""General Points: solver, verifier (both formats, hostile text) and splits."""

from __future__ import annotations

import json
import random
import time
from itertools import combinations_with_replacement, product

import pytest

from amft_cli.config import TaskConfig
from amft_cli.tasks import gp

HAND = [4, 7, 8, 8]       # (7-8/8)*4 = 24
ZERO_HAND = [4, 4, 8, 8]  # (4-4) can be a divisor


def compact(ranks=HAND, rule="id"):
    return gp.make_example(ranks, rule, "t", "compact")


def full(ranks=HAND, rule="id"):
    return gp.make_example(ranks, rule, "t", "full")


def as_json(formula: str) -> str:
    return json.dumps({"cards": ["4", "7", "8", "8"], "number": HAND, "formula": formula})


def assert_score(example, completion, status, reward):
    s = gp.score(example, completion)
    assert (s.status, s.reward) == (status, reward), s.info


def small_cfg(**kw) -> TaskConfig:
    base = dict(name="gp", train_size=300, val_size=40, test_size=60, ood_size=60, seed=7)
    return TaskConfig(**{**base, **kw})


# ---------------------------------------------------------------------------
# solver


def test_solver_known_hands():
    assert gp.solve([4, 7, 8, 8]) == ["7+4=11", "11-8=3", "8*3=24"]
    assert gp.solve([1, 1, 1, 1]) is None
    # needs a fraction: 8/(3-8/3)
    assert gp.solve([3, 3, 8, 8]) == ["8/3=8/3", "3-(8/3)=1/3", "8/(1/3)=24"]
    assert gp.solve([8, 8, 7, 4]) == gp.solve([4, 7, 8, 8])  # order-free


def test_solver_counts_match_the_known_totals():
    # the classic counts: 1362 of the 1820 multisets of 1..13, 566 of the 715 of 1..10
    hands13 = list(combinations_with_replacement(range(1, 14), 4))
    assert sum(gp.solve(list(h)) is not None for h in hands13) == 1362
    assert sum(gp.solve(list(h)) is not None for h in combinations_with_replacement(range(1, 11), 4)) == 566


def test_steps_to_formula_minimal_parentheses():
    assert gp.steps_to_formula(["8/8=1", "7-1=6", "6*4=24"]) == "(7-8/8)*4"
    assert gp.steps_to_formula(["8/3=8/3", "3-(8/3)=1/3", "8/(1/3)=24"]) == "8/(3-8/3)"
    assert gp.steps_to_formula(["6-2=4", "9-4=5", "5*5=25"]) == "(9-(6-2))*5"
    assert gp.steps_to_formula(["3+1=4", "4+2=6", "6*4=24"]) == "(3+1+2)*4"


def test_canonical_solutions_prefer_integer_steps():
    for hand in ([1, 2, 3, 4], [4, 7, 8, 8], [10, 10, 4, 4], [13, 11, 2, 1]):
        for step in gp.solve(hand):
            assert "(" not in step and "/" not in step.split("=")[1], step


# ---------------------------------------------------------------------------
# verifier: compact steps


def test_compact_correct_wrong_illegal():
    ex = compact()
    assert_score(ex, "8/8=1,7-1=6,6*4=24", "correct", 5.0)
    assert_score(ex, " 8 / 8 = 1 , 7-1=6,6*4=24\n", "correct", 5.0)
    assert_score(ex, "8+8=16,16+7=23,23+4=27", "wrong", -1.0)       # true steps, not 24
    assert_score(ex, "8+8=16,16+7=23,23+4=24", "wrong", -1.0)       # false claim 23+4=24
    # the reference's penalties add up: -2 for a number that is no card (or used too often),
    # another -2 for a card left unused
    assert_score(ex, "8*3=24,24*7=168,168-8=160", "illegal", -4.0)  # 3 is no card, 4 unused
    assert_score(ex, "8*8=64,64-8=56,56-4=52", "illegal", -4.0)     # third 8 reused, 7 unused
    assert_score(ex, "7-4=3,8*3=24", "illegal", -2.0)               # one 8 unused
    assert_score(ex, "7-4=3,8*3=24,24*8=192,192/8=24", "illegal", -2.0)  # one step too many
    assert gp.score(ex, "8*8=64,64-8=56,56-4=52").info["errors"] == ["8 not available", "you did not use 7"]


def test_compact_division_by_zero_is_wrong():
    s = gp.score(compact(ZERO_HAND), "4-4=0,8/0=0,8*0=0")
    assert (s.status, s.reward) == ("wrong", -1.0)
    assert "division by zero" in s.info["error"]


def test_compact_fraction_steps():
    ex = compact([3, 3, 8, 8])
    assert_score(ex, "8/3=8/3,3-(8/3)=1/3,8/(1/3)=24", "correct", 5.0)
    assert_score(ex, "8/3=16/6,3-(16/6)=2/6,8/(2/6)=24", "correct", 5.0)  # unreduced is still exact
    assert_score(ex, "8/3=3,3-3=0,8*0=24", "wrong", -1.0)


@pytest.mark.parametrize("text", ["", "   ", "garbage", "8/8=1,,6*4=24", "8/8=1/0,1-1=0,0*4=0",
                                  "8/1/3=24", "(7-8/8)*4"])
def test_compact_malformed(text):
    assert_score(compact(), text, "malformed", -3.0)


# ---------------------------------------------------------------------------
# verifier: full JSON


def test_full_correct_with_surrounding_text():
    ex = full()
    assert_score(ex, as_json("(7-8/8)*4"), "correct", 5.0)
    assert_score(ex, "Here goes.\n" + as_json("4*(7 - 8/8) = 24") + "\nDone.", "correct", 5.0)
    assert_score(ex, "{'cards': [], 'formula': '(7-8/8)*4'}", "correct", 5.0)  # single-quoted
    assert_score(ex, as_json("8*4") + " then " + as_json("(7-8/8)*4"), "correct", 5.0)  # last object


def test_full_wrong_and_illegal():
    ex = full()
    assert_score(ex, as_json("8+8+7+4"), "wrong", -1.0)
    assert_score(ex, as_json("(7-8/8)*4=25"), "wrong", -1.0)
    assert_score(ex, as_json("8*3*1*1"), "illegal", -4.0)      # 3, 1 no cards; 4, 7, 8 unused
    assert_score(ex, as_json("(8-8/8)*4"), "illegal", -4.0)    # 8 reused, 7 unused
    assert_score(ex, as_json("8*(7-4)"), "illegal", -2.0)      # one 8 unused
    assert_score(ex, as_json("8*(7-4)+8-4-4"), "illegal", -2.0)  # 4 reused, nothing unused
    assert_score(ex, as_json("24"), "illegal", -4.0)
    assert gp.score(ex, as_json("(8-8/8)*4")).info["errors"] == ["you used 8 more often than dealt",
                                                                "you did not use 7"]


def test_full_partial_solution():
    """+1 for a formula that uses every card and is a proper prefix of a solution: it stops
    before its closing parentheses, and closing them makes 24 (reference: PARTIAL_SOLUTION)."""
    ex = full()
    assert_score(ex, as_json("(7-8/8)*(4"), "partial", 1.0)
    assert_score(ex, as_json("((7-8/8)*4"), "partial", 1.0)
    assert_score(ex, as_json("(7-8/8"), "malformed", -3.0)       # 4 missing: more than parentheses
    assert_score(ex, as_json("(7+8/8)*(4"), "malformed", -3.0)   # closes to 32, not 24
    assert_score(ex, as_json("(8-8/8)*(4"), "malformed", -3.0)   # wrong numbers: no prefix of a solution


def test_float_eval_bug_is_not_copied():
    """The reference evaluates in floats, where 8/(3-8/3) is 23.99999999999999: hand 3,3,8,8 could
    never be solved there. Exact fractions here."""
    assert 8 / (3 - 8 / 3) != 24
    assert_score(full([3, 3, 8, 8]), json.dumps({"formula": "8/(3-8/3)"}), "correct", 5.0)


def test_full_division_by_zero_is_wrong():
    s = gp.score(full(ZERO_HAND), as_json("8/(4-4)+8"))
    assert (s.status, s.reward) == ("wrong", -1.0)
    assert "division by zero" in s.info["error"]
    # wrong numbers are judged before the division
    assert_score(full(ZERO_HAND), as_json("8/(4-4)+8+1"), "illegal", -2.0)  # 1 is no card


@pytest.mark.parametrize("text", ["not JSON", "", "garbage }", '{"formula": 24}', '{"cards": [4]}',
                                  '{"formula": "(7-8/8*4"}', '{"formula": "-4*(7-8/8)"}',
                                  '{"formula": "(7-8/8)*4=x"}', '{"formula": "7 8 8 4"}'])
def test_full_malformed(text):
    assert_score(full(), text, "malformed", -3.0)


# ---------------------------------------------------------------------------
# hostile text: bounded time, right status


NESTED = "(" * 10000 + "4" + ")" * 10000
HOSTILE = [
    ("compact", "9**9**9"), ("full", "9**9**9"), ("full", as_json("9**9**9")),
    ("compact", NESTED), ("full", NESTED), ("full", as_json(NESTED)),
    ("full", as_json("(" * 17 + "7" + ")" * 17 + "*4-8/8")),  # short, but deeper than MAX_DEPTH
    ("compact", "7" * 10**6), ("full", "7" * 10**6), ("full", as_json("7" * 10**6)),
    ("full", as_json("123456789012345678901234567890*0+24")),
    ("full", "{" * 30000 + "}" * 30000), ("full", '{"formula": ' + "[" * 400 + "]" * 400 + "}"),
]


@pytest.mark.parametrize("fmt,text", HOSTILE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(HOSTILE)])
def test_hostile_text_is_malformed_quickly(fmt, text):
    example = compact() if fmt == "compact" else full()
    start = time.perf_counter()
    s = gp.score(example, text)
    assert time.perf_counter() - start < 1.0
    assert (s.status, s.reward) == ("malformed", -3.0)


# ---------------------------------------------------------------------------
# splits


@pytest.mark.parametrize("fmt", ["compact", "full"])
def test_every_example_is_solvable_and_its_demonstration_is_correct(fmt):
    splits = gp.build_splits(small_cfg(format=fmt))
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "val": 40, "test": 60, "ood": 60}
    for split, examples in splits.items():
        for ex in examples:
            assert ex["meta"]["rule"] == ("ood" if split == "ood" else "id")
            assert gp.solve(ex["answer"]["values"]) is not None
            assert gp.score(ex, ex["demonstration"]).status == "correct", ex


def test_compact_prompts_and_responses_are_short():
    splits = gp.build_splits(small_cfg(train_size=2000))
    examples = [ex for split in splits.values() for ex in split]
    assert max(len(ex["prompt"]) for ex in examples) <= 32
    assert max(len(ex["demonstration"]) for ex in examples) <= 38
    assert compact([1, 3, 5, 11])["prompt"] == "A,3,5,J;JQK=10,10,10:"
    assert compact([1, 3, 5, 11], "ood")["prompt"] == "A,3,5,J;JQK=11,12,13:"
    assert gp.make_example([1, 3, 5, 11], "mix", "t", "compact", (13, 10, 12))["prompt"] == "A,3,5,J;JQK=13,10,12:"


def test_demonstrations_follow_the_canonical_solution():
    assert compact(HAND)["demonstration"] == "7+4=11,11-8=3,8*3=24"
    demo = json.loads(full([8, 4, 7, 8])["demonstration"])
    assert demo == {"cards": ["8", "4", "7", "8"], "number": [8, 4, 7, 8], "formula": "8*(7+4-8)"}


def test_random_text_never_crashes_the_verifier():
    rng = random.Random(0)
    alphabet = '0123456789+-*/()=, {}"\'formula:\n'
    for fmt, example in (("compact", compact()), ("full", full())):
        for _ in range(2000):
            body = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            text = as_json(body) if fmt == "full" and rng.random() < 0.5 else body
            s = gp.score(example, text)
            expected = -2.0 * len(s.info.get("errors", ())) if s.status == "illegal" else gp.REWARDS[s.status]
            assert s.reward == expected and expected != 0


def test_rules_map_face_cards():
    ex_id, ex_ood = full([11, 12, 13, 6]), full([11, 12, 13, 6], "ood")
    assert ex_id["meta"] == {"rule": "id", "cards": ["J", "Q", "K", "6"], "values": [10, 10, 10, 6]}
    assert ex_ood["meta"]["values"] == [11, 12, 13, 6]
    assert ex_ood["answer"] == {"cards": ["J", "Q", "K", "6"], "values": [11, 12, 13, 6], "target": 24,
                                "format": "full"}
    assert "11, 12 and 13" in ex_ood["prompt"] and "count as 10" in ex_id["prompt"]
    with pytest.raises(ValueError, match="cannot make 24"):
        gp.make_example([11, 12, 13, 1], "id", "t")  # 10,10,10,1 has no solution; 11,12,13,1 has


def test_splits_are_deterministic_by_seed():
    a, b = gp.build_splits(small_cfg()), gp.build_splits(small_cfg())
    assert a == b
    c = gp.build_splits(small_cfg(seed=8))
    assert [e["prompt"] for e in c["test"]] != [e["prompt"] for e in a["test"]]
    # the train size does not shift the held-out splits
    assert gp.build_splits(small_cfg(train_size=10))["test"] == a["test"]


def test_test_and_val_hands_never_in_train():
    splits = gp.build_splits(small_cfg(train_size=5000, val_size=100, test_size=250))

    def numbers(split):  # ID numbers as multisets: stricter than the card faces
        return {tuple(sorted(ex["meta"]["values"])) for ex in splits[split]}

    assert numbers("test").isdisjoint(numbers("train"))
    assert numbers("val").isdisjoint(numbers("train"))
    assert numbers("val").isdisjoint(numbers("test"))
    test_hands = [tuple(sorted(ex["meta"]["cards"])) for ex in splits["test"]]
    assert len(set(test_hands)) == len(test_hands)  # distinct while the held-out pool lasts


def test_ood_hands_hold_a_face_card_valued_11_to_13():
    for ex in gp.build_splits(small_cfg())["ood"]:
        faces = {c: v for c, v in zip(ex["meta"]["cards"], ex["meta"]["values"]) if c in "JQK"}
        assert faces, ex["meta"]
        assert all(v == {"J": 11, "Q": 12, "K": 13}[c] for c, v in faces.items())


def test_deal_follows_the_reference_distribution():
    """OOD: 3 uniform ranks + 1 forced J/Q/K, redealt until solvable under 11/12/13
    (GeneralPointEnv_oneline._generate_cards): 1.62 face cards per hand, >= 2 in 50.4%."""
    rng = random.Random(0)
    hands = [gp.deal(rng, True, gp.FACE_VALUES["ood"]) for _ in range(10_000)]
    faces = [sum(r >= 11 for r in h) for h in hands]
    assert abs(sum(faces) / len(faces) - 1.62) <= 0.02
    assert abs(sum(f >= 2 for f in faces) / len(faces) - 0.504) <= 0.02
    assert all(gp.solve(list(h)) is not None for h in hands[:200])  # ranks are the OOD values
    # ID: 4 uniform ranks redealt until solvable with J/Q/K = 10; exact mean by enumerating all 13^4 deals
    solvable = [d for d in product(range(1, 14), repeat=4) if gp.solvable([min(r, 10) for r in d])]
    exact = sum(sum(r >= 11 for r in d) for d in solvable) / len(solvable)
    rng = random.Random(0)
    id_faces = [sum(r >= 11 for r in gp.deal(rng, False, gp.FACE_VALUES["id"])) for _ in range(10_000)]
    assert abs(sum(id_faces) / len(id_faces) - exact) <= 0.02 and 0.7 < exact < 0.8


def test_ood_split_is_dealt_like_the_reference():
    ood = gp.build_splits(small_cfg(ood_size=2000))["ood"]
    faces = [sum(c in "JQK" for c in ex["meta"]["cards"]) for ex in ood]
    assert abs(sum(faces) / len(faces) - 1.62) <= 0.05


def test_pretrain_mix_states_the_face_values_it_uses():
    splits = gp.build_splits(small_cfg(pretrain_size=3000, val_size=100, test_size=250))
    assert "pretrain" not in gp.build_splits(small_cfg())  # only when asked for
    mix = splits["pretrain"]
    held_out = {tuple(sorted(ex["meta"]["values"])) for split in ("val", "test") for ex in splits[split]}
    seen_faces = set()
    for ex in mix:
        faces = tuple(ex["meta"]["faces"])
        seen_faces.add(faces)
        assert ex["prompt"].endswith(f";JQK={faces[0]},{faces[1]},{faces[2]}:")
        for card, value in zip(ex["meta"]["cards"], ex["meta"]["values"]):
            assert value == (faces["JQK".index(card)] if card in "JQK" else gp.FACES.index(card) + 1)
        assert tuple(sorted(ex["meta"]["values"])) not in held_out  # val/test numbers stay unseen
        assert gp.score(ex, ex["demonstration"]).status == "correct"
    assert (11, 12, 13) not in seen_faces and len(seen_faces) == 63  # every other rule, not the OOD one
    assert 0.9 <= sum(sum(c in "JQK" for c in ex["meta"]["cards"]) for ex in mix) / len(mix) <= 1.5
