"""Verified checkpoints: a manifest of every file (size, sha256), and the checks that read it.

`save_checkpoint` writes `manifest.json` last, inside the temporary directory that is renamed into
place, so a checkpoint directory is either absent or holds a manifest of exactly what was written.
Damage after that (a truncated copy, a flipped bit, a deleted file) is found by `verify_checkpoint`:

- `--resume` verifies the checkpoint it picks and falls back to the newest intact one (checkpoint.py);
- `eval`, `merge` (and `chat`/`export`) call `verify_adapter` before loading an adapter;
- `finetune verify PATH` reports on one checkpoint or every checkpoint of a run directory.

Directories without a manifest (third-party adapters, checkpoints of older versions) still load: their
safetensors files are checked for a readable header whose tensors fit in the file, their JSON files
for being JSON, so a corrupt file is an error naming it rather than a library traceback.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import CheckpointError, ModelError, first_line

MANIFEST = "manifest.json"
FORMAT = "finetune.manifest/1"


@dataclass
class Verdict:
    """What `verify_checkpoint` found in one directory."""

    path: Path
    problems: list[str] = field(default_factory=list)  # one sentence each, naming the file
    manifest: bool = False  # checked against a manifest (sha256), or only structurally
    files: int = 0

    @property
    def intact(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        how = f"{self.files} files match manifest.json" if self.manifest else "no manifest; structure checked only"
        return f"intact ({how})" if self.intact else "DAMAGED: " + "; ".join(self.problems)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record every file under `directory` (but the manifest): call it last, before the atomic rename."""
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n")


def verify_checkpoint(path: str | Path) -> Verdict:
    """Check a checkpoint (or adapter) directory against its manifest, or structurally without one."""
    path = Path(path)
    verdict = Verdict(path)
    if not path.is_dir():
        verdict.problems.append(f"{path} is not a directory")
        return verdict
    manifest = path / MANIFEST
    if not manifest.is_file():
        for f in sorted(path.iterdir()):
            problem = structural_problem(f)
            if problem:
                verdict.problems.append(problem)
        return verdict
    verdict.manifest = True
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        verdict.problems.append(f"{manifest} is unreadable ({e}); expected the JSON file list written with the "
                                "checkpoint")
        return verdict
    verdict.files = len(listed)
    for name, expected in listed.items():
        verdict.problems += _file_problems(path / name, expected)
    return verdict


def _file_problems(file: Path, expected: dict) -> list[str]:
    if not file.is_file():
        return [f"{file} is missing (the manifest lists it: {expected['size']:,} bytes)"]
    size = file.stat().st_size
    if size != expected["size"]:
        return [f"{file} has {size:,} bytes, expected {expected['size']:,} (truncated or overwritten)"]
    found = sha256(file)
    if found != expected["sha256"]:
        changed = f"{file} has sha256 {found[:16]}..., expected {expected['sha256'][:16]}..."
        return [changed + " (same size: its contents changed)"]
    return []


def structural_problem(file: Path) -> str | None:
    """Without a manifest: a .safetensors file must have a readable header whose tensors fit in the file,
    a .json file must parse. None when the file looks sound."""
    if file.suffix == ".json" and file.is_file():
        try:
            json.loads(file.read_text())
        except (OSError, ValueError, RecursionError) as e:
            return f"{file} is not valid JSON ({first_line(e)[:200]})"
    if file.suffix == ".safetensors" and file.is_file():
        return _safetensors_problem(file)
    return None


def _safetensors_problem(file: Path) -> str | None:
    """safetensors' own header check (safe_open parses and validates the header in Rust and maps, never reads, the
    data): every tensor's dtype x shape must equal its byte range, the ranges must tile the rest of the file exactly.
    A header that claims a huge tensor or offsets past the end is refused without allocating anything."""
    from safetensors import safe_open

    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            return f"{file} is truncated or not safetensors: its header claims {n:,} bytes, the file has {size:,}"
        with safe_open(str(file), "pt"):
            pass
    except (OSError, struct.error) as e:
        return f"{file} is not a readable safetensors file ({e})"
    except Exception as e:  # SafetensorError: invalid header, overflowing shape, file not fully covered
        return f"{file} is truncated or damaged (safetensors: {first_line(e)}; the file has {size:,} bytes)"
    return None


def verify_adapter(path: str | Path) -> None:
    """Before loading an adapter (eval, merge, chat, export): raise ModelError naming a damaged file."""
    verdict = verify_checkpoint(path)
    if not verdict.intact:
        raise ModelError(
            f"The adapter {path} is damaged: {'; '.join(verdict.problems)}. Use another checkpoint (`finetune "
            f"verify {Path(path).parent}` lists the intact ones) or copy it again."
        )


@dataclass
class Report:
    """`finetune verify`: one verdict per checkpoint."""

    path: Path
    verdicts: list[Verdict]

    @property
    def damaged(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.intact]


def verify(path: str | Path) -> Report:
    """`finetune verify PATH`: a checkpoint directory, or every checkpoint of a run directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; give a checkpoint or a run directory.")
    if (path / MANIFEST).is_file() or (path / "adapter_config.json").is_file():
        return Report(path, [verify_checkpoint(path)])
    found = [p for p in sorted(path.glob("checkpoint-*"), key=_step_order) if p.is_dir()]
    if not found:
        raise CheckpointError(f"{path} holds no checkpoint: expected adapter_config.json / {MANIFEST} in it, or "
                              "checkpoint-* directories (a run directory).")
    return Report(path, [verify_checkpoint(p) for p in found])


def print_verdicts(report: Report, console) -> None:
    """`finetune verify`'s lines: ok or damaged, the checkpoint, what was found (paths are text, not markup)."""
    from rich.markup import escape

    for v in report.verdicts:
        mark = "[green]ok[/]     " if v.intact else "[bold red]damaged[/]"
        console.print(f"{mark} {escape(str(v.path))}: {escape(v.summary())}", highlight=False, soft_wrap=True)


def check_report(report: Report) -> None:
    """Raise (exit 2) when `finetune verify` found damage."""
    if report.damaged:
        raise CheckpointError(f"{len(report.damaged)} of {len(report.verdicts)} checkpoint(s) in {report.path} "
                              f"are damaged: {', '.join(v.path.name for v in report.damaged)}.")


def _step_order(p: Path) -> tuple[int, int]:
    tail = p.name.split("-", 1)[1]
    return (0, int(tail)) if tail.isdigit() else (1, 0)
