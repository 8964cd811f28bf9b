"""`amft` in shell scripts and CI: --json puts one JSON document on stdout and nothing else,
--fail-under sets exit code 3, usage errors exit 2 before any work, `eval --model` never writes
into the model folder, and --help documents flags, examples and exit codes."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from amft_cli import report
from amft_cli.cli import app

AMFT = str(Path(sys.executable).parent / "amft")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
README = Path(__file__).resolve().parent.parent / "README.md"


def amft(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([AMFT, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def small_sets(data_dir: Path) -> list[str]:
    sets = [f"task.data_dir={data_dir}", f"model.path={data_dir / 'model'}", "task.train_size=200",
            "task.val_size=8", "task.test_size=8", "task.ood_size=8", "train.sft_batch_size=8",
            "train.eval_limit=6", "eval.k=2"]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """(work dir, the parsed stdout of `amft train --json`) of a 2-step SFT run."""
    work = tmp_path_factory.mktemp("scripting")
    result = amft("train", "--algo", "sft", "--steps", "2", *small_sets(work / "data"), "--run-dir", "runs/r",
                  "--plain", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    return work, json.loads(result.stdout)  # the whole of stdout is one document


def test_train_json_reports_the_run(trained):
    work, doc = trained
    assert (doc["command"], doc["preset"], doc["algo"], doc["run"], doc["step"]) == ("train", "tiny-math", "sft", "runs/r", 2)
    assert doc["model"] == "runs/r/checkpoints/step-2" and (work / doc["model"] / "config.json").is_file()
    assert doc["interrupted"] is False and doc["rollouts"] == 0  # SFT samples no completions
    steps = [json.loads(line) for line in (work / "runs/r/metrics.jsonl").read_text().splitlines()]
    assert doc["train_time_s"] == pytest.approx(steps[0]["time/step_s"] + steps[1]["time/step_s"])
    summary = json.loads((work / "runs/r/summary.json").read_text())
    assert doc["metrics"]["id"] == {"n": 6, "k": 0, "greedy": summary["after"]["greedy_accuracy"]}
    assert doc["before"]["id"]["greedy"] == summary["before"]["greedy_accuracy"]


def test_eval_json_and_fail_under(trained):
    work, _ = trained
    result = amft("eval", "--ood", "--json", "--fail-under", "id.greedy=0",  # the latest run: runs/r
                  "--fail-under", "ood.pass@2=1.5", cwd=work)
    assert result.returncode == report.EXIT_BELOW_THRESHOLD, result.stderr
    doc = json.loads(result.stdout)
    assert "using the most recent run: runs/r" in result.stderr
    scores = {s: json.loads((work / "runs/r/eval" / f"{s}.json").read_text())["metrics"] for s in ("test", "ood")}
    assert doc["metrics"]["id"] == {"n": 8, "k": 2, "greedy": scores["test"]["greedy_accuracy"],
                                    "avg@k": scores["test"]["avg@k"], "pass@k": scores["test"]["pass@k"],
                                    "reward": scores["test"]["reward_mean"]}
    assert doc["metrics"]["ood"]["pass@k"] == scores["ood"]["pass@k"] and doc["splits"]["ood"]["ood"] is True
    assert (doc["run"], doc["model"], doc["step"], doc["preset"]) == ("runs/r", "runs/r/checkpoints/step-2", 2, "tiny-math")
    assert doc["files"] == [f"runs/r/eval/{s}.{ext}" for s in ("test", "ood") for ext in ("json", "samples.jsonl")]
    assert [(r["metric"], r["ok"]) for r in doc["thresholds"]] == [("id.greedy", True), ("ood.pass@2", False)]
    failed = [line for line in result.stderr.splitlines() if "below threshold" in line]
    assert failed == [f"below threshold: ood.pass@2 = {scores['ood']['pass@k']:.4g} < 1.5 (--fail-under ood.pass@2=1.5)"]


@pytest.mark.parametrize("args, fragment", [
    (["--fail-under", "id.accuracy=0.9"], "unknown metric 'accuracy'"),
    (["--fail-under", "ood.greedy=0.9"], "add --ood"),
    (["--fail-under", "id.avg@8=0.9"], "k=2 samples on test, not 8"),
    (["--greedy", "--fail-under", "id.pass@k=0.9"], "greedy only"),
])
def test_unmeasurable_thresholds_are_usage_errors_before_any_eval(trained, args, fragment):
    work, _ = trained
    before = sorted((work / "runs/r").rglob("*"))
    result = amft("eval", "--run", "runs/r", "--json", *args, cwd=work)
    assert result.returncode == report.EXIT_USAGE and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --fail-under") and fragment in lines[0], result.stderr
    assert sorted((work / "runs/r").rglob("*")) == before


def test_eval_of_a_bare_model_leaves_the_model_folder_alone(trained):
    work, _ = trained
    model = work / "data" / "model"
    before = {p: p.stat().st_mtime_ns for p in model.rglob("*")}
    model.chmod(stat.S_IRUSR | stat.S_IXUSR)  # read-only, like a shared folder or a hub cache
    try:
        result = amft("eval", "--model", str(model), "--preset", "tiny-math", *small_sets(work / "data"),
                      "--greedy", cwd=work)
    finally:
        model.chmod(stat.S_IRWXU)
    assert result.returncode == 0, result.stderr
    assert {p: p.stat().st_mtime_ns for p in model.rglob("*")} == before
    out = work / "runs" / "eval-tiny-math-model" / "eval"
    assert (out / "test.json").is_file() and (out / "test.samples.jsonl").is_file()
    assert "runs/eval-tiny-math-model/eval/test.json" in result.stdout.replace("\n", "")
    assert "<split>" not in result.stdout


# ---------------------------------------------------------------------------
# --help


def all_commands() -> list[list[str]]:
    group = typer.main.get_command(app)
    paths = [[]]
    for name, cmd in group.commands.items():
        paths.append([name])
        paths += [[name, sub] for sub in getattr(cmd, "commands", {})]
    return paths


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "amft")
def test_help_shows_flags_as_flags_and_an_example(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "Example: amft" in result.output
    assert re.search(r"--help\s+Show this message", result.output)
    if path == ["eval"]:
        assert re.search(r"--ood\s+Shortcut", result.output) and re.search(r"--greedy\s+Greedy", result.output)
    if path == ["train"]:
        assert re.search(r"--live\s+--plain\s+Force", result.output)


def test_exit_codes_in_help_and_readme_match_the_code():
    shown = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    for code, text in report.EXIT_CODES.items():
        assert re.search(rf"^\s*{code}\s+{re.escape(text)}\s*$", shown, re.M), (code, shown)
    section = README.read_text().split("### Exit codes", 1)[1].split("\n#", 1)[0]
    rows = dict(re.findall(r"^\| `?(\d+)`? \| (.+?) \|$", section, re.M))
    assert {int(c): t for c, t in rows.items()} == report.EXIT_CODES
