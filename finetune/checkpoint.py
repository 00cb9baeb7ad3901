"""Checkpoints: adapter + tokenizer + records, written atomically.

A checkpoint directory is first written under a hidden temporary name and renamed
into place only once complete, so a crash mid-write never leaves a directory that
looks like a checkpoint. Layout of a run directory:

    runs/<name>/recipe.yaml          the resolved recipe
    runs/<name>/metrics.jsonl        one JSON line per logging step / eval
    runs/<name>/checkpoint-<step>/   adapter_config.json, adapter_model.safetensors,
                                     tokenizer files, recipe.yaml, trainer_state.json
    runs/<name>/checkpoint-final/    the same, at the end of training
    runs/<name>/summary.json         written last: the run finished
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from finetune.errors import CheckpointError


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it to `final` only if the block succeeds."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if final.exists():  # replacing e.g. checkpoint-final: move the old one aside first
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"Cannot write {final}: {e.strerror or e}. Earlier checkpoints are intact.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(path: Path, model, tokenizer, recipe_yaml: str, state: dict) -> Path:
    """Write a PEFT adapter checkpoint that plain `PeftModel.from_pretrained` loads."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        write_json(tmp / "trainer_state.json", state)
    return path


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to train over an earlier run in the same directory, unless asked to overwrite."""
    finished = (run_dir / "summary.json").exists()
    earlier = finished or (run_dir / "metrics.jsonl").exists() or any(run_dir.glob("checkpoint-*"))
    if earlier and not overwrite:
        what = "a finished run (summary.json)" if finished else "an unfinished run (metrics, checkpoints)"
        raise CheckpointError(
            f"{run_dir} already holds {what}. Pass --overwrite to replace it, or set "
            f"output_dir=... (or name=...) to train into a new directory."
        )
    try:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"Cannot write to the run directory {run_dir}: {e.strerror or e}.") from None
