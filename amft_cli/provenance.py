"""What a run ran on: the software and machine behind its numbers.

`amft --version` prints it; every start of `amft train` (fresh or --resume) appends one
line to runs/<name>/environment.jsonl, and each eval/<split>.json carries the versions
that scored it, so a figure in a table can be traced to the code that made it. A resume
under other versions says so in one line (it is allowed: a bug-fix release should not
strand a long run). Imports no torch (its version comes from the installed metadata),
so `--version` answers at once.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from amft_cli import __version__
from amft_cli.fsio import user_io

ENVIRONMENT_FILE = "environment.jsonl"
# what a training or eval number depends on; None where not installed (optional extras)
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "math-verify", "vllm")
CHECKOUT = Path(__file__).resolve().parent.parent  # the source tree, when amft_cli runs from one


def source_revision() -> str | None:
    """The git commit amft_cli runs from ("1a2b3c4", "+dirty" with uncommitted changes), or None
    when it is installed from a wheel. Only the project's own checkout counts: a package inside
    some other repository (a venv in a user's project) would report that repository's commit."""
    project = CHECKOUT / "pyproject.toml"
    if not (CHECKOUT / ".git").exists() or not project.is_file() or 'name = "amft-cli"' not in project.read_text():
        return None
    try:
        head = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        status = subprocess.run(["git", "-C", str(CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")


def versions() -> dict[str, str | None]:
    """amft-cli (and its commit), Python and PACKAGES -> version string or None."""
    found: dict[str, str | None] = {"amft-cli": __version__, "amft-cli commit": source_revision(),
                                    "python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def version_line() -> str:
    """One line for `amft --version`: amft-cli first, then what is installed of the rest."""
    v = versions()
    own = f"amft-cli {v.pop('amft-cli')}" + (f" ({v.pop('amft-cli commit')})" if v.get("amft-cli commit") else "")
    v.pop("amft-cli commit", None)
    return ", ".join([own] + [f"{name} {version}" for name, version in v.items() if version])


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(step: int, device: str, processes: int) -> dict:
    """One start of a run: the step it starts from, when, where and on what (called by a
    training process, which has torch loaded)."""
    import torch

    accelerator = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"step": step, "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "command": sys.argv, "versions": versions(), "device": device,
            "accelerator": accelerator, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processes": processes}


def changes(before: dict, now: dict) -> list[str]:
    """["torch 2.12.0 → 2.13.0", ...]: the versions that differ between two `versions()`."""
    return [f"{name} {before.get(name)} → {now.get(name)}" for name in now if before.get(name) != now.get(name)]


def _start_lines(run_dir: Path) -> list[str]:
    """The non-empty lines of run_dir's environment.jsonl, oldest first ([] without one, e.g. an older run)."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def last_start(run_dir: Path) -> dict | None:
    """The newest line of run_dir's environment.jsonl (None: no start recorded, e.g. an older run)."""
    lines = _start_lines(run_dir)
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None  # a line cut short by a killed start: nothing to compare against


def trained_on(run_dir: Path) -> list[dict]:
    """What run_dir was trained under, one dict per distinct setting, oldest first: the versions
    and `device` (the GPU's name, else the CPU's). A resume under other software adds one; a
    line cut short by a killed start is skipped; [] for a run without environment.jsonl."""
    seen: list[dict] = []
    for line in _start_lines(run_dir):
        try:
            start = json.loads(line)
        except json.JSONDecodeError:
            continue
        here = {**start.get("versions", {}), "device": start.get("accelerator") or start.get("cpu")}
        if here not in seen:
            seen.append(here)
    return seen


def record_start(run_dir: Path, start: dict) -> list[str]:
    """Append `start` (environment()) to run_dir's environment.jsonl; returns the version changes
    since the previous start (empty on a first start or with the same software)."""
    before = last_start(run_dir)
    path = Path(run_dir) / ENVIRONMENT_FILE
    cut = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(start) + "\n")  # a line cut short stays on its own
    return changes(before["versions"], start["versions"]) if before and "versions" in before else []


def note_start(run_dir: Path, step: int, device: str, processes: int, on_message) -> None:
    """Record this start of a training run (its main process); on a resume under other
    software than the last start, say what changed in one line."""
    with user_io(Path(run_dir) / ENVIRONMENT_FILE, "recording the run's software and machine"):
        changed = record_start(run_dir, environment(step, device, processes))
    if changed:
        on_message(f"resumed under other software than the last start: {'; '.join(changed)}")
