"""Running one point: `finetune train` in a child process, its state in `sweep-state.json`, signals forwarded.

Each point trains in `<sweep dir>/<point>/` (its own run directory: recipe.yaml, metrics.jsonl, checkpoints,
summary.json), its output appended to `<sweep dir>/logs/<point>.log`. A point whose summary.json exists has
finished and is never run again; one with a step checkpoint continues with `--resume` (train's exact resume);
one that left only metrics starts over with `--overwrite`.

The child runs in its own session (a Ctrl-C at the terminal reaches the driver only) and is told by the kernel
to stop with SIGTERM if the driver dies (`PR_SET_PDEATHSIG`, Linux), so a killed driver leaves no orphan
training on; SIGINT/SIGTERM to the driver are forwarded to the child, which checkpoints and exits, and the
driver then exits 130/143 with the point left to resume.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.artifacts import hold, write_text_atomic
from finetune.errors import CheckpointError, FinetuneError, TrainingInterrupted
from finetune.sweep.results import read_metrics

STATE = "sweep-state.json"
SCHEMA = "finetune.sweep-state/1"
DONE = ("finished", "pruned")  # never run again; failed and interrupted points are retried on a restart
LOCK_WAIT_S = 120.0
ECHO_S = 30.0  # seconds between progress lines of a training point
_AGAIN = "run the same `finetune sweep` command again to go on (finished points are kept)."


@dataclass
class PointState:
    name: str
    overrides: dict[str, str]
    status: str = "pending"  # pending | running | finished | failed | pruned | interrupted
    reason: str | None = None
    attempts: int = 0
    pid: int | None = None
    trial: int | None = None  # the Optuna trial number (--search)

    def args(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.overrides.items()]


@dataclass
class SweepState:
    """sweep-state.json: what the sweep is (recipe, fixed overrides, mode) and where each point stands."""

    path: Path
    recipe: str
    fixed: list[str]
    mode: str  # "grid" or "search <ranges and axes>"
    digest: str  # sha256 of the resolved recipe (with the fixed overrides): an edited recipe is another sweep
    points: list[PointState] = field(default_factory=list)

    def save(self) -> None:
        body = {"schema": SCHEMA, "recipe": self.recipe, "fixed": self.fixed, "mode": self.mode,
                "recipe_sha256": self.digest, "points": [asdict(p) for p in self.points]}
        write_text_atomic(self.path, json.dumps(body, indent=2) + "\n")

    def point(self, name: str) -> PointState | None:
        return next((p for p in self.points if p.name == name), None)


def open_state(sweep_dir: Path, recipe: str, fixed: list[str], mode: str, digest: str) -> SweepState:
    """The state of an earlier run of this same sweep, or a new one; a different sweep there is refused."""
    path = sweep_dir / STATE
    if not path.exists():
        return SweepState(path, recipe, fixed, mode, digest)
    try:
        body = json.loads(path.read_text())
        points = [PointState(**p) for p in body["points"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a sweep state file ({e}); pass --overwrite to start the sweep "
                              f"again.") from None
    again = "pass --overwrite to replace it, or set name=... to sweep into another directory"
    if (body.get("fixed"), body.get("mode")) != (fixed, mode):
        raise CheckpointError(
            f"{sweep_dir} holds a different sweep (overrides {' '.join(body.get('fixed') or []) or 'none'}, "
            f"{body.get('mode')}); {again}.")
    if body.get("recipe_sha256") != digest:
        raise CheckpointError(f"{recipe} has changed since the sweep in {sweep_dir} began (its finished points "
                              f"trained another recipe); {again}.")
    return SweepState(path, recipe, fixed, mode, digest, points)


class Signals:
    """While the sweep runs: SIGINT/SIGTERM are remembered and forwarded to the running child (a second one too:
    train stops at once on its second signal, its last checkpoint intact)."""

    def __init__(self):
        self.received = 0
        self.child: subprocess.Popen | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.received = self.received or signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
        elif self.child is None:  # between points: nothing to wait for
            raise TrainingInterrupted(f"Sweep interrupted between points; {_AGAIN}", 128 + signum)

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the driver dies (Linux prctl PR_SET_PDEATHSIG = 1)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class PointRunner:
    """Runs points of one sweep: `run(point, monitor)` returns the point's final status (and saves the state)."""

    sweep_dir: Path
    recipe: Path
    fixed: list[str]
    state: SweepState
    signals: Signals
    say: Callable[[str], None]

    def run(self, p: PointState, monitor: Callable[[Path], str | None] | None = None, label: str = "") -> str:
        if self.signals.received:  # stopped as the previous point finished
            raise TrainingInterrupted(f"Sweep interrupted before {p.name}; {_AGAIN}", 128 + self.signals.received)
        run_dir = self.sweep_dir / p.name
        if (run_dir / "summary.json").exists():  # finished, maybe just before a crash recorded it
            p.status, p.reason, p.pid = "finished", None, None
            self.state.save()
            return p.status
        _wait_for_lock(run_dir, self.say)
        mode = ["--resume"] if _resumable(run_dir) else ["--overwrite"] if run_dir.exists() else []
        cmd = [sys.executable, "-m", "finetune", "train", str(self.recipe), *self.fixed, *p.args(),
               f"output_dir={run_dir}", f"name={run_dir.parent.name}-{p.name}", *mode]
        log_path = self.sweep_dir / "logs" / f"{p.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            start = log.tell()
            child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509 (no threads)
            self.signals.child = child
            p.status, p.pid, p.attempts, p.reason = "running", child.pid, p.attempts + 1, None
            self.state.save()
            self.say(f"{label}{p.name}: {'resuming' if mode == ['--resume'] else 'training'} (log {log_path})")
            pruned = self._wait(child, run_dir, monitor)
        self.signals.child = None
        p.pid = None
        if pruned:
            p.status, p.reason = "pruned", pruned
        elif child.returncode == 0 and (run_dir / "summary.json").exists():
            p.status = "finished"
        elif self.signals.received:
            p.status, p.reason = "interrupted", f"stopped by signal {self.signals.received}"
        else:
            p.status, p.reason = "failed", _reason(log_path, start, child.returncode)
        self.state.save()
        if p.status == "interrupted":
            raise TrainingInterrupted(
                f"Sweep interrupted during {p.name} (it resumes from its newest checkpoint); {_AGAIN}",
                128 + self.signals.received)
        return p.status

    def _wait(self, child: subprocess.Popen, run_dir: Path, monitor) -> str | None:
        """Wait for the child, telling its progress every ECHO_S seconds; `monitor(run_dir)` (search pruning)
        may return a reason to stop it."""
        pruned, echoed, told = None, time.monotonic(), 0
        while True:
            try:
                child.wait(timeout=0.5)
                return pruned
            except subprocess.TimeoutExpired:
                pass
            if monitor is not None and pruned is None and not self.signals.received:
                pruned = monitor(run_dir)
                if pruned:
                    child.send_signal(signal.SIGTERM)  # train checkpoints and stops after this step
            if time.monotonic() - echoed > ECHO_S:
                echoed, told = time.monotonic(), self._echo(run_dir, told)

    def _echo(self, run_dir: Path, told: int) -> int:
        """One line on the newest logged step (and eval loss) of the point, if it moved on; returns that step."""
        metrics = read_metrics(run_dir / "metrics.jsonl")
        train = [m for m in metrics if "loss" in m]
        if not train or train[-1]["step"] <= told:
            return told
        evals = [m for m in metrics if "eval_loss" in m]
        last = train[-1]
        self.say(f"{run_dir.name}: step {last['step']} loss {last['loss']:.4f}"
                 + (f", eval loss {evals[-1]['eval_loss']:.4f} at step {evals[-1]['step']}" if evals else ""))
        return last["step"]


def _resumable(run_dir: Path) -> bool:
    return any(p.is_dir() and p.name.split("-", 1)[1].isdigit() for p in run_dir.glob("checkpoint-*"))


def _wait_for_lock(run_dir: Path, say: Callable[[str], None]) -> None:
    """A driver killed with -9 leaves its child checkpointing after the SIGTERM it gets: wait for it to let go."""
    deadline, told = time.monotonic() + LOCK_WAIT_S, False
    while True:
        try:
            with hold(run_dir, "finetune sweep (checking)", warn=lambda message: None):
                return
        except FinetuneError:
            if time.monotonic() > deadline:
                raise
            if not told:
                say(f"{run_dir.name}: waiting for the earlier training of this point to stop")
                told = True
            time.sleep(1.0)


def _reason(log_path: Path, start: int, returncode: int) -> str:
    """Why a point failed: train's own error line from this attempt's log, else how the process ended."""
    with open(log_path, errors="replace") as f:
        f.seek(start)
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    if starts:  # the last error paragraph, on one line
        message = " ".join(lines[starts[-1]:]).removeprefix("error:").strip()
        return message if len(message) <= 400 else message[:397] + "..."
    if returncode < 0:
        return f"killed by signal {-returncode}" + (" (out of memory?)" if returncode == -9 else "")
    return f"exit code {returncode}" + (f": {lines[-1]}" if lines else "")
