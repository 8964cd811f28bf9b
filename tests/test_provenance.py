"""The software and machine behind a run's numbers: `amft --version`, runs/<name>/environment.jsonl
(one line per start, a resume under other versions says what changed) and the versions in eval files."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from amft_cli import __version__, provenance
from amft_cli.cli import app, resolve_config
from amft_cli.train import train
from amft_runs import tiny_sets


def test_version_names_amft_its_commit_and_the_installed_packages():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert line.startswith(f"amft-cli {__version__}") and "\n" not in line
    assert f"torch {metadata.version('torch')}" in line and f"transformers {metadata.version('transformers')}" in line
    if (provenance.CHECKOUT / ".git").exists():  # a checkout (CI clones one): its commit, as git says
        head = subprocess.run(["git", "-C", str(provenance.CHECKOUT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        assert provenance.versions()["amft-cli commit"].split("+")[0] == head and f"({head}" in line


def test_a_commit_only_from_the_projects_own_checkout(tmp_path, monkeypatch):
    """A package inside some other git repository (a venv in a user's project) reports no commit."""
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / "site-packages").mkdir()
    (repo / "vendor").mkdir()  # our unpacked sdist inside their repository: its commit is not ours
    (repo / "vendor" / "pyproject.toml").write_text('[project]\nname = "amft-cli"\n')
    for checkout, project, expected in ((repo / "site-packages", None, None),   # inside another repository
                                        (repo / "vendor", None, None),
                                        (repo, 'name = "their-app"', None),     # another project's root
                                        (repo, 'name = "amft-cli"', head)):     # ours
        if project:
            (repo / "pyproject.toml").write_text(f"[project]\n{project}\n")
        monkeypatch.setattr(provenance, "CHECKOUT", checkout)
        assert provenance.source_revision() == expected
    (repo / "tracked").write_text("a")
    subprocess.run([*git, "add", "tracked"], check=True)
    assert provenance.source_revision() == head + "+dirty"


def test_changes_name_each_version_that_moved_and_only_those():
    before = {"torch": "2.12.0", "peft": None, "transformers": "5.24.0"}
    now = {"torch": "2.13.0", "peft": "0.21.2", "transformers": "5.24.0"}
    assert provenance.changes(before, now) == ["torch 2.12.0 → 2.13.0", "peft None → 0.21.2"]
    assert provenance.changes(now, dict(now)) == []


def test_a_line_cut_short_by_a_killed_start_is_not_compared(tmp_path):
    (tmp_path / provenance.ENVIRONMENT_FILE).write_text('{"step": 0, "versions": {"torch": "1.0"}}\n{"step": 3, "ver')
    assert provenance.last_start(tmp_path) is None
    assert provenance.record_start(tmp_path, {"step": 3, "versions": {"torch": "2.0"}}) == []
    # the new start is a line of its own, read back after the cut one is skipped
    assert provenance.last_start(tmp_path) == {"step": 3, "versions": {"torch": "2.0"}}
    assert provenance.trained_on(tmp_path) == [{"torch": "1.0", "device": None}, {"torch": "2.0", "device": None}]


def test_trained_on_lists_each_distinct_software_and_device_once(tmp_path):
    start = lambda torch, gpu=None: json.dumps({"versions": {"amft-cli": "0.1", "torch": torch},  # noqa: E731
                                                "accelerator": gpu, "cpu": "Xeon"})
    (tmp_path / provenance.ENVIRONMENT_FILE).write_text("\n".join(
        [start("2.12"), start("2.12"), start("2.13"), start("2.13", "H100"), start("2.12")]) + "\n")
    assert provenance.trained_on(tmp_path) == [
        {"amft-cli": "0.1", "torch": "2.12", "device": "Xeon"}, {"amft-cli": "0.1", "torch": "2.13", "device": "Xeon"},
        {"amft-cli": "0.1", "torch": "2.13", "device": "H100"}]
    assert provenance.trained_on(tmp_path / "no-such-run") == []


def test_each_start_of_a_run_records_its_software_and_a_resume_says_what_changed(tmp_path, tiny_data):
    sets = tiny_sets(tiny_data) + ["train.eval_at_end=false"]
    run = tmp_path / "run"
    train(resolve_config("tiny-math", sets + ["train.steps=3"]), run, on_message=lambda msg: None)
    path = run / provenance.ENVIRONMENT_FILE
    (first,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert first["step"] == 0 and first["processes"] == 1 and first["device"] == "cpu"
    assert first["versions"] == provenance.versions() and first["torch_threads"] == torch.get_num_threads()
    assert first["versions"]["torch"] == metadata.version("torch")
    # the run was started under an older torch: resuming says so, and records the new start
    first["versions"]["torch"] = "0.0.1"
    path.write_text(json.dumps(first) + "\n")
    messages: list[str] = []
    train(resolve_config("tiny-math", sets + ["train.steps=5"]), run, resume=True, on_message=messages.append)
    assert [m for m in messages if "other software" in m] == [
        f"resumed under other software than the last start: torch 0.0.1 → {metadata.version('torch')}"]
    starts = [json.loads(line) for line in path.read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, 3] and starts[1]["versions"] == provenance.versions()
    # the same software again: nothing to say
    messages.clear()
    train(resolve_config("tiny-math", sets + ["train.steps=6"]), run, resume=True, on_message=messages.append)
    assert not [m for m in messages if "other software" in m]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 3, 5]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_data) -> Path:
    from amft_cli.evaluate import run_eval

    cfg = resolve_config("tiny-math", tiny_sets(tiny_data))
    out = tmp_path_factory.mktemp("eval")
    run_eval(cfg, str(tiny_data / "model"), out, which="all", k=1, limit=2, progress=False)
    return out


def test_eval_files_carry_the_versions_that_scored_them(evaluated):
    for split in ("test", "ood"):
        record = json.loads((evaluated / f"{split}.json").read_text())
        assert record["versions"] == provenance.versions()
