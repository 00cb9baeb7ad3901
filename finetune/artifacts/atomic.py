"""Directories published whole: written under a hidden temporary name, fsynced, then renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from finetune.errors import CheckpointError

# What a failed write raises: OSError from Python's own writes, RuntimeError from torch.save's zip writer,
# SafetensorError from the safetensors serializer (e.g. "File too large (os error 27)" or ENOSPC).
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it to `final` only if the block succeeds."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        _fsync_tree(tmp)  # the data is on disk before the rename makes it a checkpoint, even if the machine dies
        if final.exists():  # replacing e.g. checkpoint-final: move the old one aside first
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(final.parent)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(
            f"Cannot write {final}: {reason}. Is the disk full ({_free_space(final.parent)}) or the directory not "
            f"writable? Earlier checkpoints are intact; resume from the newest with --resume."
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Replace file `path` by `text` whole: written to a hidden sibling, fsynced, renamed over it (a reader, or a
    process killed mid-write, sees the old content or the new, never part of either)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(root)



def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:,.0f} MiB free there"
    except OSError:
        return "free space unknown"
