"""README's worked CI gate runs as written in a clean folder, and its exit code flips from 0 to 3
when the threshold is raised above the value it measured (only STEPS and LIMIT are shortened)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_script() -> str:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    gates = [b for b in blocks if "--fail-under" in b]
    assert len(gates) == 1, "README should hold exactly one ```sh CI script using --fail-under"
    return gates[0]


def run_gate(script: Path, cwd: Path, minimum: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "STEPS": "2", "LIMIT": "16", "MIN": minimum}
    return subprocess.run(["sh", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_readme_ci_gate_passes_then_fails_above_the_measured_value(tmp_path):
    script = tmp_path / "ci-gate.sh"
    script.write_text(readme_script())
    work = tmp_path / "clone"
    work.mkdir()

    passed = run_gate(script, work, "0")
    assert passed.returncode == 0, passed.stderr[-3000:]
    measured = json.loads((work / "eval.json").read_text())["metrics"]["id"]
    assert measured["n"] == 16 and passed.stdout.splitlines()[-1] == f"ID greedy: {measured['greedy']}"

    raised = run_gate(script, work, f"{measured['greedy'] + 0.01:.4f}")
    assert raised.returncode == 3, raised.stderr[-3000:]
    assert "below threshold: id.greedy" in raised.stderr and raised.stdout.splitlines()[-1] == f"ID greedy: {measured['greedy']}"
