"""Math reasoning after LUFFY: OpenR1-Math-46k training data, LUFFY's eval files
as published, and the math verifier (tasks/math_grader.py).

The paper setting (preset math-qwen2.5) follows LUFFY (ElliottYan/LUFFY):
- prompt (`task.prompt = "file"`): the chat messages each row carries, LUFFY's
  system prompt (think in <think> ... </think>, answer in \\boxed{}) and the
  problem, for training and evaluation alike;
- reward (`task.grader = "luffy"`): LUFFY's reward_impl_version 3 (see
  math_grader.py for the rule and the code it follows);
- eval files: LUFFY's data/valid.all.parquet (one file, rows tagged by
  `data_source`: aime, aime25, amc, math, minerva, olympiad_bench) and
  data/valid.<source>.parquet (arc_c, gpqa, mmlu_pro), read as published from
  `task.eval_dir`. AIME24/25 and AMC repeat every problem 32 times (LUFFY's
  way of getting avg@32 from one sample per row, eval_scripts/generate_vllm.py
  averaging per data_source); here repeats are collapsed into distinct
  problems, each sampled k times (avg@k, the set's default k 32).

Ours, as knobs: `task.prompt = "instruction"` (the problem as one user message
plus a one-line \\boxed{} instruction) and `task.grader = "boxed"`.

Where this departs from LUFFY (the grader's own departures are listed in
math_grader.py):

1. Evaluation uses the training reward. LUFFY's published eval command
   (README, eval_scripts/generate_vllm.py with --add_oat_evaluate True) scores
   with OAT's boxed grader instead, grades the think split only when the
   prompt ends in "<think>\\n", and drops the system message
   (--remove_system True), relying on its released models' chat templates.
2. Multiple-choice sets are graded by letter (math_grader.py, point 1), not
   by math-verify.
3. Repeated rows are one problem sampled k times rather than k rows with one
   sample each: the same estimator, one prompt encoding instead of 32.
4. Our own layouts are read too: <eval_dir>/<name>.jsonl|parquet with
   problem/answer columns (and question/choices/answer for multiple choice),
   which rows without a chat prompt answer in the "instruction" form.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from amft_cli.tasks.base import DataError, Score, numbered_rows
from amft_cli.tasks.math_grader import (LETTERS, RULES, answer_text, fast_compare, grade,  # noqa: F401
                                        last_boxed)

MATH_INSTRUCTION = "Reason step by step, then write your final answer inside \\boxed{}."
MC_INSTRUCTION = ("Reason step by step, then write the letter of the correct option "
                  "inside \\boxed{} (for example \\boxed{A}).")
PROMPTS = ("file", "instruction")
HUB_TIMEOUT_S = 5

# name -> kind (math: free-form answer; mc: letter), avg@k default, out-of-distribution, and
# `source`, the set's data_source in LUFFY's files. Local files: see load_eval_set.
EVAL_SETS = {
    "math500": {"kind": "math", "default_k": 1, "ood": False, "source": "math"},
    "aime24": {"kind": "math", "default_k": 32, "ood": False, "source": "aime"},
    "aime25": {"kind": "math", "default_k": 32, "ood": False, "source": "aime25"},
    "amc23": {"kind": "math", "default_k": 32, "ood": False, "source": "amc"},
    "minerva": {"kind": "math", "default_k": 1, "ood": False, "source": "minerva"},
    "olympiadbench": {"kind": "math", "default_k": 1, "ood": False, "source": "olympiad_bench"},
    "arc_c": {"kind": "mc", "default_k": 1, "ood": True, "source": "arc_c"},
    "gpqa_diamond": {"kind": "mc", "default_k": 1, "ood": True, "source": "gpqa"},
    "mmlu_pro": {"kind": "mc", "default_k": 1, "ood": True, "source": "mmlu_pro"},
}
SPLITS = ("train", "val", *EVAL_SETS)


def score(example: dict, completion: str) -> Score:
    """The task verifier: `grade` against the example's gold answer, under the example's rule."""
    return grade(completion, example["answer"], rule=example["meta"].get("grader", "boxed"))


# ---------------------------------------------------------------------------
# reading rows from local files or the hub


def _read_rows(path_or_id: str, key: str) -> list[tuple[str, dict]]:
    """(where, row) of a local .parquet/.jsonl file (or a folder of them) or a hub dataset;
    `where` names the file and the 1-based line or row, for error messages."""
    if not path_or_id:
        raise ValueError(f"{key} is empty; pass --set {key}=/path/to/file.parquet (or a hub dataset id)")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.parquet")) or sorted(path.rglob("*.jsonl"))
        if not files:
            raise ValueError(f"{key} {path_or_id!r}: folder holds no .parquet or .jsonl files")
        return [pair for f in files for pair in _read_located(f, key)]
    if path.is_file():
        return _read_located(path, key)
    looks_local = path.suffix in (".parquet", ".jsonl", ".json") or path_or_id.startswith((".", "/", "~"))
    if looks_local or not re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_id):
        raise ValueError(f"{key} {path_or_id!r}: no such file (expected a local .parquet/.jsonl file "
                         "or a hub dataset id like owner/name)")
    return [(f"{path_or_id}, row {i}", row) for i, row in enumerate(_read_hub(path_or_id, key), 1)]


def _read_file(path: Path, key: str) -> list[dict]:
    return [row for _, row in _read_located(path, key)]


def _read_located(path: Path, key: str) -> list[tuple[str, dict]]:
    """(where, row) pairs of one .parquet or .jsonl file; an unreadable file is a one-line error
    naming it (and the 1-based line of a bad JSON line)."""
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise ValueError(f"{key}: {path}: not a readable parquet file ({str(e)[:200]})") from None
        return [(f"{path}, row {i}", row) for i, row in enumerate(rows, 1)]
    if path.suffix in (".jsonl", ".json"):
        try:
            return [(f"{path}, line {n}", row) for n, row in numbered_rows(path)]
        except DataError as e:
            raise ValueError(f"{key}: {e}") from None
    raise ValueError(f"{key}: {path}: expected a .parquet or .jsonl file")


def _read_hub(repo_id: str, key: str) -> list[dict]:
    """The train split of a hub dataset; fails in seconds when the hub is unreachable."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    hint = f"download it and pass --set {key}=/path/to/train.parquet"
    if not constants.HF_HUB_OFFLINE:  # offline mode: go straight to the local datasets cache
        try:
            HfApi().dataset_info(repo_id, timeout=HUB_TIMEOUT_S)
        except RepositoryNotFoundError:
            raise ValueError(f"{key} {repo_id!r}: no such dataset on the hub (or no access); {hint}") from None
        except Exception:
            raise ValueError(f"{key} {repo_id!r}: not a local file and the dataset hub is unreachable; "
                             f"{hint}") from None
    import datasets
    try:
        return datasets.load_dataset(repo_id, split="train").to_list()
    except Exception as e:
        where = "the local datasets cache (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "the hub"
        raise ValueError(f"{key} {repo_id!r}: could not load it from {where} ({type(e).__name__}); "
                         f"{hint}") from None


# ---------------------------------------------------------------------------
# prompts


def _messages_text(value, role: str) -> str | None:
    """A plain string, or the content of the last `role` message of a chat list."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        texts = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == role]
        return texts[-1] if texts else None
    return None


def _chat(value) -> list[dict] | None:
    """A chat prompt as plain {role, content} messages, or None if `value` is not one."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in value):
        return None
    return [{"role": str(m["role"]), "content": m["content"]} for m in value]


def math_prompt(problem: str) -> str:
    """The user message: the problem plus the boxed-answer instruction (unless it has one)."""
    problem = problem.strip()
    return problem if "\\boxed" in problem else f"{problem}\n\n{MATH_INSTRUCTION}"


def mc_prompt(question: str, choices: list[str]) -> str:
    """A multiple-choice user message: the question, lettered options, the boxed-letter instruction."""
    options = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(choices))
    body = f"{question.strip()}\n\n{options}" if choices else question.strip()
    return f"{body}\n\n{MC_INSTRUCTION}"


def _prompt(row: dict, style: str, instruction_form: str):
    """The chat messages the row carries ("file"), else our instruction form (a user message)."""
    chat = _chat(row.get("prompt"))
    return chat if style == "file" and chat else instruction_form


def _gold(value) -> str:
    """A gold answer as text; OlympiadBench stores a list of answers."""
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    return str(value).strip().strip("$").strip()


def _check_knobs(tcfg) -> None:
    if tcfg.prompt not in PROMPTS:
        raise ValueError(f"task.prompt: expected one of {', '.join(PROMPTS)}, got {tcfg.prompt!r}")
    if tcfg.grader not in RULES:
        raise ValueError(f"task.grader: expected one of {', '.join(RULES)}, got {tcfg.grader!r}")


# ---------------------------------------------------------------------------
# training rows


def _train_example(row: dict, i: int, where: str, key: str, style: str, grader: str) -> dict:
    problem = _messages_text(row.get("prompt"), "user")
    reward_model = row.get("reward_model")
    gold = (reward_model if isinstance(reward_model, dict) else {}).get("ground_truth", row.get("answer"))
    if problem is None or gold is None:
        raise ValueError(f"{key}: {where}: lacks a user 'prompt' or 'reward_model.ground_truth'")
    return {"id": f"row-{i}", "prompt": _prompt(row, style, math_prompt(problem)),
            "demonstration": _messages_text(row.get("target"), "assistant") or "",
            "answer": _gold(gold), "meta": {"source": row.get("data_source", ""), "grader": grader}}


def load_train(path_or_id: str, key: str = "task.train_path", style: str = "instruction",
               grader: str = "boxed") -> list[dict]:
    """OpenR1-Math-46k layout: `prompt` (chat messages or text), `target`
    (assistant message(s) or text: the demonstration), `reward_model.ground_truth`.
    style and grader: task.prompt and task.grader."""
    return [_train_example(row, i, where, key, style, grader)
            for i, (where, row) in enumerate(_read_rows(path_or_id, key))]


# ---------------------------------------------------------------------------
# eval sets: ours (<name>.jsonl|parquet) and LUFFY's (valid.*.parquet by data_source)


def _mc_fields(row: dict) -> tuple[list[str], str]:
    """(choices, answer letter) from `choices`/`options` (a list, or ARC's {text, label})
    and `answer`/`answerKey`/`reward_model.ground_truth` (a letter or a 0-based index)."""
    choices = row.get("choices", row.get("options")) or []
    if isinstance(choices, dict):
        choices = choices.get("text", [])
    answer = row.get("answer", row.get("answerKey", (row.get("reward_model") or {}).get("ground_truth", "")))
    if isinstance(answer, int):
        answer = LETTERS[answer]
    answer = str(answer).strip().strip("()")
    return [str(c) for c in choices], answer.upper() if len(answer) == 1 else answer


def _eval_example(row: dict, name: str, i: int, style: str, grader: str) -> dict:
    spec = EVAL_SETS[name]
    question = row.get("problem", row.get("question"))
    question = question if question is not None else _messages_text(row.get("prompt"), "user")
    gold = row.get("answer", row.get("final_answer", (row.get("reward_model") or {}).get("ground_truth")))
    if spec["kind"] == "mc":
        choices, gold = _mc_fields(row)
        instruction_form = mc_prompt(question or "", choices)
    else:
        instruction_form = math_prompt(question or "")
    if not question or gold in (None, ""):
        raise ValueError(f"task.eval_dir: problem {i + 1} of {name} lacks a problem/question or an answer")
    meta = {"benchmark": name, "kind": spec["kind"], "ood": spec["ood"], "k": spec["default_k"],
            "grader": grader}
    return {"id": f"{name}-{i}", "prompt": _prompt(row, style, instruction_form), "demonstration": "",
            "answer": _gold(gold), "meta": meta}


def distinct_rows(rows: list[dict]) -> list[tuple[dict, int]]:
    """(row, times it occurs) per distinct (prompt, gold), in order of first occurrence.

    LUFFY repeats each AIME/AMC problem 32 times to average 32 one-sample rows."""
    counts: dict[str, list] = {}
    for row in rows:
        gold = (row.get("reward_model") or {}).get("ground_truth", row.get("answer"))
        key = json.dumps([row.get("prompt", row.get("problem", row.get("question"))), gold],
                         sort_keys=True, default=str)
        counts.setdefault(key, [row, 0])[1] += 1
    return [(row, n) for row, n in counts.values()]


def eval_file(eval_dir: str, name: str) -> Path | None:
    """<eval_dir>/<name>.jsonl or .parquet, whichever exists."""
    for suffix in (".jsonl", ".parquet"):
        path = Path(eval_dir).expanduser() / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def luffy_rows(eval_dir: str) -> dict[str, list[dict]]:
    """Rows of LUFFY's files in eval_dir (valid.all.parquet, valid.<source>.parquet), by data_source."""
    by_source: dict[str, list[dict]] = {}
    for path in sorted(Path(eval_dir).expanduser().glob("valid.*.parquet")):
        for row in _read_file(path, "task.eval_dir"):
            by_source.setdefault(str(row.get("data_source", "")), []).append(row)
    return by_source


def available_eval_sets(eval_dir: str) -> dict[str, list[dict]]:
    """name -> raw rows of every known set in eval_dir: our <name> file first, else LUFFY's rows."""
    if not eval_dir:
        return {}
    luffy = luffy_rows(eval_dir)
    found = {}
    for name, spec in EVAL_SETS.items():
        path = eval_file(eval_dir, name)
        rows = _read_file(path, "task.eval_dir") if path else luffy.get(spec["source"])
        if rows:
            found[name] = rows
    return found


def load_eval_set(name: str, rows: list[dict], style: str = "instruction", grader: str = "boxed") -> list[dict]:
    """One benchmark's examples, repeated rows collapsed (meta.repeats says how often a row occurred).

    Math sets: `problem` (or `question`, or chat `prompt`) and `answer` (or
    `final_answer`, or `reward_model.ground_truth`). Multiple choice: `question`,
    `choices` (or `options`; a list, or ARC's {text, label}) and `answer` (a
    letter A-J or a 0-based index); without choices the question must already
    list the options (LUFFY's layout: chat `prompt`, letter in `reward_model.ground_truth`).
    style and grader: task.prompt and task.grader.
    """
    examples = []
    for i, (row, repeats) in enumerate(distinct_rows(rows)):
        example = _eval_example(row, name, i, style, grader)
        example["meta"]["repeats"] = repeats
        examples.append(example)
    return examples


def _eval_names(tcfg, found: dict) -> list[str]:
    """The requested eval sets (normalised), or every known set found in eval_dir."""
    if not tcfg.eval_sets:
        return list(found)
    names = [str(n).lower().replace("-", "_") for n in tcfg.eval_sets]
    unknown = [n for n in names if n not in EVAL_SETS]
    if unknown:
        raise ValueError(f"task.eval_sets: unknown {', '.join(unknown)} (known: {', '.join(EVAL_SETS)})")
    if not tcfg.eval_dir:
        raise ValueError("task.eval_dir is empty; point it at the folder holding "
                         f"{names[0]}.jsonl or LUFFY's valid.all.parquet (--set task.eval_dir=/path/to/evals)")
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"task.eval_sets: {missing[0]!r} not found in task.eval_dir {tcfg.eval_dir!r} "
                         f"(expected {missing[0]}.jsonl, {missing[0]}.parquet, or rows with data_source "
                         f"{EVAL_SETS[missing[0]]['source']!r} in a valid.*.parquet file)")
    return names


def _eval_splits(tcfg) -> dict[str, list[dict]]:
    found = available_eval_sets(tcfg.eval_dir)
    return {name: load_eval_set(name, found[name], tcfg.prompt, tcfg.grader) for name in _eval_names(tcfg, found)}


def build_eval_splits(tcfg) -> dict[str, list[dict]]:
    """The eval sets alone, no training file needed: those named in task.eval_sets, or all found."""
    _check_knobs(tcfg)
    splits = _eval_splits(tcfg)
    if not splits:
        raise ValueError(f"task.eval_dir {tcfg.eval_dir!r}: no eval sets found (expected LUFFY's valid.all.parquet, "
                         "valid.arc_c.parquet, valid.gpqa.parquet, or <name>.jsonl|parquet for names in "
                         f"{', '.join(EVAL_SETS)}); --set task.eval_dir=/path/to/folder")
    return splits


def build_splits(tcfg) -> dict[str, list[dict]]:
    """train, val (the last val_size rows of the train file, held out) and the eval sets."""
    _check_knobs(tcfg)
    if not tcfg.train_path:
        raise ValueError("task.train_path is empty; pass --set task.train_path=/path/to/train.parquet (or a hub "
                         "dataset id); to evaluate without a training set: amft eval, or amft prepare --eval-only")
    rows = load_train(tcfg.train_path, style=tcfg.prompt, grader=tcfg.grader)
    if len(rows) < 2:
        raise ValueError(f"task.train_path {tcfg.train_path!r}: " + ("the file has no rows" if not rows else
                         "only 1 row; training needs rows besides the task.val_size held out"))
    if not 0 < tcfg.val_size < len(rows):
        raise ValueError(f"task.val_size: expected 1..{len(rows) - 1} (the train file has {len(rows)} rows)")
    return {"train": rows[:-tcfg.val_size], "val": rows[-tcfg.val_size:], **_eval_splits(tcfg)}
