"""avg@k, pass@k and greedy accuracy of a model over a task's ID and OOD splits.

For each test example we draw k samples (temperature T) and one greedy
completion, score every one with the task's own verifier, and report per split:

    avg@k    mean over examples of (correct samples / k); equals pass@1
    pass@k   unbiased estimator 1 − C(n−c, k)/C(n, k) (Chen et al. 2021), here n = k
    greedy_accuracy   share of examples whose greedy completion is correct

Multi-step tasks (V-IRL) run their own greedy episodes through
`task.evaluate_episodes`; their metrics (step_accuracy, route_success) are
reported as they come, and greedy_accuracy is route success. The sampled part
still scores each step prompt independently.

With sequential revision (task.verify_iter > 1, tasks/revision.py) every sample
and the greedy completion are episodes of up to verify_iter attempts with the
verifier's feedback in between; an episode counts as correct when solved within
its attempts (the reference's success rate), and first_try_* report the first
attempts alone.

The pure parts (pass_at_k, summarize, evaluate_split) take a plain Python
`generate_fn(prompts, n, greedy) -> list[list[str]]`, so they are tested
without a model. Only `run_eval` loads torch, lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from amft_cli import provenance
from amft_cli.config import Config
from amft_cli.data import load_split, prepare, stale_parts
from amft_cli.datalock import reading
from amft_cli.fsio import user_io
from amft_cli.rundir import RunLock, split_files
from amft_cli.tasks import get_task, verifier_version
from amft_cli.tasks.base import write_jsonl
from amft_cli.tasks.revision import run_episodes

GenerateFn = Callable[[list[str], int, bool], list[list[str]]]
SPLIT_CHOICES = ("id", "ood", "all")
EPISODE_METRICS = ("step_accuracy", "route_success")  # shown as extra columns when present


class EvalError(ValueError):
    """A user mistake in `amft eval` (missing split, not a model, ...); printed as one line."""


# ---------------------------------------------------------------------------
# estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k)/C(n, k).

    The ratio of binomials is the product Π_{i=n−c+1..n} (1 − k/i), which never
    forms huge integers or loses precision.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(rows: list[dict]) -> dict:
    """Split metrics from sample rows ({id, reward, status, mode: sample|greedy}).

    Rows of other modes (episode steps) are ignored here. k is the smallest
    number of samples any example got.
    """
    out: dict = {}
    sampled = [r for r in rows if r["mode"] == "sample"]
    if sampled:
        per_example: dict = {}
        for r in sampled:
            per_example.setdefault(r["id"], []).append(r["status"] == "correct")
        k = min(len(v) for v in per_example.values())
        out["n_examples"] = len(per_example)
        out["k"] = k
        out["avg@k"] = _mean([sum(v) / len(v) for v in per_example.values()])
        out["pass@1"] = _mean([pass_at_k(len(v), sum(v), 1) for v in per_example.values()])
        out["pass@k"] = _mean([pass_at_k(len(v), sum(v), k) for v in per_example.values()])
        out["reward_mean"] = _mean([r["reward"] for r in sampled])
        out["status_counts"] = dict(Counter(r["status"] for r in sampled))
    greedy = [r for r in rows if r["mode"] == "greedy"]
    if greedy:
        out.setdefault("n_examples", len({r["id"] for r in greedy}))
        out["greedy_accuracy"] = _mean([r["status"] == "correct" for r in greedy])
        out["greedy_reward_mean"] = _mean([r["reward"] for r in greedy])
        out["greedy_status_counts"] = dict(Counter(r["status"] for r in greedy))
    return out


# ---------------------------------------------------------------------------
# one split


def _score_rows(task, examples: list[dict], completions: list[list[str]], mode: str) -> list[dict]:
    if len(completions) != len(examples):
        raise RuntimeError(f"generate returned {len(completions)} lists for {len(examples)} prompts")
    rows = []
    for example, texts in zip(examples, completions):
        for i, text in enumerate(texts):
            score = task.score(example, text)
            rows.append({"id": example["id"], "mode": mode, "sample": i, "prompt": example["prompt"],
                         "completion": text, "reward": float(score.reward), "status": score.status})
    return rows


def _episode_rows(episodes, mode: str, n: int) -> list[dict]:
    """One row per episode of sequential revision: status "correct" when an attempt solved it,
    else the last attempt's; its attempts listed."""
    rows = []
    for i, episode in enumerate(episodes):
        last = next((a for a in episode.attempts if a.score.correct), episode.attempts[-1])
        rows.append({"id": episode.example["id"], "mode": mode, "sample": i % n, "prompt": episode.example["prompt"],
                     "completion": last.completion, "reward": float(last.score.reward),
                     "status": "correct" if episode.solved else last.score.status,
                     "attempts": [{"completion": a.completion, "reward": float(a.score.reward),
                                   "status": a.score.status} for a in episode.attempts]})
    return rows


def _sample_rows(task, examples: list[dict], generate_fn: GenerateFn, n: int, greedy: bool,
                 verify_iter: int) -> list[dict]:
    mode = "greedy" if greedy else "sample"
    if verify_iter == 1:
        return _score_rows(task, examples, generate_fn([ex["prompt"] for ex in examples], n, greedy), mode)
    episodes = run_episodes(task, examples, n, verify_iter, lambda convs, k: generate_fn(convs, k, greedy))
    return _episode_rows(episodes, mode, n)


def _first_tries(rows: list[dict]) -> dict:
    """Accuracy of the first attempts alone, for comparison with verify_iter = 1."""
    out = {}
    for mode, key in (("sample", "first_try_avg@k"), ("greedy", "first_try_greedy")):
        mine = [r for r in rows if r["mode"] == mode]
        if mine:
            out[key] = _mean([r["attempts"][0]["status"] == "correct" for r in mine])
    return out


def evaluate_split(task, examples: list[dict], generate_fn: GenerateFn, *, k: int,
                   with_greedy: bool = True, verify_iter: int = 1) -> tuple[dict, list[dict]]:
    """(metrics, sample rows) of one split.

    generate_fn(prompts, n, greedy) returns n completions per prompt (a prompt is a text, or a
    conversation with verify_iter > 1). k = 0 skips sampling (greedy only). Rows: {id, mode,
    sample, prompt, completion, reward, status}, one per completion, greedy ones included; with
    sequential revision (verify_iter > 1, tasks/revision.py) one per episode, "correct" when
    solved within the attempts, which are listed.
    """
    if not examples:
        raise EvalError("no examples to evaluate")
    rows = _sample_rows(task, examples, generate_fn, k, False, verify_iter) if k > 0 else []
    episodes: dict = {}
    if with_greedy and hasattr(task, "evaluate_episodes"):
        def generate(step_prompts: list) -> list[str]:
            return [texts[0] for texts in generate_fn(step_prompts, 1, True)]
        episodes, episode_rows = task.evaluate_episodes(examples, generate, verify_iter)
        rows += [{**r, "mode": "episode"} for r in episode_rows]
    elif with_greedy:
        rows += _sample_rows(task, examples, generate_fn, 1, True, verify_iter)
    metrics = summarize(rows)
    metrics.setdefault("n_examples", len(examples))
    metrics.update(episodes)
    if verify_iter > 1:
        metrics.update({"verify_iter": verify_iter, **_first_tries(rows)})
    if "route_success" in episodes:
        metrics["greedy_accuracy"] = episodes["route_success"]
    return metrics, rows


def batched_generate(sample: Callable[..., list[list[str]]], batch_size: int, seed: int,
                     on_progress: Callable[[int], None] | None = None) -> GenerateFn:
    """A generate_fn that feeds `sample(prompts, n, greedy, seed, first_row)` about batch_size
    completions at a time; first_row numbers the chunk's first completion in the call.

    Chunking here (not only inside the sampler) is what lets the progress bar move. Each
    completion row samples from its own stream (seed, row number: rollout.row_uniforms), so
    the completions do not depend on batch_size.
    """
    def generate_fn(prompts: list[str], n: int, greedy: bool) -> list[list[str]]:
        per_chunk = max(1, batch_size // n)
        out: list[list[str]] = []
        for start in range(0, len(prompts), per_chunk):
            chunk = prompts[start:start + per_chunk]
            out += sample(chunk, n, greedy, seed, start * n)
            if on_progress is not None:
                on_progress(len(chunk) * n)
        return out
    return generate_fn


# ---------------------------------------------------------------------------
# splits on disk


def splits_for(task, which: str, data_dir: str | Path | None = None) -> list[str]:
    """Split names for --split id|ood|all, ID ones first.

    Tasks with EVAL_SETS (math) pick sets by their `ood` flag, keeping only
    those present as <data_dir>/<name>.jsonl when data_dir is given; the
    generated tasks use "test" (ID) and "ood".
    """
    if which not in SPLIT_CHOICES:
        raise EvalError(f"--split {which!r}: expected one of {', '.join(SPLIT_CHOICES)}")
    eval_sets = getattr(task, "EVAL_SETS", None)
    if eval_sets:
        names = [n for n, spec in eval_sets.items() if which == "all" or bool(spec.get("ood")) == (which == "ood")]
        names.sort(key=lambda n: bool(eval_sets[n].get("ood")))
        if data_dir is not None:
            names = [n for n in names if (Path(data_dir) / f"{n}.jsonl").is_file()]
        return names
    wanted = {"id": ["test"], "ood": ["ood"], "all": ["test", "ood"]}[which]
    return [s for s in wanted if s in task.SPLITS]


def is_ood(task, split: str) -> bool:
    eval_sets = getattr(task, "EVAL_SETS", None) or {}
    return bool(eval_sets[split].get("ood")) if split in eval_sets else split == "ood"


def default_k(task, split: str, fallback: int) -> int:
    """The set's own k where the task names one (AIME: avg@32), else fallback."""
    spec = (getattr(task, "EVAL_SETS", None) or {}).get(split, {})
    return int(spec.get("default_k") or fallback)


def eval_plan(cfg: Config, which: str, k: int | None = None, greedy_only: bool = False,
              on_disk: bool = True) -> dict[str, dict]:
    """split -> {"ood": bool, "k": samples per example} of what an eval of `which` will run.

    k None means each set's default k (math) or cfg.eval.k; greedy_only makes k 0.
    on_disk: only sets present in task.data_dir (see splits_for); False plans every
    set the task has, as before `amft prepare` wrote them.
    """
    task = get_task(cfg.task.name)
    return {split: {"ood": is_ood(task, split),
                    "k": 0 if greedy_only else (k or default_k(task, split, cfg.eval.k))}
            for split in splits_for(task, which, cfg.task.data_dir if on_disk else None)}


# ---------------------------------------------------------------------------
# the whole eval, with a model


def _check_model_path(model_path: str | Path) -> str:
    path = Path(model_path)
    if path.exists() and not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise EvalError(f"{model_path}: not a model folder (no config.json or adapter_config.json); "
                        "pass a checkpoint folder, a run directory with --run, or a hub id")
    return str(model_path)


def _load_model(cfg: Config, model_path: str):
    from amft_cli.model import load_policy

    return load_policy(dataclasses.replace(cfg.model, path=model_path), trainable=False)


def eval_settings(cfg: Config, seed: int | None, **given) -> dict:
    """The knobs actually used: flags given, else the config's [eval] section (and cfg.seed)."""
    resolved = {key: getattr(cfg.eval, key) if value is None else value for key, value in given.items()}
    resolved["seed"] = cfg.seed if seed is None else seed
    return resolved


def generate_fn_for(model, tokenizer, cfg: Config, settings: dict,
                    on_progress: Callable[[int], None] | None = None) -> GenerateFn:
    """A generate_fn over a loaded model with the given eval settings (see eval_settings)."""
    from amft_cli.rollout import sample_texts

    def sample(prompts, n, greedy, seed, first_row):
        return sample_texts(model, tokenizer, prompts, n, greedy=greedy, temperature=settings["temperature"],
                            top_p=settings["top_p"], max_new_tokens=settings["max_new_tokens"],
                            batch_size=settings["batch_size"], chat_template=cfg.model.chat_template,
                            seed=seed, first_row=first_row)
    return batched_generate(sample, settings["batch_size"], settings["seed"], on_progress)


def _write_results(scores_file: Path, samples_file: Path, record: dict, rows: list[dict]) -> None:
    """Both files written aside, then renamed into place, samples first: a failed write keeps the
    previous pair. The scores record the samples' sha256 (amft compare checks it), so a kill
    between the two renames shows as a mismatch, not as old scores beside new samples."""
    tmp_samples, tmp_scores = (f.with_name(f".{f.name}.new") for f in (samples_file, scores_file))
    try:
        write_jsonl(tmp_samples, rows)
        record = {**record, "samples_sha256": hashlib.sha256(tmp_samples.read_bytes()).hexdigest()}
        tmp_scores.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_samples, samples_file)
        os.replace(tmp_scores, scores_file)
    finally:
        tmp_samples.unlink(missing_ok=True)
        tmp_scores.unlink(missing_ok=True)


def run_eval(cfg: Config, model_path: str | Path, out_dir: str | Path, which: str = "id", k: int | None = None,
             temperature: float | None = None, top_p: float | None = None, greedy_only: bool = False,
             max_new_tokens: int | None = None, limit: int | None = None, batch_size: int | None = None,
             seed: int | None = None, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, dict]:
    """Evaluate a model on the task's splits; write out_dir/<split>.json and .samples.jsonl.

    Options left as None come from cfg.eval (and cfg.seed); k None means each
    set's default k (math) or cfg.eval.k. Missing or stale eval splits are
    prepared first (no training set needed). Returns split -> metrics.
    """
    model_path = _check_model_path(model_path)
    task = get_task(cfg.task.name)
    with reading(cfg, lambda: prepare(cfg, log=log, eval_only=True), lambda: stale_parts(cfg, eval_only=True)):
        return _evaluate(cfg, task, model_path, out_dir, which, k, greedy_only, progress,
                         eval_settings(cfg, seed, temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, limit=limit, batch_size=batch_size))


def _evaluate(cfg: Config, task, model_path: Path, out_dir, which: str, k: int | None, greedy_only: bool,
              progress: bool, s: dict) -> dict[str, dict]:
    """run_eval's work once the eval splits are current (and held under the data folder's lock)."""
    plan = eval_plan(cfg, which, k, greedy_only)
    if not plan:
        raise EvalError(f"{cfg.task.data_dir}: no {which} eval sets of task {cfg.task.name} found — run `amft prepare`")
    sets = {split: load_split(cfg, split) for split in plan}
    data = {split: examples[:s["limit"]] if s["limit"] > 0 else examples for split, examples in sets.items()}
    with RunLock(Path(out_dir), advice="wait for that evaluation to end or pass another --out"):
        return _evaluate_sets(cfg, task, model_path, Path(out_dir), plan, sets, data, s, greedy_only, progress)


def _evaluate_sets(cfg: Config, task, model_path, out_dir: Path, plan: dict, sets: dict, data: dict,
                   s: dict, greedy_only: bool, progress: bool) -> dict[str, dict]:
    """run_eval's work, holding out_dir's lock: each split's files replace the old ones whole."""
    model, tokenizer = _load_model(cfg, model_path)
    results = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    software = provenance.versions()  # what scored these samples, beside the verifier's version
    with Progress(*columns, disable=not progress) as bar:
        for split, examples in data.items():
            split_k = plan[split]["k"]
            total = None if hasattr(task, "evaluate_episodes") or cfg.task.verify_iter > 1 else len(examples) * (split_k + 1)
            bar_id = bar.add_task(f"{split} ({len(examples)} examples, k={split_k})", total=total)
            generate_fn = generate_fn_for(model, tokenizer, cfg, s, lambda n, b=bar_id: bar.advance(b, n))
            metrics, rows = evaluate_split(task, examples, generate_fn, k=split_k, verify_iter=cfg.task.verify_iter)
            metrics["ood"] = plan[split]["ood"]
            record = {"split": split, "task": cfg.task.name, "checkpoint": model_path, "set_size": len(sets[split]),
                      "settings": {**s, "k": split_k, "greedy_only": greedy_only}, "metrics": metrics,
                      "verifier": verifier_version(), "versions": software}
            with user_io(out_dir, f"writing the {split} results"):
                _write_results(*split_files(out_dir, split), record, rows)
            results[split] = metrics
    return results


# ---------------------------------------------------------------------------
# tables


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def table_rows(results: dict[str, dict], extras: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(headers, formatted rows) of split -> metrics; shared by the CLI table and `amft plot eval`.

    extras: task-specific columns; default, those of EPISODE_METRICS present in any split.
    """
    if extras is None:
        extras = [m for m in EPISODE_METRICS if any(m in r for r in results.values())]
    headers = ["split", "set", "n", "avg@k", "pass@k", "greedy", "reward"] + extras
    rows = []
    for split, m in results.items():
        k = m.get("k")
        reward = m.get("reward_mean", m.get("greedy_reward_mean"))
        rows.append([split, "OOD" if m.get("ood") else "ID", str(m.get("n_examples", "—")),
                     _pct(m.get("avg@k")) + (f" @{k}" if k else ""),
                     _pct(m.get("pass@k")) + (f" @{k}" if k else ""),
                     _pct(m.get("greedy_accuracy")),
                     "—" if reward is None else f"{reward:.2f}"]
                    + [_pct(m.get(x)) for x in extras])
    return headers, rows


def results_table(results: dict[str, dict], title: str = "Evaluation") -> Table:
    """A rich table of split -> metrics for the terminal."""
    headers, rows = table_rows(results)
    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    return table
