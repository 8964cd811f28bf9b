"""One writer, many readers for what `amft prepare` builds: a task's data folder and a tiny model.

Runs of one preset share its data folder (`data/tiny-math/`) and tiny base model
(`data/tiny-math/model/`), and `prepare` rebuilds either when a config differs from
what built it. So each part has a lock file: <task.data_dir>/.lock for the splits
(and a hub model's local copy), and .<name>.lock beside model.path for a tiny model.
A process that reads them (train for its whole run, eval) holds a shared flock(2) on
each; rebuilding a part takes its lock alone. A config that would rebuild a part
another process reads is refused in one line naming the keys that differ; a config
that only builds its own model folder goes ahead beside the readers. Without this,
`amft prepare --set task.test_size=50` beside a running train replaced its test split,
and the run's end-of-training score came from 50 problems while its start's came from
500 (seen 2026-11-28). Two starts that both find a part missing: one builds it, the
other waits (saying so on stderr) and reads. The kernel drops a killed process's locks.
Where no lock can be had (a read-only copy of the data, a file system without locks)
the folder is used unlocked, as before.
"""

from __future__ import annotations

import fcntl
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from amft_cli.config import Config, ConfigError
from amft_cli.data import differences, stale_parts

REFUSE_AFTER_S = 2.0  # how long a start needing a rebuild retries while others read the part
_held: dict[tuple, list] = {}  # lock files -> [{part: fd or None}, depth, created folder]: re-entrant


def lock_files(cfg: Config) -> dict[str, Path]:
    """part -> its lock file: "data" in task.data_dir, "model" beside a tiny model's folder."""
    locks = {"data": Path(cfg.task.data_dir) / ".lock"}
    if cfg.model.init == "tiny":
        model = Path(cfg.model.path)
        locks["model"] = model.parent / f".{model.name}.lock"
    return locks


def _wait_shared(fd: int, path: Path) -> None:
    """The shared lock, saying so on stderr when another process holds it to build the part."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for another amft process to finish preparing {path.parent}/ ...", file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_SH)


def _shared_lock(path: Path, create: bool) -> int | None:
    """An open lock file holding a shared flock; None where none can be had. Retried when the
    file was removed while this process waited (a failed first prepare removes its folder)."""
    for _ in range(10):
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return None
        try:
            _wait_shared(fd, path)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except OSError:
            pass
        os.close(fd)
    return None


def _refusal(cfg: Config, part: str, forcing: bool) -> ConfigError:
    folder, key = (cfg.task.data_dir, "task.data_dir") if part == "data" else (cfg.model.path, "model.path")
    why = "amft prepare --force rebuilds it" if forcing else "; ".join(differences(cfg, part)) or "files it lacks"
    return ConfigError(f"{folder}: in use by another amft process (train or eval), and this config would rebuild "
                       f"it ({why}); wait for that process to end, or give this config its own folder "
                       f"(--set {key}=...)")


def _build_alone(cfg: Config, fds: dict, build: Callable[[], object], parts: Callable[[], list[str]],
                 forcing: bool) -> None:
    """Run build holding alone the lock of every part parts() names, while it names any; shared
    locks are held again on return. Between tries nothing of those parts is held, so two starts
    that both need a part cannot block each other."""
    deadline = time.monotonic() + REFUSE_AFTER_S
    while needed := [p for p in parts() if fds.get(p) is not None]:
        for part in needed:
            fcntl.flock(fds[part], fcntl.LOCK_UN)
        busy = None
        for part in needed:
            try:
                fcntl.flock(fds[part], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = part
                break
        if busy is None:
            try:
                if parts():
                    build()
                return
            finally:
                for part in needed:
                    fcntl.flock(fds[part], fcntl.LOCK_SH)
        for part in needed:
            fcntl.flock(fds[part], fcntl.LOCK_UN)
        if time.monotonic() > deadline:
            raise _refusal(cfg, busy, forcing)
        time.sleep(random.uniform(0.05, 0.25))
        for part in needed:  # waits while another process builds
            _wait_shared(fds[part], lock_files(cfg)[part])
    if [p for p in parts() if fds.get(p) is None]:
        build()  # parts without a lock (a read-only copy): as before the locks


@contextmanager
def reading(cfg: Config, build: Callable[[], object] | None = None, parts: Callable[[], list[str]] | None = None,
            forcing: bool = False):
    """Hold shared locks on cfg's data folder and tiny model for the with-body; first, while
    parts() (default: data.stale_parts) names any, run build() holding those parts alone.
    forcing: build is `prepare --force` (said in a refusal). See the module docstring."""
    locks = lock_files(cfg)
    key = tuple(sorted(str(p.resolve()) for p in locks.values()))
    data_dir = Path(cfg.task.data_dir)
    if key not in _held:
        created = build is not None and not data_dir.exists()  # a failed first prepare then leaves no folder
        _held[key] = [{part: _shared_lock(path, build is not None) for part, path in locks.items()}, 0, created]
    _held[key][1] += 1
    try:
        if build is not None:
            _build_alone(cfg, _held[key][0], build, parts or (lambda: stale_parts(cfg)), forcing)
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            fds, _, created = _held.pop(key)
            _remove_if_only_locks(data_dir, locks) if created else None
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)  # releases the lock


def _remove_if_only_locks(folder: Path, locks: dict[str, Path]) -> None:
    """A data folder this process created and filled with nothing but its lock files goes."""
    try:
        names = {p.name for p in locks.values() if p.parent.resolve() == folder.resolve()}
        if {p.name for p in folder.iterdir()} <= names:
            for name in names:
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()
    except OSError:
        pass
