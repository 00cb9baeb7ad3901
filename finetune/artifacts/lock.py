"""Locks on outputs: one writer per run directory, merged model, eval report or export.

`hold(path, what)` takes an OS lock (`fcntl.flock`, exclusive, non-blocking) on `.<name>.lock` beside
`path` and keeps it for the block. The lock file sits NEXT TO the output, not inside it, because the
output may be deleted and re-created under the lock (`train --overwrite` rmtree's the run directory,
merge renames a finished temporary directory into place): the lock must outlive what it protects.
Lock files are never deleted (deleting one races with a process that just opened it); a released
one is left empty.

The file records who holds it (host, PID, command, start time) so a refused second command can name
the holder. The OS drops a flock when its process dies, however it dies, so a crashed holder never
blocks anyone; its record is still there, and the next holder warns that it took the lock over.
flock works on local filesystems and on NFSv4 (Linux emulates it with byte-range locks there).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from finetune.errors import FinetuneError


class LockedError(FinetuneError):
    """Another running command holds the output this command would write."""

    exit_code = 2


def lock_path(path: str | Path) -> Path:
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.lock")


def is_main_process() -> bool:
    """Under torchrun / accelerate launch only global rank 0 locks (and writes)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def hold(path: str | Path, what: str, warn=None) -> Iterator[Path]:
    """Hold the lock for output `path` (a file or directory, existing or not) while the block runs.

    `what` names this command in the record (e.g. "finetune train"). Raises LockedError, naming the
    holder, if another process holds it. `warn(message)` is told about a stale record (default: stderr)."""
    lock = lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise LockedError(f"Cannot create the lock file {lock} for {path}: {e.strerror or e}. Is the "
                          f"directory writable?") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockedError(f"Cannot lock {lock}: {e.strerror or e}.") from None
            raise LockedError(
                f"{path} is in use: {_describe(_read(fd))} holds its lock ({lock}). Wait for it to finish or stop "
                f"it; nothing was changed."
            ) from None
        stale = _read(fd)
        if stale:
            (warn or _stderr)(_stale_message(path, stale))
        _write(fd, {"host": socket.gethostname(), "pid": os.getpid(), "command": what,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        try:
            yield lock
        finally:
            _write(fd, None)  # released cleanly: no stale record for the next holder
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def hold_all(paths, what: str) -> Iterator[None]:
    """`hold` on each of `paths` that is not None (e.g. eval's --json and --samples)."""
    with contextlib.ExitStack() as stack:
        for p in dict.fromkeys(Path(p).absolute() for p in paths if p is not None):
            stack.enter_context(hold(p, what))
        yield


def holder(path: str | Path) -> dict | None:
    """The record of whoever holds (or last held, without releasing) the lock of `path`."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read(fd)
    finally:
        os.close(fd)


def held_by(path: str | Path) -> dict | None:
    """Who holds the lock of `path` now, without touching it (trying the lock could refuse a starting writer):
    the kernel's table of flocks (/proc/locks: "1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF")
    names the lock file's inode. Returns the holder's record (with the kernel's PID when it has one) or None.
    Without /proc/locks (not Linux), a record whose PID is alive on this host counts as held."""
    lock = lock_path(path)
    try:
        st = lock.stat()
    except OSError:
        return None
    record = holder(path) or {}
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        alive = record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int)
        return record if alive and _alive(record["pid"]) else None
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in table.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK":  # "->" lines are waiters, POSIX locks are not ours
            continue
        try:
            major, minor, inode = parts[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == want:
                pid = int(parts[4])
                return {**record, "pid": pid} if pid > 0 else record
        except ValueError:
            continue
    return None


def _read(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _write(fd: int, record: dict | None) -> None:
    os.ftruncate(fd, 0)
    if record:
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)


def _describe(record: dict | None) -> str:
    if not record:
        return "another process (no record yet: it is just starting)"
    return (f"`{record.get('command', '?')}` (PID {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"started {record.get('started', '?')})")


def _stale_message(path, record: dict) -> str:
    pid, host = record.get("pid"), record.get("host")
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        why = "that process is gone"
    else:
        why = "it no longer holds the lock"
    return (f"took over the lock of {path} left by {_describe(record)}: {why} (it ended without releasing it, "
            f"e.g. killed). Its output may be incomplete.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
