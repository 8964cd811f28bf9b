"""amft compare: two evals paired problem by problem (amft_cli/compare.py). Hand-computed cases on
written sample files, then the rows `amft eval` really writes, edited so B solves more."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

from amft_cli import compare
from amft_cli.compare import CompareError
from amft_runs import flags, one_line_error, tiny_sets


def test_mcnemar_exact_p_values():
    assert compare.mcnemar_p(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 2 · P(Bin(12, ½) ≤ 2)
    assert compare.mcnemar_p(10, 2) == compare.mcnemar_p(2, 10)
    assert compare.mcnemar_p(0, 6) == pytest.approx(2 / 64)
    assert compare.mcnemar_p(5, 5) == 1.0 and compare.mcnemar_p(0, 0) == 1.0


def write_eval(folder: Path, split: str, greedy: dict, samples: dict, temperature=0.6, metrics=None,
               task=None, checkpoint=None) -> None:
    """<split>.samples.jsonl and <split>.json as `amft eval` writes them (only the fields read)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "mode": "greedy", "sample": 0, "status": "correct" if ok else "wrong"} for i, ok in greedy.items()]
    rows += [{"id": i, "mode": "sample", "sample": n, "status": "correct" if ok else "wrong"}
             for i, oks in samples.items() for n, ok in enumerate(oks)]
    (folder / f"{split}.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"temperature": temperature, "top_p": 1.0, "max_new_tokens": 32, "k": 2, "limit": 0, "greedy_only": False}
    (folder / f"{split}.json").write_text(json.dumps({"split": split, "settings": settings, "verifier": "v1",
                                                      "set_size": len(greedy), "metrics": metrics or {},
                                                      **({"task": task} if task else {}),
                                                      **({"checkpoint": checkpoint} if checkpoint else {})}))


def test_each_problem_is_paired_and_the_difference_is_b_minus_a(tmp_path):
    ids = [f"p{i}" for i in range(10)]
    a_greedy = {i: n < 6 for n, i in enumerate(ids)}                       # p0-p5: 6 of 10
    b_greedy = {**{i: n < 3 or n >= 6 for n, i in enumerate(ids)}, "p10": True}  # p0-p2, p6-p9: 7; p10 B's only
    a_samples = {i: [n == 0, n <= 1] for n, i in enumerate(ids)}           # p0 2/2, p1 1/2, the rest 0
    b_samples = {i: [False, False] for i in ids}
    write_eval(tmp_path / "A" / "eval", "test", a_greedy, a_samples)
    write_eval(tmp_path / "B" / "eval", "test", b_greedy, b_samples, temperature=1.0)
    write_eval(tmp_path / "A" / "eval", "ood", {"q": False}, {}, metrics={"ood": True})
    write_eval(tmp_path / "B" / "eval", "ood", {"q": True}, {}, metrics={"ood": True})

    result = compare.compare(tmp_path / "A", tmp_path / "B")
    assert list(result["splits"]) == ["test", "ood"]  # ID first
    test = result["splits"]["test"]
    assert test["n"] == 10 and test["only_in_one"] == 1  # p10 is left out
    g = test["greedy"]
    assert (g["a"], g["b"], g["only_a"], g["only_b"]) == (0.6, 0.7, 3, 4)
    # differences: three −1, four +1, three 0: mean 0.1, s = √(6.9 / 9), half = t(0.975, 9) · s / √10
    assert g["b_minus_a"]["mean"] == pytest.approx(0.1)
    assert g["b_minus_a"]["half"] == pytest.approx(2.262157 * math.sqrt(6.9 / 9) / math.sqrt(10), rel=1e-4)
    assert g["p_mcnemar"] == compare.mcnemar_p(3, 4) == 1.0
    assert test["avg@k"]["a"] == pytest.approx(0.15) and test["avg@k"]["b_minus_a"]["mean"] == pytest.approx(-0.15)
    assert test["differs"] == ["temperature 0.6 vs 1.0", "set_size 10 vs 11"] and result["splits"]["ood"]["differs"] == []
    assert result["splits"]["ood"]["ood"] and "avg@k" not in result["splits"]["ood"]

    swapped = compare.compare(tmp_path / "B" / "eval", tmp_path / "A" / "eval")["splits"]["test"]["greedy"]
    assert swapped["b_minus_a"]["mean"] == pytest.approx(-0.1) and (swapped["only_a"], swapped["only_b"]) == (4, 3)


def test_an_eval_folder_mixing_checkpoints_is_named(tmp_path):
    """`amft eval --step 4` after an eval of step 5 rewrites only the splits it scores: such a folder's
    rows are not one model's, and compare says so (for A and B alike)."""
    for side in "AB":
        write_eval(tmp_path / side, "test", {"p": True}, {}, checkpoint="runs/x/checkpoints/step-4")
        write_eval(tmp_path / side, "ood", {"q": True}, {}, metrics={"ood": True},
                   checkpoint=f"runs/x/checkpoints/step-{4 if side == 'A' else 5}")
    assert compare.compare(tmp_path / "A", tmp_path / "B")["mixed_checkpoints"] == [
        "B's splits come from different checkpoints: ood step-5, test step-4"]
    assert compare.compare(tmp_path / "A", tmp_path / "A")["mixed_checkpoints"] == []


def test_route_scored_splits_are_not_paired_and_bad_input_is_named(tmp_path):
    write_eval(tmp_path / "A", "test", {"r": True}, {}, metrics={"route_success": 1.0})
    write_eval(tmp_path / "B", "test", {"r": True}, {}, metrics={"route_success": 1.0})
    assert "skipped" in compare.compare(tmp_path / "A", tmp_path / "B")["splits"]["test"]
    with pytest.raises(CompareError, match=r"C: no such folder \(expected a run directory or an eval folder\)"):
        compare.compare(tmp_path / "A", tmp_path / "C")
    (tmp_path / "C").mkdir()
    with pytest.raises(CompareError, match=r"C: no <split>.samples.jsonl here or under eval/"):
        compare.compare(tmp_path / "A", tmp_path / "C")
    # another task's evaluation, or the same split name over other problems: nothing to pair
    write_eval(tmp_path / "M", "test", {"p": True}, {}, task="tiny-math")
    write_eval(tmp_path / "G", "test", {"p": True}, {}, task="gp")
    with pytest.raises(CompareError, match=r"test of task tiny-math vs of task gp: not the same problems"):
        compare.compare(tmp_path / "M", tmp_path / "G")
    write_eval(tmp_path / "G2", "test", {"h1": True, "h2": False}, {}, task="tiny-math")
    with pytest.raises(CompareError, match=r"no problem id in common \(test\): evaluated on different test sets"):
        compare.compare(tmp_path / "M", tmp_path / "G2")
    write_eval(tmp_path / "D", "ood", {"r": True}, {})
    with pytest.raises(CompareError, match=r"no split evaluated in both \(each holds test.samples.jsonl / "
                                           r"ood.samples.jsonl\)"):
        compare.compare(tmp_path / "A", tmp_path / "D")
    write_eval(tmp_path / "E", "ood", {"r": True}, {})
    with open(tmp_path / "E" / "ood.samples.jsonl", "a") as f:
        f.write('{"id": "r", "status": "correct"}\n')
    with pytest.raises(CompareError, match=r"E/ood.samples.jsonl:2: expected a JSON row with id, mode"):
        compare.compare(tmp_path / "D", tmp_path / "E")


def test_amft_compare_on_what_amft_eval_writes(amft, tiny_data, tmp_path):
    """Two real evals of the tiny model; B's rows then edited so that B's greedy answer solves the
    first 3 problems: `amft compare` reads A's accuracy as eval reported it, and +3 problems for B."""
    sets = flags(tiny_sets(tiny_data))
    for name in ("A", "B"):
        done = amft("eval", "--model", str(tiny_data / "model"), "--preset", "tiny-math", *sets, "--k", "2",
                    "--out", str(tmp_path / name))
        assert done.returncode == 0, done.stderr[-3000:]
    reported = json.loads((tmp_path / "A" / "test.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "B" / "test.samples.jsonl").read_text().splitlines()]
    greedy_ids = [r["id"] for r in rows if r["mode"] == "greedy"]
    flipped = [i for i in greedy_ids if not any(r["id"] == i and r["mode"] == "greedy" and r["status"] == "correct"
                                                 for r in rows)][:3]
    for r in rows:
        if r["mode"] == "greedy" and r["id"] in flipped:
            r["status"] = "correct"
    samples = tmp_path / "B" / "test.samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # B's scores name the samples they scored: edited samples (or a kill between writing the two) are refused
    with pytest.raises(CompareError, match=r"test.samples.jsonl: not the samples test.json scored"):
        compare.compare(tmp_path / "A", tmp_path / "B")
    record = json.loads((tmp_path / "B" / "test.json").read_text())
    record["samples_sha256"] = hashlib.sha256(samples.read_bytes()).hexdigest()  # as if eval had scored them
    (tmp_path / "B" / "test.json").write_text(json.dumps(record))

    result = compare.compare(tmp_path / "A", tmp_path / "B")["splits"]["test"]
    n = len(greedy_ids)
    assert len(flipped) == 3 and result["n"] == n == 8
    assert result["greedy"]["a"] == pytest.approx(reported["greedy_accuracy"])
    assert result["avg@k"]["a"] == pytest.approx(reported["avg@k"])
    assert result["greedy"]["b_minus_a"]["mean"] == pytest.approx(3 / n) and result["greedy"]["only_b"] == 3
    assert result["differs"] == []

    shown = amft("compare", str(tmp_path / "A"), str(tmp_path / "B"))
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert f"+{300 / n:.1f}±" in shown.stdout and " 0/3 " in shown.stdout  # A only / B only
    as_json = amft("compare", str(tmp_path / "A"), str(tmp_path / "B"), "--json")
    assert json.loads(as_json.stdout)["splits"]["test"]["greedy"]["only_b"] == 3
    shutil.rmtree(tmp_path / "B")
    one_line_error(amft("compare", str(tmp_path / "A"), str(tmp_path / "B")), f"{tmp_path / 'B'}: no such folder")
