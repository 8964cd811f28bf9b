"""Results for shell scripts and CI: exit codes, the headline JSON of `--json`, `--fail-under`.

`amft eval --json` (and `train`, `sweep`) print ONE JSON document on stdout;
its headline block per split, and per scope "id" / "ood", is

    {"n": examples, "k": samples per example (0 = greedy only),
     "greedy": greedy accuracy, "avg@k": ..., "pass@k": ..., "reward": ...}

plus "step_accuracy" / "route_success" for multi-step tasks (V-IRL). A scope
with several sets (math: math500, aime24, ...) holds the unweighted mean over
its sets, as papers average benchmarks; n is their total.

`--fail-under SCOPE.METRIC=VALUE` names a scope ("id", "ood" or a set name)
and a headline metric; avg@8 / pass@8 spell k out and must match the eval's k.
A value below VALUE (or not finite) fails the gate with EXIT_BELOW_THRESHOLD.

Nothing here imports torch or the engine.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# ---------------------------------------------------------------------------
# exit codes (the table is printed by `amft --help` and copied into README)

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_BELOW_THRESHOLD = 3
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success (and every --fail-under threshold met)",
    EXIT_BUG: "unexpected error: a bug, shown with its traceback",
    EXIT_USAGE: "usage or input error: one line on stderr names it",
    EXIT_BELOW_THRESHOLD: "a --fail-under threshold not met: one stderr line each",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); train checkpoints first",
}


def exit_code_table() -> str:
    """The exit codes as aligned plain-text lines, for --help."""
    return "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items())


# ---------------------------------------------------------------------------
# headline metrics

# headline name -> key in evaluate's per-split metrics
HEADLINE_KEYS = {"greedy": "greedy_accuracy", "avg@k": "avg@k", "pass@k": "pass@k", "reward": "reward_mean",
                 "step_accuracy": "step_accuracy", "route_success": "route_success"}
SAMPLED = ("avg@k", "pass@k", "reward")  # measured only when samples were drawn (k > 0)
SCOPES = ("id", "ood")


def headline(metrics: dict) -> dict:
    """One split's metrics (evaluate.summarize and friends) -> its headline block."""
    out = {"n": metrics.get("n_examples"), "k": metrics.get("k", 0)}
    for name, key in HEADLINE_KEYS.items():
        if metrics.get(key) is not None:
            out[name] = metrics[key]
    return out


def aggregate(blocks: list[dict]) -> dict:
    """Headline of a scope: unweighted mean over its sets of each metric all of them have."""
    if len(blocks) == 1:
        return dict(blocks[0])
    ks = {b.get("k") for b in blocks}
    out = {"n": sum(b.get("n") or 0 for b in blocks), "k": ks.pop() if len(ks) == 1 else None,
           "sets": len(blocks)}
    for name in HEADLINE_KEYS:
        if blocks and all(name in b for b in blocks):
            out[name] = sum(b[name] for b in blocks) / len(blocks)
    return out


def eval_blocks(results: dict[str, dict]) -> dict:
    """split -> metrics (with its 'ood' flag) -> {"metrics": {scope: headline}, "splits": {split: headline}}."""
    splits = {split: {**headline(m), "ood": bool(m.get("ood"))} for split, m in results.items()}
    scopes = {}
    for scope in SCOPES:
        members = [{k: v for k, v in b.items() if k != "ood"} for b in splits.values() if b["ood"] == (scope == "ood")]
        if members:
            scopes[scope] = aggregate(members)
    return {"metrics": scopes, "splits": splits}


def run_totals(records: list[dict]) -> dict:
    """Cost of a run from its metrics.jsonl records: train_time_s, the sum of time/step_s
    (resumed segments included; data prep, model loading and evals excluded), and
    rollouts, the sum of rollout/count (None when the run logged no count)."""
    counts = [r["rollout/count"] for r in records if r.get("rollout/count") is not None]
    return {"train_time_s": sum(r.get("time/step_s") or 0.0 for r in records),
            "rollouts": int(sum(counts)) if counts else None}


# ---------------------------------------------------------------------------
# --fail-under


class ThresholdError(ValueError):
    """A malformed or unknown --fail-under metric; printed as one line (exit 2)."""


@dataclass(frozen=True)
class Threshold:
    spec: str      # as given, for messages
    scope: str     # "id", "ood" or a set name
    metric: str    # a HEADLINE_KEYS name
    k: int | None  # avg@8 / pass@8: the k it names
    minimum: float

    @property
    def name(self) -> str:
        return f"{self.scope}.{self.metric.replace('@k', f'@{self.k}') if self.k else self.metric}"


_SPEC = re.compile(r"^(?P<scope>[^.=\s]+)\.(?P<metric>[^=\s]+)=(?P<value>\S+)$")
_AT_K = re.compile(r"^(avg|pass)@(\d+)$")


def parse_threshold(spec: str) -> Threshold:
    """'id.greedy=0.9' | 'ood.avg@8=0.1' -> Threshold; one-line ThresholdError otherwise."""
    where = f"--fail-under {spec}"
    match = _SPEC.match(spec.strip())
    if not match:
        raise ThresholdError(f"{where}: expected SCOPE.METRIC=VALUE, e.g. id.greedy=0.9 or ood.avg@8=0.1")
    try:
        minimum = float(match["value"])
    except ValueError:
        raise ThresholdError(f"{where}: {match['value']!r} is not a number") from None
    metric, k = match["metric"], None
    at_k = _AT_K.match(metric)
    if at_k:
        metric, k = f"{at_k[1]}@k", int(at_k[2])
    if metric not in HEADLINE_KEYS:
        raise ThresholdError(f"{where}: unknown metric {match['metric']!r} (known: greedy, avg@k, pass@k, "
                             "avg@K / pass@K with K the eval's k, reward, step_accuracy, route_success)")
    return Threshold(spec, match["scope"], metric, k, minimum)


def check_plan(thresholds: list[Threshold], plan: dict[str, dict], all_splits: list[str]) -> None:
    """Refuse, before any work, thresholds the planned eval cannot measure.

    plan: split -> {"ood": bool, "k": samples per example (0 = greedy only)} of the
    splits that will be evaluated; all_splits: every set the task has.
    """
    for t in thresholds:
        where = f"--fail-under {t.spec}"
        if t.scope in SCOPES:
            members = [s for s, p in plan.items() if p["ood"] == (t.scope == "ood")]
        elif t.scope in all_splits:
            members = [t.scope] if t.scope in plan else []
        else:
            known = ", ".join(dict.fromkeys([*SCOPES, *all_splits]))
            raise ThresholdError(f"{where}: unknown scope {t.scope!r} (known: {known})")
        if not members:
            raise ThresholdError(f"{where}: {t.scope} is not evaluated by this command (add --ood or --split all)")
        for split in members:
            k = plan[split]["k"]
            if t.metric in SAMPLED and k == 0:
                raise ThresholdError(f"{where}: {t.metric} needs samples, but this eval is greedy only")
            if t.k is not None and t.k != k:
                raise ThresholdError(f"{where}: this eval draws k={k} samples on {split}, not {t.k} "
                                     f"(use {t.scope}.{t.metric.replace('@k', f'@{k}')} or --k {t.k})")


def gate(thresholds: list[Threshold], blocks: dict) -> list[dict]:
    """One row {metric, minimum, value, ok} per threshold; blocks as from eval_blocks.

    A value below the minimum or not finite is not ok. A metric the eval did not
    report (e.g. route_success of a one-step task) is a ThresholdError: the gate
    cannot be decided, so it is a usage error, not a pass.
    """
    rows = []
    for t in thresholds:
        block = blocks["metrics" if t.scope in SCOPES else "splits"].get(t.scope, {})
        if t.metric not in block:
            measured = ", ".join(n for n in HEADLINE_KEYS if n in block) or "nothing"
            raise ThresholdError(f"--fail-under {t.spec}: {t.metric} is not measured for {t.scope} "
                                 f"(measured: {measured})")
        value = block[t.metric]
        ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= t.minimum
        rows.append({"metric": t.name, "minimum": t.minimum, "value": value, "ok": ok})
    return rows
