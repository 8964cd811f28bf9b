"""Atomic checkpoints: HF weights + tokenizer + trainer state, and exact resume.

runs/<name>/checkpoints/step-N/ holds what `save_pretrained` writes (so the
folder loads like any model) plus trainer_state.pt: optimizer states, the μ
controller, RNG states and data cursors. It is written to a hidden temp
folder and renamed, so a run killed mid-write leaves the previous checkpoint
intact and no half folder under a step-N name.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir: Path) -> dict[int, Path]:
    """Complete checkpoints by step (temp folders of killed writes are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return {}
    found = {}
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found[int(m.group(1))] = d
    return dict(sorted(found.items()))


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict, keep: int = 2) -> Path:
    """Write step-N atomically, then drop all but the newest `keep` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    with open(tmp / STATE_FILE, "rb") as f:
        os.fsync(f.fileno())
    replaced = _hide(final) if final.exists() else None  # re-saving a step (Ctrl-C right after a save)
    os.rename(tmp, final)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    for old_step, path in list(checkpoint_dirs(run_dir).items())[:-max(keep, 1)]:
        shutil.rmtree(_hide(path), ignore_errors=True)
    for stale in root.glob(".*-step-*"):  # temp and half-deleted folders of killed runs
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _hide(path: Path) -> Path:
    """Rename a step-N folder out of sight before deleting it: a kill during the (non-atomic)
    delete then leaves a hidden half folder, never a step-N folder without its weights."""
    hidden = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.rename(path, hidden)
    return hidden


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)


def rng_state(sampling_generator: torch.Generator) -> dict:
    """Every random stream the loop draws from."""
    state = {"torch": torch.get_rng_state(), "sampling": sampling_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, sampling_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    sampling_generator.set_state(state["sampling"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
