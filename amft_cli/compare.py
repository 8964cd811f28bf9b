"""`amft compare A B`: two evaluated runs on the same test problems, paired problem by problem.

A run of one seed (every pretrained-model run here) has no interval over seeds, and two runs'
scores on 50 or 500 problems differ by chance too. Both were scored on the SAME problems, so
each problem gives a paired outcome, and the comparison uses only that (as papers' paired
bootstrap or McNemar tests do):

    greedy   each problem's greedy answer right or wrong in A and in B. McNemar's exact test:
             under "A and B are equally good", the problems only one of them solves split
             50/50, so p = P(a split at least this uneven) (two-sided binomial, p = 0.5). And
             the t-interval (report.t_interval) of the per-problem difference B − A in {−1, 0, 1}
    avg@k    the t-interval of the per-problem difference of sample accuracy (k samples each)

This covers the test set's sampling, not the training seed's variance: for that, train
seeds and use `amft sweep --baseline` (pairs by seed). Departure from a paired bootstrap
(what some papers report): a t-interval over problems, which for hundreds of problems gives
the same width, with nothing random. Splits scored per episode (V-IRL's route success) are
not paired here. Settings that differ between the two evals (temperature, k, limit, verifier
code, test set size) are listed: the comparison is like for like only without them.
Reads JSON only; imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from math import comb
from pathlib import Path

from amft_cli import report, rundir

SETTINGS = ("temperature", "top_p", "max_new_tokens", "k", "limit", "greedy_only")


class CompareError(ValueError):
    """A folder without eval samples, or two evals with no split in common; one line (exit 2)."""


def eval_folder(path: Path) -> Path:
    """A run directory (its eval/) or an eval folder itself: where <split>.samples.jsonl lie."""
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"{path}: no such folder (expected a run directory or an eval folder)")
    for folder in (rundir.eval_dir(path), path):
        if any(folder.glob("*.samples.jsonl")):
            return folder
    raise CompareError(f"{path}: no <split>.samples.jsonl here or under eval/ (run `amft eval --run {path}` first)")


def problem_outcomes(samples: Path) -> dict[str, dict]:
    """id -> {"greedy": 1.0/0.0 or None, "samples": accuracy over its samples or None}, from
    one <split>.samples.jsonl, as evaluate.py scores it ("correct" status)."""
    rows: dict[str, dict] = {}
    for number, line in enumerate(samples.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            rows.setdefault(str(row["id"]), {"greedy": [], "sample": []})[row["mode"]].append(
                row["status"] == "correct")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CompareError(f"{samples}:{number}: expected a JSON row with id, mode (greedy|sample) and "
                               "status, as `amft eval` writes") from None
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return {i: {"greedy": mean(r["greedy"]), "samples": mean(r["sample"])} for i, r in rows.items()}


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: 2 · P(Binomial(only_a + only_b, ½) ≤ min(only_a, only_b)), at most 1."""
    n, low = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(comb(n, i) for i in range(low + 1)) / 2 ** n) if n else 1.0


def compare_split(a: dict[str, dict], b: dict[str, dict]) -> dict:
    """The paired comparison of one split (problem_outcomes of A and of B) over the problems both have."""
    common = [i for i in a if i in b]
    out: dict = {"n": len(common), "only_in_one": len(set(a) ^ set(b))}
    for key, name in (("greedy", "greedy"), ("samples", "avg@k")):
        pairs = [(a[i][key], b[i][key]) for i in common if a[i][key] is not None and b[i][key] is not None]
        if not pairs:
            continue
        block = {"n": len(pairs), "a": sum(x for x, _ in pairs) / len(pairs), "b": sum(y for _, y in pairs) / len(pairs),
                 "b_minus_a": {k: v for k, v in report.t_interval([y - x for x, y in pairs]).items() if k != "values"}}
        if key == "greedy":
            only_a = sum(1 for x, y in pairs if x > y)
            only_b = sum(1 for x, y in pairs if y > x)
            block.update(only_a=only_a, only_b=only_b, p_mcnemar=mcnemar_p(only_a, only_b))
        out[name] = block
    return out


def _differences(ra: dict, rb: dict) -> list[str]:
    """What differs between two eval records of one split: settings, verifier code, test set size."""
    sa, sb = ra.get("settings", {}), rb.get("settings", {})
    found = [f"{k} {sa.get(k)} vs {sb.get(k)}" for k in SETTINGS if sa.get(k) != sb.get(k)]
    for key in ("verifier", "set_size", "task"):
        if ra.get(key) != rb.get(key):
            found.append(f"{key} {ra.get(key)} vs {rb.get(key)}")
    return found


def _eval_record(path: Path) -> dict:
    """<split>.json beside the samples ({} where missing: no settings to compare). One that names
    other samples (samples_sha256: an evaluation killed between writing the two) is refused."""
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        raise CompareError(f"{path}: not valid JSON (rerun `amft eval`)") from None
    samples = path.with_name(f"{path.stem}.samples.jsonl")
    if "samples_sha256" in record and samples.is_file() and \
            hashlib.sha256(samples.read_bytes()).hexdigest() != record["samples_sha256"]:
        raise CompareError(f"{samples}: not the samples {path.name} scored (an evaluation cut short?): run "
                           "`amft eval` again")
    return record


def compare(path_a: Path, path_b: Path) -> dict:
    """Every split both folders evaluated: {"a", "b", "splits": {split: compare_split(...) + "differs"}}."""
    fa, fb = eval_folder(path_a), eval_folder(path_b)
    splits: dict = {}
    for samples in sorted(fa.glob("*.samples.jsonl")):
        split = samples.name[: -len(".samples.jsonl")]
        other = fb / samples.name
        if not other.is_file():
            continue
        records = [_eval_record(folder / f"{split}.json") for folder in (fa, fb)]
        tasks = [r.get("task") for r in records]
        if None not in tasks and tasks[0] != tasks[1]:
            raise CompareError(f"{fa} and {fb}: {split} of task {tasks[0]} vs of task {tasks[1]}: not the same "
                               "problems, nothing to pair")
        if any("route_success" in r.get("metrics", {}) for r in records):
            splits[split] = {"skipped": "scored per route (V-IRL): not paired per problem"}
            continue
        splits[split] = {**compare_split(problem_outcomes(samples), problem_outcomes(other)),
                         "ood": bool(records[0].get("metrics", {}).get("ood")), "differs": _differences(*records)}
    if not splits:
        raise CompareError(f"{fa} and {fb}: no split evaluated in both (each holds "
                           f"{', '.join(p.name for p in sorted(fa.glob('*.samples.jsonl'))) or 'none'} / "
                           f"{', '.join(p.name for p in sorted(fb.glob('*.samples.jsonl'))) or 'none'})")
    if not any(block.get("n") for block in splits.values() if "skipped" not in block) and not all(
            "skipped" in block for block in splits.values()):
        raise CompareError(f"{fa} and {fb}: no problem id in common ({', '.join(splits)}): evaluated on different "
                           "test sets")
    splits = dict(sorted(splits.items(), key=lambda kv: bool(kv[1].get("ood"))))  # ID splits first
    return {"a": str(path_a), "b": str(path_b), "splits": splits, "mixed_checkpoints": _mixed(fa, "A") + _mixed(fb, "B")}


def _mixed(folder: Path, name: str) -> list[str]:
    """A line when one eval folder's splits were scored on different checkpoints (`amft eval --step`
    rewrites only the splits it evaluates), so its rows are not one model's."""
    found = {p.name[: -len(".json")]: Path(_eval_record(p).get("checkpoint", "?")).name
             for p in sorted(folder.glob("*.json"))}
    return [f"{name}'s splits come from different checkpoints: " + ", ".join(f"{s} {c}" for s, c in found.items())
            ] if len(set(found.values())) > 1 else []
