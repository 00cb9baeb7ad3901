"""What the board reads from RUNS_DIR: one row per run, its metrics since an offset, and what is inside it.

A run is a directory with a `recipe.yaml` or a `metrics.jsonl` (train writes both at the start). A sweep
(`finetune sweep`) is a directory with a `sweep.json`, or named `<name>-sweep`, whose sub-directories are its
points; its runs are grouped under its name. Nothing here writes, and nothing a half-written or broken run
holds raises: the row says `damaged` with the reason.

Status, from the run's lock (finetune/artifacts/lock.py, `.<name>.lock` beside the run) and its records:
running (the lock is held), finished (summary.json, written last), interrupted (the newest checkpoint is at the
last logged step: a SIGTERM/Ctrl-C stop, resumable), failed (otherwise: an error exit, or killed, which leaves
the lock's record behind).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from finetune.artifacts import held_by, holder


class NotFound(Exception):
    """A path outside RUNS_DIR (or the recipes directory), or one that is not there: the page answers 404."""


def confined(root: Path, rel: str) -> Path:
    """`root / rel`, refused unless it resolves (symbolic links followed) inside `root` and exists."""
    root = root.resolve()
    path = (root / rel).resolve()
    if path != root and root not in path.parents or not path.exists():
        raise NotFound(rel)
    return path


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_run(path: Path) -> bool:
    return path.is_dir() and ((path / "recipe.yaml").is_file() or (path / "metrics.jsonl").is_file())


def is_sweep(path: Path) -> bool:
    return path.is_dir() and ((path / "sweep.json").is_file() or path.name.endswith("-sweep"))


def run_dirs(root: Path) -> list[tuple[Path, str | None]]:
    """(run directory, sweep name or None) for every run under `root`, sweeps' points included."""
    out = []
    for child in sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []:
        if is_sweep(child):
            out += [(p, child.name) for p in sorted(child.iterdir()) if not p.name.startswith(".") and is_run(p)]
        elif is_run(child):
            out.append((child, None))
    return out


def scan(root: Path) -> list[dict]:
    """The runs table: one row per run (see `row`)."""
    return [row(root, path, group) for path, group in run_dirs(root)]


def read_metrics(run_dir: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The metrics lines from byte `offset` on, and the offset after the last complete line: a line being
    written (no newline yet) is left for the next call, so a live run is read without gaps or repeats."""
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue  # a damaged line; the rest still plots
        if isinstance(value, dict):
            rows.append(value)
    return rows, offset + end


def checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-<step> in step order, then checkpoint-final (temporary, unfinished ones are hidden)."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir()]
    return sorted(found, key=lambda p: (1, 0) if not p.name.split("-", 1)[1].isdigit() else (0, int(p.name[11:])))


def _recipe(run_dir: Path) -> dict:
    value = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    if not isinstance(value, dict):
        raise ValueError("recipe.yaml is not a mapping")
    return value


def status(run_dir: Path, last_step: int, ckpts: list[Path]) -> str:
    if held_by(run_dir):
        return "running"
    if (run_dir / "summary.json").is_file():
        return "finished"
    if holder(run_dir):  # a record left behind: the process died without releasing its lock (killed)
        return "failed"
    steps = [int(p.name[11:]) for p in ckpts if p.name[11:].isdigit()]
    return "interrupted" if steps and max(steps) >= last_step else "failed"  # stopped with a checkpoint


def row(root: Path, run_dir: Path, group: str | None) -> dict:
    """One line of the runs table; a run whose records cannot be read is `damaged` (with `problem`)."""
    base = {"id": run_dir.relative_to(root).as_posix(), "name": run_dir.name, "group": group}
    try:
        return {**base, **_summarise(run_dir)}
    except yaml.YAMLError as e:
        return {**base, "status": "damaged", "problem": f"recipe.yaml is not valid YAML ({getattr(e, 'problem', e)})"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        return {**base, "status": "damaged", "problem": f"{type(e).__name__}: {e}"}


def _summarise(run_dir: Path) -> dict:
    recipe = _recipe(run_dir)
    metrics, _ = read_metrics(run_dir)
    ckpts = checkpoints(run_dir)
    summary = _json(run_dir / "summary.json") or {}
    training = recipe.get("training") or {}
    steps = [m["step"] for m in metrics if isinstance(m.get("step"), int)]
    last = max(steps, default=0)
    state = _json(ckpts[-1] / "trainer_state.json") if ckpts else None
    total = (state or {}).get("total_steps") or training.get("max_steps") or summary.get("steps")
    evals = [m["eval_loss"] for m in metrics if isinstance(m.get("eval_loss"), (int, float))]
    speeds = [m["tokens_per_s"] for m in metrics if isinstance(m.get("tokens_per_s"), (int, float))]
    memory = [m["memory_gib"] for m in metrics if isinstance(m.get("memory_gib"), (int, float))]
    times = [m["time"] for m in metrics if isinstance(m.get("time"), (int, float))]
    env = run_dir / "environment.json"  # rewritten by a resume: the first metrics line is earlier then
    started = min([env.stat().st_mtime if env.is_file() else (run_dir / "recipe.yaml").stat().st_mtime, *times[:1]])
    state_now = status(run_dir, last, ckpts)
    end = max(times, default=started) if state_now != "running" else time.time()
    return {
        "status": state_now,
        "objective": training.get("objective", "sft"),
        "method": (recipe.get("adapter") or {}).get("method", "lora"),
        "steps": last, "total_steps": total,
        "best_eval_loss": summary.get("best_eval_loss") or (min(evals) if evals else None),
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "peak_memory_gib": summary.get("peak_memory_gib") or max(memory, default=None),
        "started": started,
        "duration_s": max(end - started, 0.0) if times else summary.get("wall_time_s"),
        "checkpoints": [p.name for p in ckpts],
    }


def flatten(value, prefix: str = "") -> dict:
    """{"training.max_steps": 6, "data.train": [...]}: nested mappings as dotted keys (lists stay values)."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def recipe_diff(a: Path, b: Path) -> list[dict]:
    """The resolved recipes' keys whose values differ (missing on one side: None), in a's key order."""
    fa, fb = flatten(_recipe(a)), flatten(_recipe(b))
    keys = list(fa) + [k for k in fb if k not in fa]
    return [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in keys if fa.get(k) != fb.get(k)]
