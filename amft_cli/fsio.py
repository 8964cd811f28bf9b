"""The user's disks and files: an OSError while the project reads or writes them becomes one line.

A full disk, a read-only mount or a missing permission is the user's
environment, not a bug in the program. Where the project touches a file it
wraps the call in `user_io(path, doing)`, which turns such an OSError into
`FileProblem` (a ValueError, so the CLI prints one line and exits 2) naming
the file, what was being done, and for a full disk the mount point and its
free space. Every other OSError keeps its traceback.

Libraries hide the errno of a full disk (torch.save raises "unexpected pos",
safetensors a SafetensorError); `disk_full` also recognises it by the free
space left on the file system right after the failure. Imports nothing else
from the project.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EEXIST: "a file is in the way (a folder was expected there)",
    errno.EISDIR: "is a directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOLCK: "the file system does not support file locks",
    errno.EIO: "input/output error (a failing disk or network mount?)",
}
FULL = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 1 << 20  # a write that failed with less than this left ran out of space


class FileProblem(ValueError):
    """A file or disk of the user's cannot be read or written; printed as one line."""


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding path (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_note(path: Path) -> str:
    """'disk /mnt/x: 12 KiB free of 2.0 MiB'."""
    mount = mount_point(path)
    usage = shutil.disk_usage(mount)
    return f"disk {mount}: {_size(usage.free)} free of {_size(usage.total)}"


def disk_full(error: BaseException, path: Path) -> bool:
    """Did this failure of a write under `path` come from a full disk? Call it before cleaning up."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL:
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(error, Exception):  # Ctrl-C or SystemExit is not a write failure
        return False
    try:
        return shutil.disk_usage(mount_point(path)).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def describe(error: OSError, path: Path, doing: str) -> str:
    """One line: '<file>: <doing>: <reason>' (with the disk's free space when it is full)."""
    reason = REASONS.get(error.errno, error.strerror or str(error))
    if error.errno in FULL:
        reason += f" ({disk_note(path)})"
    return f"{error.filename or path}: {doing}: {reason}"


@contextmanager
def user_io(path: Path, doing: str):
    """Run a read or write of the user's file; an OSError of the environment becomes FileProblem."""
    try:
        yield
    except OSError as e:
        if e.errno not in REASONS:
            raise
        raise FileProblem(describe(e, Path(path), doing)) from None


@contextmanager
def staged_folder(target: Path):
    """Yield a new temp folder beside `target`; on success it becomes `target` (an old `target` is
    moved aside first and deleted only once the new one is in place, or put back if that fails),
    on any failure it is removed. So `target` is always absent, the old folder or the complete
    new one: never half written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_dead_stages(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is an ordinary one
        files_as_umask(tmp)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            target.rename(old)
        try:
            tmp.rename(target)
        except BaseException:
            if old.exists():
                old.rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _clear_dead_stages(target: Path) -> None:
    """What a staged_folder of a process killed with SIGKILL left beside target: its temp folder
    (.NAME-PID-xxxx) is removed, and an old folder it had moved aside (.NAME.old-PID) goes back
    to being target if target is missing (killed between its two renames), else is removed.
    Folders of live processes are theirs."""
    for path in sorted(target.parent.glob(f".{target.name}*")):
        match = re.fullmatch(rf"\.{re.escape(target.name)}(?:-(\d+)-\w+|\.old-(\d+))", path.name)
        if not match or _alive(int(match.group(1) or match.group(2))):
            continue
        if match.group(2) and not target.exists():
            path.rename(target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def files_as_umask(folder: Path) -> None:
    """Give the files in folder the mode a plain open() would (0o666 less the umask): safetensors
    writes model.safetensors 0600, so a colleague on a shared machine could not read a checkpoint
    or an export that everything else in the folder lets them read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
