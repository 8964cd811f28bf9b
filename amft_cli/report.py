"""Results for people and scripts: exit codes, the headline JSON of `--json`, `--fail-under`
gates, t-intervals over seeds and the sweep table (its rows, Markdown and CSV).

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

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

from amft_cli import rundir
from amft_cli.config import Config

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
    EXIT_INTERRUPTED: "interrupted (Ctrl-C or SIGTERM); train checkpoints first",
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
    rollouts, the last rollout/total: completions the policy sampled since step 0, for
    training and for AMFT's validation utility alike (None when the run logged none)."""
    totals = [r["rollout/total"] for r in records if r.get("rollout/total") is not None]
    return {"train_time_s": sum(r.get("time/step_s") or 0.0 for r in records),
            "rollouts": int(totals[-1]) if totals else None}


# ---------------------------------------------------------------------------
# intervals over seeds

# Student's t quantile t(0.975, df) for df = 1..30 (standard tables); larger df use the
# Cornish-Fisher expansion below, within 1e-4 of the exact value there.
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
INTERVAL_TEXT = "95 % t-interval over seeds (mean ± t(0.975, n−1)·s/√n)"


def train_document(cfg: Config, out: Path, result) -> dict:
    """The JSON of `amft train --json`: where the run is, and its before/after headline on unseen ID examples."""
    saved = rundir.checkpoints(out)
    summary = {k: {"id": headline(v)} for k, v in result.summary.items() if k in ("before", "after")}
    return {"command": "train", "preset": cfg.preset or None, "task": cfg.task.name, "algo": cfg.train.algo,
            "seed": cfg.seed, "run": str(out), "model": str(saved[max(saved)]) if saved else None,
            "step": result.steps, "interrupted": result.interrupted,
            **run_totals(rundir.read_metrics(out) if result.steps else []),
            "metrics": summary.get("after", {}), "before": summary.get("before", {})}


def t_quantile_975(df: int) -> float:
    """t(0.975, df), the two-sided 95 % critical value of Student's t."""
    if df < 1:
        raise ValueError(f"t_quantile_975: df must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def t_interval(values: list[float]) -> dict:
    """{mean, half, lo, hi, n, values}: mean ± half, half = t(0.975, n−1) · s / √n with s the
    sample standard deviation; half, lo and hi are None for fewer than two values."""
    n = len(values)
    mean = sum(values) / n if n else None
    half = None
    if n >= 2:
        s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile_975(n - 1) * s / math.sqrt(n)
    return {"mean": mean, "half": half, "lo": None if half is None else mean - half,
            "hi": None if half is None else mean + half, "n": n, "values": list(values)}


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


# ---------------------------------------------------------------------------
# sweep tables (amft sweep writes them)

SWEEP_METRICS = ("greedy", "avg@k", "pass@k")
SWEEP_EXTRA_METRICS = ("step_accuracy",)  # tabulated when every run of the sweep reports it


def _sweep_columns(records: list[dict]) -> list[tuple[str, str]]:
    """(scope, metric) columns: the headline trio ID and OOD, plus extras every record has."""
    scopes = [s for s in SCOPES if any(s in r for r in records)]
    extras = [m for m in SWEEP_EXTRA_METRICS if records and all(m in r.get(s, {}) for r in records for s in scopes)]
    return [(s, m) for s in scopes for m in (*SWEEP_METRICS, *extras)]


def sweep_table(grid, records: list[dict]) -> dict:
    """The table of a sweep.Grid's evaluated runs (records: sweep.cell_record). Per method, in
    --algo order: mean and 95 % t-interval over its seeds of every column, train time and
    rollouts. The runs themselves are listed too."""
    columns = _sweep_columns(records)
    rows = []
    for algo in grid.algos:
        mine = [r for r in records if r["algo"] == algo]
        if not mine:
            continue
        row = {"algo": algo, "seeds": [r["seed"] for r in mine]}
        for scope, metric in columns:
            row[f"{scope}.{metric}"] = t_interval([r[scope][metric] for r in mine if metric in r.get(scope, {})])
        for key in ("train_time_s", "rollouts"):
            values = [r[key] for r in mine if r.get(key) is not None]
            row[key] = t_interval(values) if values else None
        if grid.baseline and algo != grid.baseline:
            row["vs_baseline"] = paired_differences(records, algo, grid.baseline, columns)
        rows.append(row)
    ks = sorted({r[s].get("k") for r in records for s in SCOPES if s in r})
    ns = sorted({r[s].get("n") for r in records for s in SCOPES if s in r})
    return {"sweep": grid.name, "preset": grid.preset, "algos": grid.algos, "seeds": grid.seeds,
            "overrides": grid.overrides, "k": ks[0] if len(ks) == 1 else ks, "n": ns[0] if len(ns) == 1 else ns,
            "interval": INTERVAL_TEXT, "columns": [f"{s}.{m}" for s, m in columns], "rows": rows,
            "baseline": grid.baseline, "trained_under": trained_under(records), "runs": records}


def paired_differences(records: list[dict], algo: str, baseline: str, columns: list[tuple[str, str]]) -> dict:
    """Per column, the t-interval of (algo − baseline) over the seeds both ran, each difference
    taken on one seed: a paired comparison, tighter than two overlapping intervals where the seed
    moves both runs alike (data order, initial sampling), and as valid where it does not."""
    base = {r["seed"]: r for r in records if r["algo"] == baseline}
    pairs = [(r, base[r["seed"]]) for r in records if r["algo"] == algo and r["seed"] in base]
    out: dict = {"seeds": [r["seed"] for r, _ in pairs]}
    for scope, metric in columns:
        out[f"{scope}.{metric}"] = t_interval([a[scope][metric] - b[scope][metric] for a, b in pairs
                                               if metric in a.get(scope, {}) and metric in b.get(scope, {})])
    return out


def trained_under(records: list[dict]) -> dict:
    """What a sweep's runs were trained under (records' "trained_on", provenance.trained_on):
    "same" maps each versions/device key every run shares to its value; "differs" maps each
    other key to {value: [runs]} (a run resumed under other software is under each of its
    values); "unrecorded" lists runs from before environment.jsonl. Scores compare like for
    like only where "differs" is empty, train times only on one device."""
    settings = [(f"{r['algo']}-s{r['seed']}", s) for r in records for s in r.get("trained_on") or []]
    same, differs = {}, {}
    for key in dict.fromkeys(k for _, s in settings for k in s):
        values: dict = {}
        for name, s in settings:
            values.setdefault(str(s.get(key)), {})[name] = None  # an ordered set of runs
        if len(values) == 1:
            same[key] = settings[0][1].get(key)
        else:
            differs[key] = {value: list(names) for value, names in values.items()}
    return {"same": same, "differs": differs,
            "unrecorded": [f"{r['algo']}-s{r['seed']}" for r in records if not r.get("trained_on")]}


def _trained_under_text(under: dict) -> list[str]:
    """The Markdown lines under the table: what all runs shared, then each difference."""
    same = dict(under["same"])
    commit, device = same.pop("amft-cli commit", None), same.pop("device", None)
    if commit and "amft-cli" in same:  # as `amft --version` writes it
        same["amft-cli"] = f"{same['amft-cli']} ({commit})"
    shared = ", ".join(f"{k} {v}" for k, v in same.items() if v is not None)
    lines = [f"Trained under {shared}" + (f" on {device}" if device else "") + "."] if shared else []
    for key, values in under["differs"].items():
        spread = "; ".join(f"{value} ({', '.join(names)})" for value, names in values.items())
        lines.append(f"**Not like for like:** {key} differs across runs: {spread}.")
    if under["unrecorded"]:
        lines.append(f"No environment.jsonl (trained before it was recorded): {', '.join(under['unrecorded'])}.")
    return lines


def _cell_text(stat: dict | None, scale: float = 1.0, one_decimal: bool = True) -> str:
    """'4.4 ± 5.6' (mean ± half-width, times scale), the mean alone for one seed, '—' for none;
    one_decimal=False: counts, '1,000 ± 0'."""
    if not stat or not stat.get("n"):
        return "—"
    number = (lambda v: f"{scale * v:.1f}") if one_decimal else (lambda v: _short(scale * v))
    return number(stat["mean"]) + ("" if stat.get("half") is None else f" ± {number(stat['half'])}")


def _short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2g}"


def sweep_markdown(table: dict) -> str:
    """The table as Markdown: rates in %, mean ± half-width of the interval, train time in minutes."""
    k = table["k"]
    names = [c.replace("id.", "ID ").replace("ood.", "OOD ").replace("@k", f"@{k}" if isinstance(k, int) else "@k")
             for c in table["columns"]]
    lines = ["| method | seeds | " + " | ".join(names) + " | train time (min) | rollouts |",
             "|---" * (len(names) + 4) + "|"]
    for row in table["rows"]:
        cells = [_cell_text(row[c], 100) for c in table["columns"]]
        cells += [_cell_text(row["train_time_s"], 1 / 60), _cell_text(row["rollouts"], one_decimal=False)]
        lines.append(f"| `{row['algo']}` | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", f"Rates in %, mean ± half-width of the {table['interval']}; n = {table['n']} examples per "
                  f"split, k = {k} samples; train time = summed step times; rollouts = completions sampled."]
    if table.get("baseline"):
        lines += ["", *_paired_markdown(table, names)]
    under = _trained_under_text(table["trained_under"]) if "trained_under" in table else []
    return "\n".join(lines + ([""] + under if under else [])) + "\n"


def _paired_markdown(table: dict, names: list[str]) -> list[str]:
    """The paired table: each method minus the baseline on the same seeds; * where the interval excludes 0."""
    base = table["baseline"]
    lines = [f"Paired with `{base}` on the same seeds: method − {base} in percentage points, mean ± half-width "
             "of the same interval over the differences; * where it excludes 0.", "",
             "| method | seeds | " + " | ".join(f"Δ {n}" for n in names) + " |", "|---" * (len(names) + 2) + "|"]
    for row in (r for r in table["rows"] if "vs_baseline" in r):
        paired = row["vs_baseline"]
        cells = [_cell_text(paired[c], 100) + (" *" if paired[c]["lo"] is not None and
                                               (paired[c]["lo"] > 0 or paired[c]["hi"] < 0) else "")
                 for c in table["columns"]]
        lines.append(f"| `{row['algo']}` | {len(paired['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def sweep_csv(table: dict) -> str:
    """One row per method: <column>_mean, _lo, _hi for every column, train time and rollouts; with a
    --baseline also vs_<baseline>.<column>_mean, _lo, _hi (paired; empty on the baseline's row)."""
    keys = [*table["columns"], "train_time_s", "rollouts"]
    paired = [f"vs_{table['baseline']}.{c}" for c in table["columns"]] if table.get("baseline") else []
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["algo", "n_seeds"] + [f"{key}_{part}" for key in keys + paired for part in ("mean", "lo", "hi")])
    for row in table["rows"]:
        stats = [row.get(key) or {} for key in keys]
        stats += [row.get("vs_baseline", {}).get(c) or {} for c in table["columns"]] if paired else []
        writer.writerow([row["algo"], len(row["seeds"])]
                        + ["" if s.get(part) is None else s[part] for s in stats for part in ("mean", "lo", "hi")])
    return buffer.getvalue()
