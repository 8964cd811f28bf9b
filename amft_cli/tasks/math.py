"""Math reasoning after LUFFY: OpenR1-Math-46k training data, math and
multiple-choice eval sets, and a time-bounded math-verify grader.

Grading (`grade`): the answer is the last `\\boxed{...}` in the text after the
last `</think>`; the gold answer is parsed first, then the prediction, then
`math_verify.verify(gold, pred)`. Reward 1.0 when correct, else 0.0.

Where this departs from LUFFY's reward code:

1. A completion without `</think>` is graded on its whole text (LUFFY-style
   thinking models close the tag; the tiny models and plain instruct models
   never open one, and they share this grader).
2. Plain integers/decimals on both sides skip math-verify (`fast_compare`):
   RL scores hundreds of completions per step and math-verify costs
   milliseconds each. The shortcut only answers where math-verify's verdict
   is certain, and defers to it otherwise.
3. A gold answer that is one capital letter A-J is a multiple-choice answer:
   the boxed letter is compared directly (case-insensitive).

Time bound: math-verify's own signal timers (`parsing_timeout`,
`timeout_seconds`), which only work in the main thread; from another thread
the timers are off (math-verify refuses them there) and only the answer
length cap bounds the work. Any exception becomes a Score, never a crash.
"""

from __future__ import annotations

import functools
import re
import threading
from fractions import Fraction
from itertools import product
from pathlib import Path

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from amft_cli.tasks.base import Score, read_jsonl

THINK_END = "</think>"
MATH_INSTRUCTION = "Reason step by step, then write your final answer inside \\boxed{}."
MC_INSTRUCTION = ("Reason step by step, then write the letter of the correct option "
                  "inside \\boxed{} (for example \\boxed{A}).")
PARSE_TIMEOUT_S = 1   # per parse; math-verify's default of 5 s is too slow for RL batches
VERIFY_TIMEOUT_S = 2  # per gold/prediction pair; symbolic simplification may need a moment
MAX_ANSWER_CHARS = 1000  # longer boxed answers are wrong without parsing (keeps work bounded)
HUB_TIMEOUT_S = 5

# name -> kind (math: free-form answer; mc: letter), avg@k default, out-of-distribution.
# Local files: <eval_dir>/<name>.jsonl or .parquet (see load_eval_set for the columns).
EVAL_SETS = {
    "math500": {"kind": "math", "default_k": 1, "ood": False},
    "aime24": {"kind": "math", "default_k": 32, "ood": False},
    "aime25": {"kind": "math", "default_k": 32, "ood": False},
    "amc23": {"kind": "math", "default_k": 32, "ood": False},
    "minerva": {"kind": "math", "default_k": 1, "ood": False},
    "olympiadbench": {"kind": "math", "default_k": 1, "ood": False},
    "arc_c": {"kind": "mc", "default_k": 1, "ood": True},
    "gpqa_diamond": {"kind": "mc", "default_k": 1, "ood": True},
    "mmlu_pro": {"kind": "mc", "default_k": 1, "ood": True},
}
SPLITS = ("train", "val", *EVAL_SETS)
LETTERS = "ABCDEFGHIJ"


# ---------------------------------------------------------------------------
# answer extraction


def answer_text(completion: str) -> str:
    """The text after the last `</think>`, or the whole text when there is none."""
    return completion.rsplit(THINK_END, 1)[-1]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces matched; None if absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    begin = start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None  # cut off before the closing brace


_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def fast_compare(gold: str, pred: str) -> bool | None:
    """math-verify's verdict on two plain numbers, without calling it; None = unsure.

    Integers compare exactly, as math-verify compares two sympy Integers. With a decimal on either side math-verify rounds both to
    6 decimals, so here only exact equality (correct) and a gap of at least
    1e-5 (wrong) are decided, for values under 1e6 with at most 12
    significant digits, where float error (< 1e-9) cannot flip the rounding.
    """
    gold, pred = gold.strip(), pred.strip()
    if not (_NUMBER.fullmatch(gold) and _NUMBER.fullmatch(pred)):
        return None
    if "." not in gold and "." not in pred:
        return int(gold) == int(pred) if max(len(gold), len(pred)) <= MAX_ANSWER_CHARS else None
    if max(len(re.sub(r"\D", "", s).lstrip("0")) for s in (gold, pred)) > 12:
        return None
    g, p = Fraction(gold), Fraction(pred)
    if max(abs(g), abs(p)) >= 10**6:
        return None
    if g == p:
        return True
    return False if abs(g - p) >= Fraction(1, 10**5) else None


def _mc_letter(answer: str) -> str | None:
    """The option letter in a boxed answer: `B`, `(b)`, `\\text{B}`, `B.`; else None."""
    text = answer
    for _ in range(3):  # unwrap nested \text{\textbf{B}}
        text = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", text)
    text = text.strip().strip("$").strip()
    m = re.fullmatch(r"\(?\s*([A-Ja-j])\s*\)?\s*[.:]?", text)
    return m.group(1).upper() if m else None


def _gold_letter(gold: str) -> str | None:
    text = gold.strip().strip("()").strip()
    return text if len(text) == 1 and text in LETTERS else None


# ---------------------------------------------------------------------------
# grading


def _timeouts() -> tuple[int | None, int | None]:
    # math-verify's timers use signal.alarm, which exists only in the main thread
    if threading.current_thread() is threading.main_thread():
        return PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S
    return None, None


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int | None) -> tuple:
    """Parsed gold answers; cached because a group's rollouts share one gold."""
    boxed = gold if "\\boxed" in gold else "\\boxed{" + gold + "}"
    return tuple(parse(boxed, parsing_timeout=timeout_s, raise_on_error=True))


def _math_verify(gold: str, pred: str) -> Score:
    """Gold parsed first, then the prediction, then verify on each pair."""
    parse_s, verify_s = _timeouts()
    info = {"pred": pred, "via": "math_verify"}
    try:
        golds = _parse_gold(gold, parse_s)
        if not golds:
            return Score(0.0, "wrong", {**info, "error": "gold answer not parseable"})
        preds = parse("\\boxed{" + pred + "}", parsing_timeout=parse_s, raise_on_error=True)
        if not preds:
            return Score(0.0, "wrong", {**info, "error": "answer not parseable"})
        for g, p in product(golds, preds):
            try:
                if verify(g, p, timeout_seconds=verify_s, raise_on_error=True):
                    return Score(1.0, "correct", info)
            except Exception:  # one failed comparison (sympy error): try the other forms
                continue
    except TimeoutException:  # a BaseException: `except Exception` would miss it
        return Score(0.0, "timeout", {**info, "error": "math-verify time limit"})
    return Score(0.0, "wrong", info)


def _grade(completion: str, gold: str, fast: bool) -> Score:
    pred = last_boxed(answer_text(completion))
    if pred is None or not pred.strip():
        return Score(0.0, "malformed", {"pred": pred, "error": "no \\boxed{} answer"})
    if len(pred) > MAX_ANSWER_CHARS:
        return Score(0.0, "wrong", {"pred": pred[:100], "error": "answer too long"})
    letter = _gold_letter(gold)
    if letter is not None:
        ok = _mc_letter(pred) == letter
        return Score(float(ok), "correct" if ok else "wrong", {"pred": pred, "via": "letter"})
    verdict = fast_compare(gold, pred) if fast else None
    if verdict is not None:
        return Score(float(verdict), "correct" if verdict else "wrong", {"pred": pred, "via": "fast"})
    return _math_verify(gold, pred)


def grade(completion: str, gold: str, fast: bool = True) -> Score:
    """Reward 1.0 if the last boxed answer after `</think>` equals `gold`, else 0.0.

    Statuses: correct, wrong, malformed (no or empty `\\boxed{}`), timeout
    (math-verify ran out of time). `fast=False` forces math-verify even for
    plain numbers (tests compare both paths).
    """
    gold = str(gold).strip().strip("$").strip()
    try:
        return _grade(completion, gold, fast)
    except TimeoutException:
        return Score(0.0, "timeout", {"error": "math-verify time limit"})
    except Exception as e:  # never str(e): printing a huge sympy object can hang
        return Score(0.0, "wrong", {"error": type(e).__name__})


def score(example: dict, completion: str) -> Score:
    """The task verifier: `grade` against the example's gold answer."""
    return grade(completion, example["answer"])


# ---------------------------------------------------------------------------
# reading rows from local files or the hub


def _read_rows(path_or_id: str, key: str) -> list[dict]:
    """Rows of a local .parquet/.jsonl file (or a folder of them) or a hub dataset."""
    if not path_or_id:
        raise ValueError(f"{key} is empty; pass --set {key}=/path/to/file.parquet (or a hub dataset id)")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.parquet")) or sorted(path.rglob("*.jsonl"))
        if not files:
            raise ValueError(f"{key} {path_or_id!r}: folder holds no .parquet or .jsonl files")
        return [row for f in files for row in _read_file(f, key)]
    if path.is_file():
        return _read_file(path, key)
    looks_local = path.suffix in (".parquet", ".jsonl", ".json") or path_or_id.startswith((".", "/", "~"))
    if looks_local or not re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_id):
        raise ValueError(f"{key} {path_or_id!r}: no such file (expected a local .parquet/.jsonl file "
                         "or a hub dataset id like owner/name)")
    return _read_hub(path_or_id, key)


def _read_file(path: Path, key: str) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        try:
            return read_jsonl(path)
        except ValueError:
            raise ValueError(f"{key} {str(path)!r}: not valid JSON lines") from None
    raise ValueError(f"{key} {str(path)!r}: expected a .parquet or .jsonl file")


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
# examples


def _messages_text(value, role: str) -> str | None:
    """A plain string, or the content of the last `role` message of a chat list."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        texts = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == role]
        return texts[-1] if texts else None
    return None


def math_prompt(problem: str) -> str:
    """The user message: the problem plus the boxed-answer instruction (unless it has one)."""
    problem = problem.strip()
    return problem if "\\boxed" in problem else f"{problem}\n\n{MATH_INSTRUCTION}"


def _gold(value) -> str:
    """A gold answer as text; OlympiadBench stores a list of answers."""
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    return str(value).strip().strip("$").strip()


def _train_example(row: dict, i: int, key: str) -> dict:
    messages = row.get("prompt")
    problem = _messages_text(messages, "user")
    gold = (row.get("reward_model") or {}).get("ground_truth", row.get("answer"))
    if problem is None or gold is None:
        raise ValueError(f"{key}: row {i} lacks a user 'prompt' or 'reward_model.ground_truth'")
    system = None if isinstance(messages, str) else _messages_text(messages, "system")
    meta = {"source": row.get("data_source", "")}
    if system:
        meta["system"] = system  # kept for callers that want LUFFY's system prompt
    return {"id": f"row-{i}", "prompt": math_prompt(problem),
            "demonstration": _messages_text(row.get("target"), "assistant") or "",
            "answer": _gold(gold), "meta": meta}


def load_train(path_or_id: str, key: str = "task.train_path") -> list[dict]:
    """OpenR1-Math-46k layout: `prompt` (chat messages or text), `target`
    (assistant message(s) or text: the demonstration), `reward_model.ground_truth`."""
    return [_train_example(row, i, key) for i, row in enumerate(_read_rows(path_or_id, key))]


def mc_prompt(question: str, choices: list[str]) -> str:
    """A multiple-choice user message: the question, lettered options, the boxed-letter instruction."""
    options = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(choices))
    body = f"{question.strip()}\n\n{options}" if choices else question.strip()
    return f"{body}\n\n{MC_INSTRUCTION}"


def _mc_fields(row: dict) -> tuple[list[str], str]:
    """(choices, answer letter) from `choices`/`options` (a list, or ARC's {text, label})
    and `answer`/`answerKey` (a letter or a 0-based index)."""
    choices = row.get("choices", row.get("options")) or []
    if isinstance(choices, dict):
        choices = choices.get("text", [])
    answer = row.get("answer", row.get("answerKey", ""))
    if isinstance(answer, int):
        answer = LETTERS[answer]
    answer = str(answer).strip().strip("()")
    return [str(c) for c in choices], answer.upper() if len(answer) == 1 else answer


def _eval_example(row: dict, name: str, i: int) -> dict:
    spec = EVAL_SETS[name]
    question = row.get("problem", row.get("question"))
    question = question if question is not None else _messages_text(row.get("prompt"), "user")
    gold = row.get("answer", row.get("final_answer", (row.get("reward_model") or {}).get("ground_truth")))
    if spec["kind"] == "mc":
        choices, gold = _mc_fields(row)
        prompt = mc_prompt(question or "", choices)
    else:
        prompt = math_prompt(question or "")
    if not question or gold in (None, ""):
        raise ValueError(f"task.eval_dir: {name} row {i} lacks a problem/question or an answer")
    return {"id": f"{name}-{i}", "prompt": prompt, "demonstration": "", "answer": _gold(gold),
            "meta": {"benchmark": name, "kind": spec["kind"], "ood": spec["ood"], "k": spec["default_k"]}}


def eval_file(eval_dir: str, name: str) -> Path | None:
    """<eval_dir>/<name>.jsonl or .parquet, whichever exists."""
    for suffix in (".jsonl", ".parquet"):
        path = Path(eval_dir).expanduser() / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def load_eval_set(name: str, eval_dir: str) -> list[dict]:
    """One benchmark from <eval_dir>/<name>.jsonl|parquet.

    Math sets: `problem` (or `question`, or chat `prompt`) and `answer` (or
    `final_answer`, or `reward_model.ground_truth`). Multiple choice: `question`,
    `choices` (or `options`; a list, or ARC's {text, label}) and `answer` (a
    letter A-J or a 0-based index); without choices the question must already
    list the options.
    """
    path = eval_file(eval_dir, name)
    if path is None:
        raise ValueError(f"task.eval_sets: {name!r} not found in task.eval_dir {eval_dir!r} "
                         f"(expected {name}.jsonl or {name}.parquet)")
    return [_eval_example(row, name, i) for i, row in enumerate(_read_file(path, "task.eval_dir"))]


def _eval_names(tcfg) -> list[str]:
    """The requested eval sets (normalised), or the defaults present in eval_dir."""
    if not tcfg.eval_sets:
        return [n for n in EVAL_SETS if tcfg.eval_dir and eval_file(tcfg.eval_dir, n)]
    names = [str(n).lower().replace("-", "_") for n in tcfg.eval_sets]
    unknown = [n for n in names if n not in EVAL_SETS]
    if unknown:
        raise ValueError(f"task.eval_sets: unknown {', '.join(unknown)} (known: {', '.join(EVAL_SETS)})")
    if not tcfg.eval_dir:
        raise ValueError("task.eval_dir is empty; point it at the folder holding "
                         f"{names[0]}.jsonl (--set task.eval_dir=/path/to/evals)")
    return names


def build_splits(tcfg) -> dict[str, list[dict]]:
    """train, val (the last val_size rows of the train file, held out) and the eval sets.

    Math prompts are always chat-style user messages, so `tcfg.format` does not change them.
    """
    rows = load_train(tcfg.train_path)
    if not 0 < tcfg.val_size < len(rows):
        raise ValueError(f"task.val_size: expected 1..{len(rows) - 1} (the train file has {len(rows)} rows)")
    splits = {"train": rows[:-tcfg.val_size], "val": rows[-tcfg.val_size:]}
    for name in _eval_names(tcfg):
        splits[name] = load_eval_set(name, tcfg.eval_dir)
    return splits
