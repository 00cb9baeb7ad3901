"""Checkpoints: adapter + tokenizer + records, written atomically.

A checkpoint directory is first written under a hidden temporary name and renamed
into place only once complete, so a crash mid-write never leaves a directory that
looks like a checkpoint. Layout of a run directory:

    runs/<name>/recipe.yaml          the resolved recipe
    runs/<name>/metrics.jsonl        one JSON line per logging step / eval
    runs/<name>/checkpoint-<step>/   adapter_config.json, adapter_model.safetensors,
                                     tokenizer files, recipe.yaml, trainer_state.json,
                                     environment.json, training_state.pt (optimizer,
                                     scheduler, RNG states: what `--resume` needs),
                                     adapter_base.json (which base weights the adapter
                                     is relative to, and trained on), for PiSSA/OLoRA
                                     residual_adapter.safetensors (the adapter as trained),
                                     manifest.json (written last: size and sha256 of
                                     every file, checked on resume; verify.py)
    runs/<name>/initial_adapter/     PiSSA/OLoRA only: the adapter as initialised, B0 A0
    runs/<name>/checkpoint-final/    the same, at the end of training
    runs/<name>/summary.json         written last: the run finished
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from finetune.errors import CheckpointError, first_line
from finetune.artifacts import atomic_dir, verify_checkpoint, write_manifest

TRAINING_STATE = "training_state.pt"
RESIDUAL_ADAPTER = "residual_adapter.safetensors"  # PiSSA/OLoRA: the adapter as trained, over the residual base


def save_checkpoint(path: Path, model, tokenizer, records: dict[str, str | dict], training_state: dict,
                    state_dict: dict | None = None, initial_adapter: Path | None = None) -> Path:
    """Write a checkpoint: a PEFT adapter that plain `PeftModel.from_pretrained` loads, the tokenizer,
    text/JSON records (recipe, trainer state, environment) and the optimizer/scheduler/RNG state.
    `state_dict`: the full (gathered) weights when the model is sharded across processes (FSDP/ZeRO-3).

    `initial_adapter` (PiSSA/OLoRA): the adapter as initialised, B0 A0. Training ran on the residual
    W_res = W - s B0 A0 with the adapter B A, so W_res + s B A = W + s (B A - B0 A0) = W + s' [B | -B0] [A; A0]
    with s' = s (rank 2r, alpha doubled): PEFT's conversion writes that plain LoRA over the published W. The
    trained B A themselves go to RESIDUAL_ADAPTER, for resume (which rebuilds W_res by the same decomposition)."""
    with atomic_dir(path) as tmp:
        if initial_adapter is None:
            model.save_pretrained(tmp, state_dict=state_dict)
        else:
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file

            with torch.random.fork_rng(devices=[]):  # PEFT loads the initial adapter by initialising one first
                model.save_pretrained(tmp, state_dict=state_dict,
                                      path_initial_model_for_weight_conversion=str(initial_adapter))
            raw = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, state_dict).items()}
            save_file(raw, tmp / RESIDUAL_ADAPTER)
        tokenizer.save_pretrained(tmp)
        for name, content in records.items():
            if isinstance(content, dict):
                write_json(tmp / name, content)
            else:
                (tmp / name).write_text(content)
        torch.save(training_state, tmp / TRAINING_STATE)
        write_manifest(tmp)  # last: it lists exactly what was written, and is renamed into place with it
    return path


def load_training_state(path: Path) -> tuple[dict, dict]:
    """(trainer_state.json, training_state.pt contents) of a checkpoint.

    training_state.pt is read with `weights_only=True`: tensors, numbers, strings and containers only, so a
    checkpoint from someone else cannot run code on load. Only numpy's array type is allowed beyond that
    (the RNG state of checkpoints written before it was stored as a tensor)."""
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot resume from {path}: trainer_state.json is unreadable ({e}).") from None
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refusing to resume from {path}: {path / TRAINING_STATE} holds Python objects other than tensors, "
            f"numbers and containers ({_unsafe_global(e)}); loading it could run arbitrary code. Resume only from "
            f"checkpoints written by finetune, or start again with --overwrite."
        ) from None
    except (OSError, ValueError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"Cannot resume from {path}: {path / TRAINING_STATE} is unreadable "
                              f"({first_line(e)}).") from None
    return trainer_state, state


def _unsafe_global(e: Exception) -> str:
    """`it needs io.open` from torch's long message (whose advice, to allow-list it, is not for this case)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    return f"it needs {found.group(1)}" if found else first_line(e)


def _numpy_array_globals() -> list:
    """What unpickling a plain numpy uint32 array needs (no code beyond building the array)."""
    reconstruct = getattr(np, "_core", np.core).multiarray._reconstruct
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def step_checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoint-<step>` directories, oldest first (temporary `.tmp-` and `.del-` ones never match)."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


REQUIRED_FILES = (TRAINING_STATE, "trainer_state.json", "adapter_model.safetensors")


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path:
    """`latest` = the newest complete and intact step checkpoint in the run directory; otherwise a path.
    A damaged newer checkpoint is named in a warning and skipped; a damaged named one is an error."""
    if resume != "latest":
        path = Path(resume)
        if not (path / TRAINING_STATE).is_file():
            raise CheckpointError(f"{path} is not a resumable checkpoint (no {TRAINING_STATE}); resume from a "
                                  f"checkpoint-<step> directory.")
        verdict = verify_checkpoint(path)
        if not verdict.intact:
            raise CheckpointError(f"Cannot resume from {path}: it is damaged: {'; '.join(verdict.problems)}.")
        return path
    # Written atomically, a checkpoint-<step> is complete; still, never pick one that is not (copied in part).
    found = [p for p in step_checkpoints(run_dir) if all((p / f).is_file() for f in REQUIRED_FILES)]
    if not found:
        raise CheckpointError(f"Nothing to resume: {run_dir} holds no complete checkpoint-<step> directory.")
    damaged = []
    for path in reversed(found):
        verdict = verify_checkpoint(path)
        if verdict.intact:
            if damaged:
                _warn(f"{'; '.join(damaged)}. Resuming from {path.name}, the newest intact checkpoint, instead.")
            return path
        damaged.append(f"{path.name} is damaged: {'; '.join(verdict.problems)}")
    raise CheckpointError(f"Nothing to resume in {run_dir}: every checkpoint is damaged. {'. '.join(damaged)}. "
                          f"Start again with --overwrite.")


def _warn(message: str) -> None:
    """Once per run (the main process) on stderr, beside the progress bar."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def prune_checkpoints(run_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the newest `keep` step checkpoints (and `protect`, e.g. the best one)."""
    found = step_checkpoints(run_dir)
    for old in found[: max(len(found) - keep, 0)]:
        if protect is None or old.resolve() != protect.resolve():
            doomed = old.with_name(f".del-{old.name}")  # renamed first: a half-deleted directory is never picked
            shutil.rmtree(doomed, ignore_errors=True)  # left over by a crash mid-delete
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


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


# ----------------------------------------------------------------- resume: adapter and RNG streams


def load_adapter_weights(model, checkpoint: Path) -> None:
    """The checkpoint's trained adapter weights into a PeftModel built from the same recipe."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    raw = checkpoint / RESIDUAL_ADAPTER  # PiSSA/OLoRA: the saved adapter is converted; resume the trained one
    set_peft_model_state_dict(model, load_file(raw if raw.is_file() else checkpoint / "adapter_model.safetensors"))


def keep_initial_adapter(model, initial: Path, resuming: bool, main: bool) -> None:
    """PiSSA/OLoRA: a fresh run writes the adapter as initialised (B0 A0) to `initial` (main process). On resume
    the decomposition re-run on the published weights must give those B0 A0 (so the same residual base
    W - s B0 A0), bit for bit; otherwise resuming would train on other base weights. (Randomised SVD,
    pissa_niter_N, repeats because the seed and the call order repeat.)"""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    if not resuming:
        if main:
            model.save_pretrained(initial)
        return
    saved_file = initial / "adapter_model.safetensors"
    if not saved_file.is_file():
        raise CheckpointError(f"Cannot resume: {saved_file} (the adapter as initialised, which the residual base "
                              f"is rebuilt from) is missing. Start again with --overwrite.")
    saved, now = load_file(saved_file), get_peft_model_state_dict(model)
    if saved.keys() != now.keys() or any(not torch.equal(saved[k], now[k]) for k in saved):
        raise CheckpointError(f"Cannot resume: the initialisation re-run on the base weights differs from the one "
                              f"the run started from ({initial}); the base model files or the library versions "
                              f"changed. Start again with --overwrite.")


def rng_state() -> dict:
    """This process's RNG streams: python, numpy, torch (and CUDA)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()  # the key as a tensor: loadable with weights_only
    numpy_state = [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def this_process_rng(saved: list | dict, num_processes: int, process_index: int) -> dict:
    """Each process resumes with its own RNG streams (dropout masks differ per process)."""
    if isinstance(saved, dict):  # checkpoints written before per-process RNG states
        return saved
    if len(saved) != num_processes:
        raise CheckpointError(
            f"The checkpoint was written by {len(saved)} processes, this run has {num_processes}: "
            f"resuming would change the data order and dropout. Launch {len(saved)} processes to resume it."
        )
    return saved[process_index]
