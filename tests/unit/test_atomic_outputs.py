"""Outputs are never lost: existing folders are refused unless they are our own output of the same kind,
an interrupted swap is rolled back on the next run, stale temporaries of dead processes are removed, and a
full disk is a typed error naming the path (issue 8, findings 1, 9 and 10)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import deltatune.io.atomic as atomic
from deltatune.errors import DiskFull, OutputExists
from deltatune.io.atomic import atomic_dir, atomic_file, is_disk_full, recover_dir
from deltatune.io.outputs import MARKER, guard_output, read_marker
from deltatune.io.shards import write_sharded


def _write(tmp: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (tmp / name).write_text(text)


def _contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir() if p.name != MARKER}


def _siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --------------------------------------------------------------------------------------------------
# finding 1: which existing folders may be replaced
# --------------------------------------------------------------------------------------------------
def test_atomic_dir_marks_its_output_and_replaces_its_own_earlier_output(tmp_path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target, "delta") as tmp:
        _write(tmp, {"a.txt": "1", "b.txt": "1"})
    assert read_marker(target) == {"kind": "delta", "files": ["a.txt", "b.txt"]}
    with atomic_dir(target, "delta") as tmp:
        _write(tmp, {"a.txt": "2"})
    assert _contents(target) == {"a.txt": "2"}
    assert read_marker(target)["files"] == ["a.txt"]
    assert _siblings(tmp_path) == ["out"]


def test_unrelated_folder_is_refused_and_kept(tmp_path) -> None:
    target = tmp_path / "v"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    refused = pytest.raises(OutputExists, match=r"v is not empty and is not a deltatune output .*notes\.txt.*overwrite")
    with refused, atomic_dir(target, "peft") as tmp:
        _write(tmp, {"adapter_config.json": "{}"})
    assert _contents(target) == {"notes.txt": "mine"}
    assert _siblings(tmp_path) == ["v"]


def test_overwrite_replaces_an_unrelated_folder(tmp_path) -> None:
    target = tmp_path / "v"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with atomic_dir(target, "peft", overwrite=True) as tmp:
        _write(tmp, {"adapter_config.json": "{}"})
    assert _contents(target) == {"adapter_config.json": "{}"}
    assert _siblings(tmp_path) == ["v"]


def test_output_of_another_kind_is_refused(tmp_path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target, "checkpoint") as tmp:
        _write(tmp, {"model.safetensors": "x"})
    refused = pytest.raises(OutputExists, match="holds a deltatune checkpoint output, not a delta one")
    with refused, atomic_dir(target, "delta"):
        pass
    assert _contents(target) == {"model.safetensors": "x"}


def test_a_file_added_to_an_earlier_output_is_not_deleted(tmp_path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target, "delta") as tmp:
        _write(tmp, {"manifest.json": "{}"})
    (target / "README.md").write_text("my notes")
    refused = pytest.raises(OutputExists, match=r"not part of its earlier delta output \(README\.md\)")
    with refused, atomic_dir(target, "delta") as tmp:
        _write(tmp, {"manifest.json": "{}"})
    assert (target / "README.md").read_text() == "my notes"


def test_output_that_appears_during_the_build_is_not_replaced(tmp_path) -> None:
    target = tmp_path / "out"
    with pytest.raises(OutputExists), atomic_dir(target, "delta") as tmp:
        _write(tmp, {"manifest.json": "{}"})
        target.mkdir()
        (target / "theirs.txt").write_text("x")
    assert _contents(target) == {"theirs.txt": "x"}
    assert _siblings(tmp_path) == ["out"]


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_missing_or_empty_target_is_fine(tmp_path, state: str) -> None:
    target = tmp_path / "out"
    if state == "empty":
        target.mkdir()
    guard_output(target, "delta")
    with atomic_dir(target, "delta") as tmp:
        _write(tmp, {"x": "1"})
    assert _contents(target) == {"x": "1"}


def test_guard_names_a_file_target_and_cuts_long_listings(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExists, match="is a file, not a folder"):
        guard_output(tmp_path / "file", "delta")
    guard_output(tmp_path / "file", "delta", overwrite=True)
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    for i in range(50):
        (crowded / (f"{i:02d}-" + "n" * 200)).write_text("x")
    with pytest.raises(OutputExists) as info:
        guard_output(crowded, "delta")
    message = str(info.value)
    assert "(50 entries)" in message and len(message) < 500 and "00-nnn" in message


def test_broken_marker_counts_as_no_marker(tmp_path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / MARKER).write_text(json.dumps({"kind": "delta", "files": "manifest.json"}))
    (target / "manifest.json").write_text("{}")
    with pytest.raises(OutputExists, match="is not a deltatune output"):
        guard_output(target, "delta")


def test_write_sharded_refuses_a_foreign_folder(tmp_path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.bin").write_bytes(b"123")
    tensors = [("w", torch.ones(3))]
    with pytest.raises(OutputExists, match="keep.bin"):
        write_sharded(target, tensors, 1 << 20)
    assert (target / "keep.bin").read_bytes() == b"123"
    write_sharded(target, tensors, 1 << 20, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "model.safetensors"]
    write_sharded(target, [("w", torch.zeros(3))], 1 << 20)  # its own earlier output: replaced
    assert read_marker(target) == {"kind": "checkpoint", "files": ["model.safetensors"]}


# --------------------------------------------------------------------------------------------------
# finding 10: interrupted swaps and stale temporaries
# --------------------------------------------------------------------------------------------------
def test_failed_second_rename_restores_the_previous_version(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out"
    with atomic_dir(target, "delta") as tmp:
        _write(tmp, {"a": "old"})
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("simulated failure between the two renames")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="between the two renames"), atomic_dir(target, "delta") as tmp:
        _write(tmp, {"a": "new"})
    monkeypatch.undo()
    assert _contents(target) == {"a": "old"}
    assert _siblings(tmp_path) == ["out"]


CRASH_BETWEEN_RENAMES = """
import os, sys
import deltatune.io.atomic as atomic
real = os.replace
def replace(src, dst):
    real(src, dst)
    if os.path.basename(dst).startswith(".checkpoint.old-"):
        os._exit(9)  # killed right after the first rename of the swap: the target is gone, .old- holds it
atomic.os.replace = replace
with atomic.atomic_dir(sys.argv[1], "checkpoint") as tmp:
    (tmp / "step.txt").write_text("new")
"""


def test_crash_between_the_renames_is_rolled_back_by_the_next_run(tmp_path) -> None:
    target = tmp_path / "checkpoint"
    with atomic_dir(target, "checkpoint") as tmp:
        _write(tmp, {"step.txt": "old"})
    done = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAMES, str(target)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    left = _siblings(tmp_path)
    assert "checkpoint" not in left and any(".checkpoint.old-" in n for n in left), left
    assert recover_dir(target) is True
    assert _contents(target) == {"step.txt": "old"}
    assert _siblings(tmp_path) == ["checkpoint"]
    with atomic_dir(target, "checkpoint") as tmp:  # and the output is writable again as usual
        _write(tmp, {"step.txt": "newer"})
    assert _contents(target) == {"step.txt": "newer"}


def test_next_atomic_dir_rolls_back_a_hand_made_crash_state(tmp_path) -> None:
    pid = _dead_pid()
    old = tmp_path / f".ckpt.old-{pid}-abcd1234"
    new = tmp_path / f".ckpt.tmp-{pid}-efgh5678"
    for folder, text in ((old, "previous"), (new, "unfinished")):
        folder.mkdir()
        (folder / "state.json").write_text(text)
        (folder / MARKER).write_text(json.dumps({"kind": "train_checkpoint", "files": ["state.json"]}))
    seen = {}
    with atomic_dir(tmp_path / "ckpt", "train_checkpoint") as tmp:
        seen.update(_contents(tmp_path / "ckpt"))  # rolled back before the new version is built
        _write(tmp, {"state.json": "next"})
    assert seen == {"state.json": "previous"}
    assert _contents(tmp_path / "ckpt") == {"state.json": "next"}
    assert _siblings(tmp_path) == ["ckpt"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path) -> None:
    dead = _dead_pid()
    big = tmp_path / f".out.tmp-{dead}-big00001"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as fh:  # a large leftover (sparse file: cheap to make)
        fh.truncate(100 << 20)
    (tmp_path / f".out.old-{dead}-x1").mkdir()
    (tmp_path / f".out.tmp-{dead}-file0001").write_text("leftover of atomic_file")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.tmp-{sleeper.pid}-live0001"
        live.mkdir()
        legacy_old = tmp_path / ".out.tmp-k3j4h5g6"
        legacy_old.mkdir()
        hour_ago = time.time() - 2 * atomic.LEGACY_STALE_S
        os.utime(legacy_old, (hour_ago, hour_ago))
        legacy_new = tmp_path / ".out.old-a1b2c3d4"
        legacy_new.mkdir()
        other = tmp_path / f".other.tmp-{dead}-zzzz0000"
        other.mkdir()
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "x").write_text("1")
        assert recover_dir(tmp_path / "out") is False  # the target exists: nothing to roll back
        assert _siblings(tmp_path) == sorted([live.name, legacy_new.name, other.name, "out"])
        assert _contents(tmp_path / "out") == {"x": "1"}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_temporaries_of_a_live_process_are_not_restored(tmp_path) -> None:
    """A writer still in the middle of its swap (alive) keeps its backup; nothing is moved under it."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        old = tmp_path / f".out.old-{sleeper.pid}-abcd0000"
        old.mkdir()
        assert recover_dir(tmp_path / "out") is False
        assert _siblings(tmp_path) == [old.name]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_temporaries_are_named_after_the_writer_pid(tmp_path) -> None:
    with atomic_dir(tmp_path / "out", "delta") as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}-")
    with atomic_file(tmp_path / "f.json") as tmp:
        assert tmp.name.startswith(f".f.json.tmp-{os.getpid()}-")
        tmp.write_text("{}")
    assert (tmp_path / "f.json").read_text() == "{}"


# --------------------------------------------------------------------------------------------------
# a pid in a temporary's name is not enough: our own pid counts only for the temporaries this process is
# using right now, and a running pid only if it started when the writer did (pids are reused: a container's
# entrypoint is PID 1 on every restart)
# --------------------------------------------------------------------------------------------------
def _start_time(pid: int) -> int:
    """The start time of ``pid`` as /proc/PID/stat gives it (field 22); skips the test where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        pytest.skip("needs /proc/PID/stat (process start times)")
    return int(text[text.rindex(b")") + 1:].split()[19])


def _saved_version(folder: Path, text: str) -> None:
    folder.mkdir()
    (folder / "state.json").write_text(text)
    (folder / MARKER).write_text(json.dumps({"kind": "checkpoint", "files": ["state.json"]}))


@pytest.mark.parametrize("tagged", [False, True], ids=["old_format_name", "with_our_start_time"])
def test_a_backup_with_our_own_pid_that_we_did_not_make_is_rolled_back(tmp_path, tagged: bool) -> None:
    """A restarted container gets the same pid as the writer that died between the renames: the backup is
    still rolled back (before the fix our own pid always counted as a live writer: the checkpoint stayed lost)."""
    tag = f"S{_start_time(os.getpid())}_" if tagged else ""
    old = tmp_path / f".ckpt.old-{os.getpid()}-{tag}abcd1234"
    _saved_version(old, "previous")
    (tmp_path / f".ckpt.tmp-{os.getpid()}-{tag}efgh5678").mkdir()  # the half-built new version: removed
    assert recover_dir(tmp_path / "ckpt") is True
    assert _contents(tmp_path / "ckpt") == {"state.json": "previous"}
    assert _siblings(tmp_path) == ["ckpt"]


def test_an_interrupt_between_the_renames_puts_the_previous_version_back(tmp_path, monkeypatch) -> None:
    """Ctrl-C right after the first rename of the swap (a notebook, a long search): the previous version is back at
    once, not left as a backup that this long-lived process would count as its own live write."""
    target = tmp_path / "out"
    with atomic_dir(target, "delta") as tmp:
        _write(tmp, {"a": "old"})
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if os.path.basename(dst).startswith(".out.old-"):
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), atomic_dir(target, "delta") as tmp:
        _write(tmp, {"a": "new"})
    monkeypatch.undo()
    assert _contents(target) == {"a": "old"}
    assert _siblings(tmp_path) == ["out"]


def test_a_backup_of_a_reused_pid_is_rolled_back(tmp_path) -> None:
    """The pid in the backup's name runs, but it started at another time than the writer: a reused pid."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        began = _start_time(sleeper.pid)
        old = tmp_path / f".ckpt.old-{sleeper.pid}-S{began - 1}_abcd1234"
        _saved_version(old, "previous")
        (tmp_path / f".ckpt.tmp-{sleeper.pid}-S{began - 1}_efgh5678").mkdir()
        live = tmp_path / f".ckpt.tmp-{sleeper.pid}-S{began}_live0001"  # the running process's own: kept
        live.mkdir()
        assert recover_dir(tmp_path / "ckpt") is True
        assert _contents(tmp_path / "ckpt") == {"state.json": "previous"}
        assert _siblings(tmp_path) == sorted(["ckpt", live.name])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_temporaries_of_an_exited_unreaped_process_are_stale(tmp_path) -> None:
    """A writer killed between the renames whose parent has not reaped it yet (a zombie) writes nothing more."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 60
        while Path(f"/proc/{zombie.pid}/stat").read_bytes().split(b")")[-1].split()[0] != b"Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        _saved_version(tmp_path / f".ckpt.old-{zombie.pid}-abcd1234", "previous")
        assert recover_dir(tmp_path / "ckpt") is True
        assert _contents(tmp_path / "ckpt") == {"state.json": "previous"}
    except FileNotFoundError:
        pytest.skip("needs /proc/PID/stat")
    finally:
        zombie.wait()


PAUSE_BETWEEN_RENAMES = """
import os, sys, time
import deltatune.io.atomic as atomic
real = os.replace
def replace(src, dst):
    real(src, dst)
    if os.path.basename(dst).startswith(".out.old-"):
        open(sys.argv[2], "w").close()
        while not os.path.exists(sys.argv[3]):  # hold the swap half done until the test lets go
            time.sleep(0.02)
atomic.os.replace = replace
with atomic.atomic_dir(sys.argv[1], "delta") as tmp:
    (tmp / "a").write_text("new")
"""


def test_a_live_swap_of_another_process_is_left_alone(tmp_path) -> None:
    """Another running process is between its two renames (named with its real pid and start time): recovery must
    neither restore its backup nor delete its new version, and its swap then completes."""
    work = tmp_path / "work"
    target = work / "out"
    with atomic_dir(target, "delta") as tmp:
        _write(tmp, {"a": "old"})
    paused, go = tmp_path / "paused", tmp_path / "go"
    writer = subprocess.Popen([sys.executable, "-c", PAUSE_BETWEEN_RENAMES, str(target), str(paused), str(go)],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            if writer.poll() is not None:
                pytest.fail(f"the writer exited before its swap: {writer.stderr.read()}")
            assert time.monotonic() < deadline, "the writer did not reach its swap"
            time.sleep(0.02)
        left = _siblings(work)
        assert "out" not in left and len(left) == 2, left
        if Path("/proc").is_dir():  # the names carry the writer's real start time
            assert all(f"-{writer.pid}-S{_start_time(writer.pid)}_" in n for n in left), left
        assert recover_dir(target) is False
        assert _siblings(work) == left
        go.touch()
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    finally:
        go.touch()
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert _contents(target) == {"a": "new"}
    assert _siblings(work) == ["out"]


def test_our_own_write_in_progress_is_left_alone(tmp_path) -> None:
    """Recovery run meanwhile (another thread writing the same target) does not touch this process's temporary."""
    target = tmp_path / "out"
    with atomic_dir(target, "delta") as tmp:
        _write(tmp, {"a": "1"})
        assert recover_dir(target) is False
        assert tmp.is_dir() and _contents(tmp) == {"a": "1"}
    assert _contents(target) == {"a": "1"}
    with atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("{}")
        recover_dir(tmp_path / "f.json")
        assert tmp.exists()
    assert _siblings(tmp_path) == ["f.json", "out"]


# --------------------------------------------------------------------------------------------------
# finding 9: a full disk is DiskFull naming the path
# --------------------------------------------------------------------------------------------------
class SafetensorError(Exception):
    """Stands in for safetensors' Rust-side error type (same message shape)."""


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                    'on device" })'),
    RuntimeError("I/O error: No space left on device (os error 28)"),
], ids=["oserror", "safetensors", "runtime"])
def test_disk_full_while_writing_is_typed_and_keeps_the_previous_output(tmp_path, error: Exception) -> None:
    target = tmp_path / "out"
    with atomic_dir(target, "delta") as tmp:
        _write(tmp, {"a": "previous"})
    full = pytest.raises(DiskFull, match=f"disk full .* while writing {target}")
    with full as info, atomic_dir(target, "delta") as tmp:
        _write(tmp, {"a": "half"})
        raise error
    assert info.value.__cause__ is error
    assert _contents(target) == {"a": "previous"}
    assert _siblings(tmp_path) == ["out"]


def test_other_errors_are_not_disk_full(tmp_path) -> None:
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("shape mismatch 28"))
    wrapped = ValueError("could not save")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)
    with pytest.raises(PermissionError), atomic_dir(tmp_path / "out", "delta"):
        raise PermissionError(errno.EACCES, "Permission denied")


def test_atomic_file_disk_full(tmp_path) -> None:
    with pytest.raises(DiskFull, match="f.json"), atomic_file(tmp_path / "f.json"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KiB tmpfs (root and mount(8) needed; skipped otherwise)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode()[:80]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_really_full_disk_keeps_the_previous_checkpoint(tiny_disk) -> None:
    target = tiny_disk / "ckpt"
    write_sharded(target, [("w", torch.ones(256))], 1 << 20)
    before = (target / "model.safetensors").read_bytes()
    big = [(f"layer.{i}.weight", torch.randn(8192)) for i in range(4)]  # 128 KiB: does not fit
    with pytest.raises(DiskFull, match=f"while writing {target}"):
        write_sharded(target, big, 1 << 20)
    assert (target / "model.safetensors").read_bytes() == before
    assert _siblings(tiny_disk) == ["ckpt"]


def test_outputs_get_the_modes_a_plain_write_would_not_the_temps_private_ones(tmp_path) -> None:
    import stat

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out", "delta") as d:
            (d / "x.txt").write_text("x")
        with atomic_file(tmp_path / "history.json") as f:
            f.write_text("{}")
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        kept.chmod(0o640)
        with atomic_file(kept) as f:
            f.write_text("[]")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "history.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "[]"
