"""Outputs published whole: written under a hidden temporary name, fsynced, then renamed into place.

The order is PostgreSQL's: write the temporary file(s), fsync each file, rename over the final name, fsync the
directory. After a crash or power loss at any point the final name holds either the previous complete output or
the new complete one, never a partial file; a write error (disk full: ENOSPC, EFBIG from RLIMIT_FSIZE) removes the
temporary and raises CheckpointError (exit 2) naming the output, with the previous one intact.
"""

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


KEPT_CHECKPOINTS = "Earlier checkpoints are intact; resume from the newest with --resume."


@contextlib.contextmanager
def atomic_dir(final: Path, kept: str = KEPT_CHECKPOINTS) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it to `final` only if the block succeeds. `kept` ends the
    message of a write error (what the user still has)."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    old = final.with_name(f".old-{final.name}")
    if old.is_dir() and not final.exists():  # a run killed between the two renames below: the previous is back
        os.replace(old, final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        _fsync_tree(tmp)  # the data is on disk before the rename makes it a checkpoint, even if the machine dies
        if final.exists():  # replacing e.g. checkpoint-final: move the old one aside first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(final.parent)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, e, kept) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, tmp: Path | None = None, kept: str | None = None) -> Iterator[Path]:
    """Yield a hidden temporary path beside `final` (or `tmp`) to write; `publish_file` it to `final` if the block
    succeeds, remove it otherwise. A write error is a CheckpointError naming `final`; the previous file is intact."""
    final = Path(final)
    tmp = Path(tmp) if tmp else final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        yield tmp
        publish_file(tmp, final)
    except WRITE_ERRORS as e:
        raise _write_error(final, e, kept or (f"The previous {final.name} is intact." if final.exists() else
                                              f"Nothing was written under the name {final.name}.")) from e
    finally:
        tmp.unlink(missing_ok=True)


def publish_file(tmp: Path, final: Path) -> None:
    """Make the completely written file `tmp` the file `final`: fsync its data, rename it over `final` (atomic on
    POSIX), fsync the directory so that the rename itself survives a power loss."""
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(Path(final).parent)


def write_text_atomic(final: Path, text: str) -> None:
    """`final` replaced by `text` as a whole (a report, a JSON file): never a half-written file."""
    with atomic_file(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_error(final: Path, e: BaseException, kept: str) -> CheckpointError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return CheckpointError(f"Cannot write {final}: {reason}. Is the disk full ({_free_space(Path(final).parent)}) or "
                           f"the directory not writable? {kept}")



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
