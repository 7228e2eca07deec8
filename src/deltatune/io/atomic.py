"""Atomic writes: build in a temporary sibling, then rename over the target.

A crash (or an exception) mid-write leaves the previous file or directory intact and no partial
output behind.  Temporaries are hidden siblings named after the target and the writer: its process id
and, where the host gives it (Linux ``/proc/PID/stat`` field 22, clock ticks since boot), its start
time: ``.NAME.tmp-PID-SSTART_xxxx`` (the new version being built) and ``.NAME.old-PID-SSTART_xxxx``
(the previous version during the swap); without a start time ``.NAME.tmp-PID-xxxx``.

Replacing a directory takes two renames (target → ``.old-``, ``.tmp-`` → target).  If the process dies
between them the target is missing and ``.old-`` still holds the previous version.  :func:`recover_dir`,
run before every write and by the training checkpoint loader, **rolls such a swap back**: the previous
version returns to its place (a new version counts only once its second rename is done, so the command
that wrote it never reported success).  An exception or interrupt (Ctrl-C) between the renames puts
the previous version back at once.  :func:`recover_dir` also removes every ``.tmp-``/``.old-`` whose
writer is gone.  A temporary's writer counts as still using it (and it is left alone) when:

* its pid is this process's: only while this process is building or swapping it right now (a
  per-process set of the names it created and has not let go of).  Any other name with our pid was left
  by an earlier process that had the same pid (a container's entrypoint is PID 1 on every restart) or
  abandoned by this one (an interrupt), with or without a start time;
* its name has a start time: a process with that pid is running on this host, is not a zombie, and
  started at that time (another start time means the pid was reused).  Where the start time of a
  running pid cannot be read (no ``/proc``, ``hidepid``), ``os.kill(pid, 0)`` decides;
* its name has a pid but no start time (older deltatune versions, hosts without ``/proc``): any
  running, non-zombie process with that pid.  A reused pid cannot be told apart from the writer here,
  so such a temporary stays until that process exits: deleting a live writer's backup would lose the
  output, keeping a dead one's only delays the roll-back;
* its name has no pid (still older versions): it is less than an hour old.

Liveness is a question about this host: two machines must not write the same target at once.

A full disk (``ENOSPC``, or a safetensors/torch error saying ``os error 28`` / ``No space left``)
becomes :class:`~deltatune.errors.DiskFull` naming the target; the temporary is removed first.
Which existing folders may be replaced at all is decided by :func:`deltatune.io.outputs.guard_output`.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
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


#: The start-time tag a temporary's name carries after its pid (``S<ticks>_``); no older version wrote an
#: upper-case letter there (``mkdtemp``/``token_hex`` suffixes are lower-case).
_START_TAG = re.compile(r"^S(?P<start>\d+)_")
#: Names of the temporaries this process is building or swapping right now (see :func:`_claimed`).
_OWNED: set[str] = set()
_SELF: tuple[int, int | None] = (-1, None)  # (pid, start time) of this process, read once per pid (fork)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time)`` of process ``pid`` from ``/proc/PID/stat`` (fields 3 and 22; the start time in clock
    ticks after boot), or ``None`` where that cannot be read (no such process, no ``/proc``, ``hidepid``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read()
        fields = text[text.rindex(b")") + 1:].split()  # the command name (field 2) may hold spaces and ')'
        return fields[0].decode("ascii", "replace"), int(fields[19])
    except (OSError, ValueError, IndexError, OverflowError):
        return None


def _own_start() -> int | None:
    """This process's start time (``None`` where the host does not give it); re-read after a fork."""
    global _SELF
    pid = os.getpid()
    if _SELF[0] != pid:
        stat = _proc_stat(pid)
        _SELF = (pid, stat[1] if stat is not None else None)
    return _SELF[1]


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # EPERM: someone else's live process; no such pid: not ours
        return True
    return True


def _writer_alive(name: str, pid: int, start: int | None) -> bool:
    """Whether the writer of temporary ``name`` (named with ``pid`` and, if not ``None``, ``start``) may still be
    using it.  The rules are in the module docstring: our own pid only for the names in :data:`_OWNED`; another pid
    must be running and not a zombie, and must have started at ``start`` where the name and ``/proc`` give one."""
    if pid == os.getpid():
        return name in _OWNED
    stat = _proc_stat(pid)
    if stat is None:  # gone, or its /proc entry is hidden or missing: ask the kernel whether the pid exists
        return _pid_exists(pid)
    state, began = stat
    if state in ("Z", "X"):  # exited, not yet reaped: it writes nothing any more
        return False
    return start is None or began == start


def _is_stale(path: Path, m: re.Match[str]) -> bool:
    """Whether ``path`` (a temporary whose name matched ``TEMP_NAME`` as ``m``) was left by a writer that is gone."""
    if m["pid"] is not None:
        tag = _START_TAG.match(m["rand"])
        return not _writer_alive(path.name, int(m["pid"]), int(tag["start"]) if tag else None)
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

    When ``target`` is missing and a writer that is gone left ``.NAME.old-PID-*`` (it died between the two
    renames), the newest such backup is renamed back to ``target``.  Then every ``.NAME.tmp-*`` /
    ``.NAME.old-*`` whose writer is gone is deleted.  Temporaries still in use (the rules are in the module
    docstring: a live writer, or this process's own write in progress) are not touched.
    """
    target = Path(target)
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return False
    stale: list[tuple[Path, str]] = []
    for path in siblings:
        m = TEMP_NAME.match(path.name)
        if m and m["name"] == target.name and _is_stale(path, m):
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
    """A fresh name for a ``role`` (``tmp``/``old``) temporary of ``target``: ``.NAME.ROLE-PID-SSTART_xxxxxxxx``, or
    ``.NAME.ROLE-PID-xxxxxxxx`` where this host does not give process start times."""
    start = _own_start()
    tag = f"S{start}_" if start is not None else ""
    return target.parent / f".{target.name}.{role}-{os.getpid()}-{tag}{secrets.token_hex(4)}"


@contextmanager
def _claimed(path: Path) -> Iterator[Path]:
    """Mark the temporary ``path`` as this process's own work in progress (so :func:`recover_dir`, run by another
    thread, leaves it alone) for the ``with`` block; claim a name before creating it.  Once let go, a leftover with
    that name is stale even to this process."""
    _OWNED.add(path.name)
    try:
        yield path
    finally:
        _OWNED.discard(path.name)


def _swap(tmp: Path, target: Path) -> None:
    """``tmp`` → ``target``; an existing target is kept as ``.old-`` until the new one is in place.

    An exception or interrupt before the second rename is done puts the previous version back at once; a kill
    leaves the ``.old-`` for :func:`recover_dir` (the backup is let go of either way, so this process too rolls it
    back later)."""
    if not _exists(target):
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return
    with _claimed(_sibling(target, "old")) as backup:
        try:
            os.replace(target, backup)
            os.replace(tmp, target)
        except BaseException:
            # the first rename done and not the second (``tmp`` still there, or ``target`` missing): undo the first
            if _exists(backup) and (_exists(tmp) or not _exists(target)):
                os.replace(backup, target)
            raise
        _fsync_dir(target.parent)
        with _claimed(_sibling(target, "tmp")) as doomed:  # a .tmp- is never restored: a half-deleted backup
            os.replace(backup, doomed)                    # cannot come back
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
    with _claimed(_sibling(target, "tmp")) as tmp:
        with _full_disk_named(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            recover_dir(target)
            guard_output(target, kind, overwrite)
            os.mkdir(tmp, 0o700)
            _public_mode(tmp, target, folder=True)
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


@contextmanager
def _full_disk_named(target: Path) -> Iterator[None]:
    """Within the block, a full disk (``ENOSPC``) is raised as :class:`DiskFull` naming ``target``."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
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
    with _claimed(_sibling(target, "tmp")) as tmp:
        with _full_disk_named(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            recover_dir(target)
            os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
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
