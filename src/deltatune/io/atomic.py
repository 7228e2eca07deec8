"""Atomic writes: build in a temporary sibling, then rename over the target.

A crash (or an exception) mid-write leaves the previous file or directory intact and no partial
output behind.  Temporaries are hidden siblings named after the target and the writer's process id:
``.NAME.tmp-PID-xxxx`` (the new version being built) and ``.NAME.old-PID-xxxx`` (the previous version
during the swap).

Replacing a directory takes two renames (target → ``.old-``, ``.tmp-`` → target).  If the process dies
between them the target is missing and ``.old-`` still holds the previous version.  :func:`recover_dir`,
run before every write and by the training checkpoint loader, **rolls such a swap back**: the previous
version returns to its place (a new version counts only once its second rename is done, so the command
that wrote it never reported success).  It also removes every ``.tmp-``/``.old-`` left by a dead
process (liveness is checked on this host with ``os.kill(pid, 0)``; temporaries of live processes are
left alone; temporaries of older deltatune versions, without a pid, once they are an hour old).

A full disk (``ENOSPC``, or a safetensors/torch error saying ``os error 28`` / ``No space left``)
becomes :class:`~deltatune.errors.DiskFull` naming the target; the temporary is removed first.
Which existing folders may be replaced at all is decided by :func:`deltatune.io.outputs.guard_output`.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from deltatune.errors import DiskFull
from deltatune.io.outputs import TEMP_NAME, guard_output, write_marker

LEGACY_STALE_S = 3600.0  # temporaries without a pid (older deltatune versions) are removed after an hour
_DISK_FULL_TEXT = ("os error 28", "No space left")


def is_disk_full(exc: BaseException) -> bool:
    """``True`` when ``exc`` (or an exception it was raised from) says the disk is full."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, DiskFull) or (isinstance(cur, OSError) and cur.errno == errno.ENOSPC):
            return True
        if isinstance(cur, Exception) and any(t in str(cur) for t in _DISK_FULL_TEXT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def disk_full(path: str | Path) -> DiskFull:
    """The :class:`DiskFull` error for a write to ``path`` (raise it ``from`` the original error)."""
    return DiskFull(f"disk full (No space left on device) while writing {path}; the previous output there, "
                    "if any, is left intact")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # EPERM: someone else's live process; no such pid: not ours
        return True
    return True


def _is_stale(path: Path, pid: str | None) -> bool:
    if pid is not None:
        return not _pid_alive(int(pid))
    mtime = _mtime(path)
    return mtime > 0 and time.time() - mtime > LEGACY_STALE_S


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            path.unlink()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory
        if exc.errno in (errno.ENOSPC, errno.EIO):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def recover_dir(target: str | Path) -> bool:
    """Roll back an interrupted swap of ``target`` and remove stale temporaries; ``True`` if it restored one.

    When ``target`` is missing and a dead writer left ``.NAME.old-PID-*`` (it died between the two
    renames), the newest such backup is renamed back to ``target``.  Then every ``.NAME.tmp-*`` /
    ``.NAME.old-*`` of a dead process is deleted.  Temporaries of live processes are not touched.
    """
    target = Path(target)
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return False
    stale: list[tuple[Path, str]] = []
    for path in siblings:
        m = TEMP_NAME.match(path.name)
        if m and m["name"] == target.name and _is_stale(path, m["pid"]):
            stale.append((path, m["role"]))
    restored = False
    if not _exists(target):
        olds = sorted((p for p, role in stale if role == "old"), key=_mtime, reverse=True)
        if olds:
            try:
                os.replace(olds[0], target)
                _fsync_dir(target.parent)
                restored = True
            except FileNotFoundError:  # another process recovering the same target was quicker
                pass
            stale = [(p, r) for p, r in stale if p != olds[0]]
    for path, _ in stale:
        _remove(path)
    return restored


def _sibling(target: Path, role: str) -> Path:
    return target.parent / f".{target.name}.{role}-{os.getpid()}-{secrets.token_hex(4)}"


def _swap(tmp: Path, target: Path) -> None:
    """``tmp`` → ``target``; an existing target is kept as ``.old-`` until the new one is in place."""
    if not _exists(target):
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return
    backup = _sibling(target, "old")
    os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(backup, target)
        raise
    _fsync_dir(target.parent)
    doomed = _sibling(target, "tmp")  # a .tmp- is never restored, so a half-deleted backup cannot come back
    os.replace(backup, doomed)
    _remove(doomed)


@contextmanager
def atomic_dir(target: str | Path, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory; on success it replaces ``target`` atomically, on error it is removed.

    ``kind`` names the output ("delta", "compact", "peft", "checkpoint", "train_checkpoint", …): an
    existing non-empty ``target`` must be an earlier output of the same kind (see
    :func:`~deltatune.io.outputs.guard_output`) unless ``overwrite``.  The committed folder carries the
    marker that makes it replaceable next time.  A full disk raises :class:`DiskFull` naming ``target``.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(target)
        guard_output(target, kind, overwrite)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        _public_mode(tmp, target, folder=True)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(target) from exc
        raise
    try:
        yield tmp
        write_marker(tmp, kind)
        _fsync_tree(tmp)
        guard_output(target, kind, overwrite)  # something may have appeared there while we were writing
        _swap(tmp, target)
    except BaseException as exc:
        _remove(tmp)
        if is_disk_full(exc) and not isinstance(exc, DiskFull):
            raise disk_full(target) from exc
        raise


def _umask() -> int:
    """The process's umask: from ``/proc/self/status`` where Linux gives it (reading it by setting it would change
    it for other threads for a moment), else by setting it and putting it back."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _public_mode(tmp: Path, target: Path, folder: bool) -> None:
    """Give ``tmp`` the mode a plain ``mkdir``/``open`` would (``0o777``/``0o666`` less the umask), or the mode of the
    file it replaces: ``mkdtemp``/``mkstemp`` create private (0700/0600) entries, which would make every output
    unreadable to other users (a server under another account, a shared group folder)."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode) if not folder and target.exists() else \
            (0o777 if folder else 0o666) & ~_umask()
        os.chmod(tmp, mode)
    except OSError:
        pass  # a filesystem without modes: the temp's own mode stays


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temp file path next to ``target``; renamed over it on success (a full disk: :class:`DiskFull`)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(target)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(target) from exc
        raise
    tmp = Path(name)
    try:
        yield tmp
        _public_mode(tmp, target, folder=False)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)  # the rename itself survives a power loss
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc) and not isinstance(exc, DiskFull):
            raise disk_full(target) from exc
        raise
