"""The machine-readable side of `amft`: headline blocks, scope means, --fail-under parsing and gating,
run totals. Values are hand-computed."""

from __future__ import annotations

import math

import pytest

from amft_cli import report
from amft_cli.report import ThresholdError, check_plan, eval_blocks, gate, parse_threshold


def split_metrics(n, k, greedy, avg, passk, reward, ood, **extra):
    """The shape evaluate.summarize / run_eval give one split."""
    return {"n_examples": n, "k": k, "greedy_accuracy": greedy, "avg@k": avg, "pass@1": avg, "pass@k": passk,
            "reward_mean": reward, "status_counts": {"correct": 1}, "greedy_reward_mean": 0.5, "ood": ood, **extra}


def test_headline_renames_and_keeps_only_headline_metrics():
    block = report.headline(split_metrics(20, 4, 0.25, 0.5, 0.75, -1.0, False))
    assert block == {"n": 20, "k": 4, "greedy": 0.25, "avg@k": 0.5, "pass@k": 0.75, "reward": -1.0}


def test_greedy_only_split_has_k_zero_and_no_sampled_metrics():
    block = report.headline({"n_examples": 7, "greedy_accuracy": 3 / 7, "greedy_reward_mean": 1.0})
    assert block == {"n": 7, "k": 0, "greedy": 3 / 7}


def test_scopes_average_sets_unweighted_and_split_id_from_ood():
    results = {"math500": split_metrics(500, 8, 0.5, 0.4, 0.8, 1.0, False),
               "aime24": split_metrics(30, 8, 0.1, 0.2, 0.4, 0.0, False),
               "gpqa": split_metrics(198, 4, 0.3, 0.25, 0.6, 0.5, True, step_accuracy=0.9)}
    blocks = eval_blocks(results)
    id_scope = blocks["metrics"]["id"]
    assert id_scope["n"] == 530 and id_scope["k"] == 8 and id_scope["sets"] == 2
    assert id_scope["greedy"] == pytest.approx(0.3) and id_scope["avg@k"] == pytest.approx(0.3)
    assert id_scope["pass@k"] == pytest.approx(0.6) and id_scope["reward"] == pytest.approx(0.5)
    assert blocks["metrics"]["ood"] == {"n": 198, "k": 4, "greedy": 0.3, "avg@k": 0.25, "pass@k": 0.6,
                                         "reward": 0.5, "step_accuracy": 0.9}
    assert blocks["splits"]["aime24"]["ood"] is False and blocks["splits"]["gpqa"]["ood"] is True


def test_scope_mean_drops_a_metric_one_set_lacks_and_k_when_sets_differ():
    blocks = eval_blocks({"a": split_metrics(10, 4, 0.2, 0.1, 0.3, 0.0, False, route_success=0.5),
                          "b": split_metrics(10, 8, 0.4, 0.3, 0.5, 0.0, False)})
    assert "route_success" not in blocks["metrics"]["id"] and blocks["metrics"]["id"]["k"] is None
    assert "ood" not in blocks["metrics"]


@pytest.mark.parametrize("spec, scope, metric, k, minimum", [
    ("id.greedy=0.9", "id", "greedy", None, 0.9),
    ("ood.avg@8=0.1", "ood", "avg@k", 8, 0.1),
    ("math500.pass@k=.5", "math500", "pass@k", None, 0.5),
    ("id.reward=-1.5", "id", "reward", None, -1.5),
    ("ood.route_success=0", "ood", "route_success", None, 0.0),
])
def test_parse_threshold(spec, scope, metric, k, minimum):
    t = parse_threshold(spec)
    assert (t.scope, t.metric, t.k, t.minimum) == (scope, metric, k, minimum)


def test_threshold_name_spells_k_as_given():
    assert parse_threshold("ood.pass@4=0.2").name == "ood.pass@4"
    assert parse_threshold("id.avg@k=0.2").name == "id.avg@k"


@pytest.mark.parametrize("spec, fragment", [
    ("id.accuracy=0.9", "unknown metric 'accuracy'"),
    ("greedy=0.9", "expected SCOPE.METRIC=VALUE"),
    ("id.greedy", "expected SCOPE.METRIC=VALUE"),
    ("id.greedy=high", "'high' is not a number"),
    ("id.best@8=0.1", "unknown metric 'best@8'"),
])
def test_bad_threshold_specs_are_one_line_errors(spec, fragment):
    with pytest.raises(ThresholdError) as err:
        parse_threshold(spec)
    assert fragment in str(err.value) and f"--fail-under {spec}" in str(err.value)
    assert "\n" not in str(err.value)


PLAN = {"test": {"ood": False, "k": 8}, "ood": {"ood": True, "k": 8}}


@pytest.mark.parametrize("spec, plan, fragment", [
    ("train.greedy=0.5", PLAN, "unknown scope 'train' (known: id, ood, test)"),
    ("ood.greedy=0.5", {"test": {"ood": False, "k": 8}}, "add --ood"),
    ("id.avg@k=0.5", {"test": {"ood": False, "k": 0}}, "greedy only"),
    ("id.avg@4=0.5", PLAN, "k=8 samples on test, not 4 (use id.avg@8 or --k 4)"),
])
def test_plan_refuses_what_the_eval_cannot_measure(spec, plan, fragment):
    with pytest.raises(ThresholdError) as err:
        check_plan([parse_threshold(spec)], plan, ["test", "ood"])
    assert fragment in str(err.value)


def test_plan_accepts_set_names_and_matching_k():
    check_plan([parse_threshold(s) for s in ("test.greedy=1", "ood.pass@8=0", "id.avg@k=0.2")], PLAN, ["test", "ood"])


def blocks_of(id_greedy, ood_avg):
    return eval_blocks({"test": split_metrics(10, 8, id_greedy, 0.5, 0.9, 0.0, False),
                        "ood": split_metrics(10, 8, 0.0, ood_avg, 0.2, 0.0, True)})


def test_gate_passes_at_the_threshold_and_fails_just_below():
    thresholds = [parse_threshold("id.greedy=0.6"), parse_threshold("ood.avg@8=0.1")]
    assert [r["ok"] for r in gate(thresholds, blocks_of(0.6, 0.1))] == [True, True]
    rows = gate(thresholds, blocks_of(0.59, 0.2))
    assert rows == [{"metric": "id.greedy", "minimum": 0.6, "value": 0.59, "ok": False},
                    {"metric": "ood.avg@8", "minimum": 0.1, "value": 0.2, "ok": True}]


def test_gate_reads_the_named_set_not_the_scope():
    blocks = eval_blocks({"a": split_metrics(10, 8, 0.2, 0.5, 0.9, 0.0, False),
                          "b": split_metrics(10, 8, 0.8, 0.5, 0.9, 0.0, False)})
    assert [r["ok"] for r in gate([parse_threshold("a.greedy=0.5"), parse_threshold("b.greedy=0.5"),
                                   parse_threshold("id.greedy=0.5")], blocks)] == [False, True, True]


def test_gate_fails_a_non_finite_value_and_refuses_an_unmeasured_metric():
    blocks = blocks_of(math.nan, 0.1)
    assert gate([parse_threshold("id.greedy=-1")], blocks)[0]["ok"] is False
    with pytest.raises(ThresholdError, match="route_success is not measured for id"):
        gate([parse_threshold("id.route_success=0.1")], blocks)


def test_run_totals_sum_step_time_and_take_the_last_rollout_total():
    records = [{"time/step_s": 0.5, "rollout/total": 64}, {"time/step_s": 1.25, "rollout/total": 64},
               {"time/step_s": 0.25, "rollout/total": 96}]
    assert report.run_totals(records) == {"train_time_s": 2.0, "rollouts": 96}
    assert report.run_totals([{"time/step_s": 1.0}]) == {"train_time_s": 1.0, "rollouts": None}


def test_t_interval_by_hand():
    # mean 0.044; s = sqrt((0.012² + 0.026² + 0.014²) / 2) = 0.0225389; half = 4.3027 · s / √3
    stat = report.t_interval([0.056, 0.018, 0.058])
    assert stat["mean"] == pytest.approx(0.044) and stat["n"] == 3
    assert stat["half"] == pytest.approx(0.0559902, rel=1e-5)
    assert (stat["lo"], stat["hi"]) == (pytest.approx(0.044 - 0.0559902, rel=1e-4), pytest.approx(0.044 + 0.0559902))
    # two values 1 and 3: s = √2, half = 12.7062 · √2 / √2
    assert report.t_interval([1.0, 3.0])["half"] == pytest.approx(12.7062)
    assert report.t_interval([0.3]) == {"mean": 0.3, "half": None, "lo": None, "hi": None, "n": 1, "values": [0.3]}


@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (4, 2.7764), (30, 2.0423), (40, 2.0211), (120, 1.9799)])
def test_t_quantiles_match_the_tables(df, quantile):
    assert report.t_quantile_975(df) == pytest.approx(quantile, abs=2e-4)


def test_exit_codes_are_distinct_and_documented():
    codes = [report.EXIT_OK, report.EXIT_BUG, report.EXIT_USAGE, report.EXIT_BELOW_THRESHOLD, report.EXIT_INTERRUPTED]
    assert codes == [0, 1, 2, 3, 130] and set(report.EXIT_CODES) == set(codes)
