"""Starting, stopping and resuming runs from the page: `finetune train RECIPE key=value...` (or `finetune sweep`)
as a child process whose output goes to a log file the page streams.

Overrides are checked with `load_recipe`, the CLI's own schema and messages, before anything starts; each
message is attached to the override it is about (the schema names the command-line override it came from),
so the page shows it next to that key. A run started here always writes under RUNS_DIR: `output_dir` is set to
RUNS_DIR/<name> unless given (and a given one outside RUNS_DIR is refused). Stop sends SIGTERM, on which
`finetune train` finishes the step, writes a checkpoint and exits 143; resume runs the run's own recipe.yaml
with --resume.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import RecipeError


class OverrideErrors(Exception):
    """The overrides (or the recipe) do not validate: `by_key` maps an override's key to its messages."""

    def __init__(self, by_key: dict[str, list[str]], general: list[str]):
        super().__init__("; ".join([m for ms in by_key.values() for m in ms] + general))
        self.by_key, self.general = by_key, general


def _attach(message: str, overrides: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split a RecipeError's lines between the overrides they name and the rest."""
    by_key: dict[str, list[str]] = {}
    general = []
    lines = message.splitlines()
    for line in lines[1:] if len(lines) > 1 and lines[0].startswith("Invalid recipe") else lines:
        item = next((o for o in overrides if f"'{o}'" in line), None)
        if item is None:
            general.append(line)
        else:
            by_key.setdefault(item.split("=", 1)[0].strip(), []).append(line)
    return by_key, general


def validate(recipe: Path, overrides: list[str], runs_dir: Path, resume: bool = False) -> list[str]:
    """The overrides to run with (output_dir added), or OverrideErrors. Loads no model library. A fresh run
    into a directory that holds an earlier one is refused here (train would refuse it too, after starting)."""
    from finetune.recipe import load_recipe

    try:
        r = load_recipe(recipe, overrides)
    except RecipeError as e:
        raise OverrideErrors(*_attach(str(e), overrides)) from None
    given = any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides)
    out = Path(r.output_dir).resolve() if given else runs_dir.resolve() / (r.name or "run")
    if given and runs_dir.resolve() not in out.parents:
        raise OverrideErrors({"output_dir": [f"output_dir must be inside the board's runs directory "
                                             f"{runs_dir.resolve()} (got {out})."]}, [])
    if not resume and ((out / "metrics.jsonl").exists() or any(out.glob("checkpoint-*"))):
        key = "output_dir" if given else "name"
        raise OverrideErrors({key: [f"{out} already holds a run ({key} {r.output_dir if given else r.name!r}); "
                                    f"give another {key} (or resume that run from its row)."]}, [])
    return list(overrides) if given else [*overrides, f"output_dir={out}"]


def grid_points(overrides: list[str]) -> list[list[str]]:
    """`finetune sweep`'s grid (key=v1,v2): each value once, the other keys at their first value (what validating
    every point would find, in fewer checks). A value in brackets or braces is one value."""
    split = []
    for o in overrides:
        key, _, value = o.partition("=")
        values = [value] if value.strip().startswith(("[", "{")) else value.split(",")
        split.append((key, values))
    points = [[f"{k}={vs[0]}" for k, vs in split]]
    for i, (k, vs) in enumerate(split):
        for v in vs[1:]:
            points.append([f"{k}={v}" if j == i else p for j, p in enumerate(points[0])])
    return points


@dataclass
class Job:
    id: int
    kind: str  # train | sweep
    argv: list[str]
    log: Path
    run_id: str | None
    proc: subprocess.Popen
    started: float = field(default_factory=time.time)

    def state(self) -> dict:
        code = self.proc.poll()
        return {"id": self.id, "kind": self.kind, "argv": self.argv, "run": self.run_id, "started": self.started,
                "pid": self.proc.pid, "running": code is None, "exit_code": code}


class Jobs:
    """The processes this board started (in memory; their logs stay in RUNS_DIR/.board/)."""

    def __init__(self, runs_dir: Path, cwd: Path | None = None):
        self.runs_dir, self.cwd = runs_dir, cwd or Path.cwd()
        self.jobs: dict[int, Job] = {}
        self.ids = itertools.count(1)
        self.has_sweep: bool | None = None

    def start(self, kind: str, args: list[str], run_id: str | None) -> Job:
        n = next(self.ids)
        logs = self.runs_dir / ".board"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"job-{os.getpid()}-{n}.log"
        argv = [sys.executable, "-m", "finetune", kind, *args]
        env = {**os.environ, "COLUMNS": "160", "PYTHONUNBUFFERED": "1", "FINETUNE_PROGRESS_INTERVAL": "2"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        job = Job(n, kind, ["finetune", kind, *args], log, run_id, proc)
        self.jobs[n] = job
        return job

    def train(self, recipe: Path, overrides: list[str], resume: bool = False) -> Job:
        final = validate(recipe, overrides, self.runs_dir, resume)
        out = Path(next(o for o in final if o.startswith("output_dir=")).split("=", 1)[1])
        run_id = out.resolve().relative_to(self.runs_dir.resolve()).as_posix()
        return self.start("train", [str(recipe), *final, *(["--resume"] if resume else [])], run_id)

    def sweep(self, recipe: Path, overrides: list[str]) -> Job:
        for point in grid_points(overrides):
            from finetune.recipe import load_recipe

            try:
                load_recipe(recipe, point)
            except RecipeError as e:
                raise OverrideErrors(*_attach(str(e), [*point, *overrides])) from None
        return self.start("sweep", [str(recipe), *overrides], None)

    def sweep_available(self) -> bool:
        """Whether this installation has `finetune sweep` (its --help exits 0); asked once."""
        if self.has_sweep is None:
            try:
                done = subprocess.run([sys.executable, "-m", "finetune", "sweep", "--help"], cwd=self.cwd,
                                      capture_output=True, timeout=120)
                self.has_sweep = done.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                self.has_sweep = False
        return self.has_sweep

    def log(self, job_id: int, offset: int = 0) -> tuple[str, int]:
        with open(self.jobs[job_id].log, "rb") as f:
            f.seek(offset)
            data = f.read()
        return data.decode("utf-8", "replace"), offset + len(data)

    def stop(self, pid: int) -> None:
        """SIGTERM: `finetune train` finishes its step, checkpoints and exits 143."""
        job = next((j for j in self.jobs.values() if j.proc.pid == pid), None)
        if job is not None:
            job.proc.send_signal(signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)

    def stop_all(self, timeout: float = 60) -> None:
        """Stop what is still running (each writes its checkpoint) and reap it; kill what outlives `timeout`."""
        for job in self.jobs.values():
            if job.proc.poll() is None:
                job.proc.send_signal(signal.SIGTERM)
        for job in self.jobs.values():
            try:
                job.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                job.proc.kill()
