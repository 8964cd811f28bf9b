"""Atomic checkpoints: HF weights + tokenizer + trainer state, and exact resume.

runs/<name>/checkpoints/step-N/ holds what `save_pretrained` writes (so the
folder loads like any model) plus trainer_state.pt: optimizer states, the μ
controller, RNG states and data cursors. It is written to a hidden temp
folder and renamed, so a run killed mid-write leaves the previous checkpoint
intact and no half folder under a step-N name.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from amft_cli.fsio import REASONS, FileProblem, describe, disk_full, disk_note, files_as_umask, user_io

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


def resume_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of run_dir, for --resume. Without one there is nothing to
    continue: starting over would rewrite the run's metrics, so that is a one-line refusal (a
    step-N folder without its trainer state, which no save of ours leaves, is named as damaged)."""
    complete = checkpoint_dirs(run_dir)
    if complete:
        return complete[max(complete)]
    root = Path(run_dir) / "checkpoints"
    damaged = sorted(d.name for d in root.iterdir() if _STEP_DIR.match(d.name)) if root.is_dir() else []
    why = (f"{', '.join(damaged)} in {root} lack {STATE_FILE} (damaged)" if damaged
           else "it has none (stopped before its first save)")
    raise FileProblem(f"--resume {run_dir}: no complete checkpoint to continue from: {why}; --overwrite "
                      "starts the run afresh")


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict, keep: int = 2,
                    weights: dict | None = None) -> Path:
    """Write step-N atomically, then drop all but the newest `keep` checkpoints. weights: the
    model's full state dict when the model itself holds only a shard (FSDP, sharding.py).

    A failed write (full disk, Ctrl-C, a library error) removes its temp folder and
    leaves the previous checkpoints as they were; a full disk or a read-only one is
    reported in one line (FileProblem) saying which disk and how to go on.
    """
    root = Path(run_dir) / "checkpoints"
    with user_io(root, "creating the checkpoints folder"):
        root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, model, tokenizer, trainer_state, weights)
    except BaseException as e:
        full = disk_full(e, root)  # judged before the cleanup frees the space again
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            last = max(checkpoint_dirs(run_dir), default=None)
            kept = f"the last complete checkpoint is step-{last}" if last is not None else "no checkpoint yet"
            raise FileProblem(f"{root}: no space left on device writing checkpoint step-{step} "
                              f"({disk_note(root)}); removed the partial folder, {kept}: free some space, "
                              f"then `amft train --resume {run_dir}`") from None
        if isinstance(e, OSError) and e.errno in REASONS:
            raise FileProblem(describe(e, tmp, f"writing checkpoint step-{step}")) from None
        raise
    with user_io(root, f"publishing checkpoint step-{step}"):
        replaced = _hide(final) if final.exists() else None  # re-saving a step (Ctrl-C right after a save)
        os.rename(tmp, final)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    for old_step, path in list(checkpoint_dirs(run_dir).items())[:-max(keep, 1)]:
        shutil.rmtree(_hide(path), ignore_errors=True)
    for stale in root.glob(".*-step-*"):  # temp and half-deleted folders of killed runs (the run lock
        shutil.rmtree(stale, ignore_errors=True)  # guarantees none belongs to a live writer)
    return final


def _write(folder: Path, model, tokenizer, trainer_state: dict, weights: dict | None = None) -> None:
    model.save_pretrained(folder, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(folder)
    torch.save(trainer_state, folder / STATE_FILE)
    files_as_umask(folder)
    with open(folder / STATE_FILE, "rb") as f:
        os.fsync(f.fileno())


def _hide(path: Path) -> Path:
    """Rename a step-N folder out of sight before deleting it: a kill during the (non-atomic)
    delete then leaves a hidden half folder, never a step-N folder without its weights."""
    hidden = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.rename(path, hidden)
    return hidden


def load_trainer_state(checkpoint: Path) -> dict:
    """The trainer state of a checkpoint; a damaged file is a one-line FileProblem."""
    path = Path(checkpoint) / STATE_FILE
    with user_io(path, "reading the trainer state"):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torch's words for a damaged zip
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise FileProblem(f"{path}: damaged or truncated ({reason}); delete {checkpoint} to resume "
                              "from the checkpoint before it") from None


def rng_state() -> dict:
    """torch's global random streams (rollout sampling draws per row from the data cursors,
    rollout.row_uniforms, so it needs no saved state)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
