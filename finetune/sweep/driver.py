"""`finetune sweep RECIPE key=v1,v2 ...`: train every point of a grid (or `--search N` points proposed by Optuna),
one after another, each in its own run directory under `<run dir>-sweep/` (e.g. runs/quickstart-sweep/r8-lr0.001),
then the table, sweep.json, sweep.csv and sweep.png of all of them.

Everything given is validated first (space.py: each swept value and each grid point against the recipe schema;
exit 2 naming the key, before anything runs). The driver holds the sweep directory's lock for its whole life.
Started again after an interruption (Ctrl-C, SIGTERM, kill -9, a crash), the same command skips the finished
points, resumes the interrupted one from its newest checkpoint and goes on; failed points are retried. With more
values on an axis, only the new points run.
A point that fails does not stop the sweep: it is a row saying why, and the sweep exits 5 at the end.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

from finetune.artifacts import hold
from finetune.errors import FinetuneError, RecipeError, SweepPointsFailed
from finetune.recipe import load_recipe
from finetune.sweep.results import Row, SweepResult, mark_best, planned, read_row, write_results
from finetune.sweep.runner import DONE, PointRunner, PointState, Signals, open_state
from finetune.sweep.space import Point, Space, parse_space, validate


def sweep(recipe: Path, items: list[str], *, grid_file: Path | None = None, search: int | None = None,
          overwrite: bool = False, say: Callable[[str], None] = print) -> SweepResult:
    """Run the sweep (or continue it) and return its results; raises RecipeError before running anything
    when a value is invalid, TrainingInterrupted when stopped by a signal (points left to resume)."""
    space = parse_space(items, grid_file)
    if not space.keys:
        raise RecipeError("Nothing to sweep: give at least one key with several values (e.g. lora.r=4,8) or, "
                          "with --search, a range (e.g. training.learning_rate=1e-5:1e-3:log).")
    if space.ranges and not search:
        raise RecipeError(f"{space.ranges[0].text()} is a range: ranges are sampled by --search N; a grid takes "
                          f"comma-separated values (e.g. {space.ranges[0].key}=1,2,4).")
    if search:
        from finetune.sweep.search import require_optuna

        require_optuna()
    points = [] if search else space.grid()
    base = validate(recipe, space, points)
    if search and not (base.data.eval or base.data.eval_fraction):
        raise RecipeError(f"{recipe}: --search minimises the eval loss, and the recipe has no eval data; set "
                          f"data.eval or data.eval_fraction.")
    sweep_dir = base.run_dir.with_name(f"{base.run_dir.name}-sweep")
    mode = "grid" if not search else "search " + " ".join(
        [r.text() for r in space.ranges] + [f"{a.key}={','.join(a.values)}" for a in space.axes])
    with hold(sweep_dir, "finetune sweep"):
        if overwrite:
            shutil.rmtree(sweep_dir, ignore_errors=True)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(base.to_yaml().encode()).hexdigest()
        state = open_state(sweep_dir, str(recipe), space.fixed, mode, digest)
        if not search:
            _grid_state(state, points)
        with Signals() as signals:
            runner = PointRunner(sweep_dir, recipe, space.fixed, state, signals, say)
            if search:
                _search(runner, space, search, recipe, base.training.seed)
            else:
                for i, p in enumerate(state.points):
                    if p.status not in DONE:
                        runner.run(p, label=f"point {i + 1}/{len(state.points)} ")
        result = _results(state, recipe, space, sweep_dir)
        write_results(result)
    return result


def check_sweep(result: SweepResult) -> None:
    """Exit 5 (SweepPointsFailed) when a point failed; the table has been printed by then."""
    if result.failed:
        names = ", ".join(f"{r.name} ({r.reason})" for r in result.failed)
        raise SweepPointsFailed(f"{len(result.failed)} of {len(result.rows)} sweep points failed: {names}. Their "
                                f"logs are in {result.sweep_dir / 'logs'}; run the sweep again to retry them.")


def _grid_state(state, points: list[Point]) -> None:
    """The grid's points in the state; a point the earlier run of this sweep had (same name and values) keeps its
    status, so adding values to an axis runs only the new points."""
    earlier = {(p.name, tuple(p.overrides.items())): p for p in state.points}
    state.points = [earlier.get((p.name, tuple(p.overrides.items()))) or PointState(p.name, p.overrides)
                    for p in points]
    state.save()


def _search(runner: PointRunner, space: Space, n: int, recipe: Path, seed: int) -> None:
    """Resume interrupted trials, then ask Optuna for more until the sweep has `n` points."""
    from finetune.sweep.search import open_study, pruning_monitor, suggest, tell

    study = open_study(runner.sweep_dir, seed, n)
    width = len(str(max(n - 1, 1)))
    for p in runner.state.points:
        if p.status not in DONE:  # interrupted or failed earlier: same trial, same values
            _tell(study, runner, p, runner.run(p), tell)
    while len(runner.state.points) < n:
        trial = study.ask()
        p = PointState(f"trial-{trial.number:0{width}d}", suggest(trial, space), trial=trial.number)
        runner.state.points.append(p)
        try:
            load_recipe(recipe, space.fixed + p.args())
        except RecipeError as e:
            p.status, p.reason = "failed", f"invalid values: {e}"
            runner.state.save()
            tell(study, trial.number, "failed", None)
            continue
        runner.say(f"trial {len(runner.state.points)}/{n}: {' '.join(p.args())}")
        _tell(study, runner, p, runner.run(p, pruning_monitor(trial)), tell)


def _tell(study, runner: PointRunner, p: PointState, status: str, tell) -> None:
    row = read_row(p.name, p.overrides, status, p.reason, runner.sweep_dir / p.name)
    tell(study, p.trial, status, row.eval_loss)


def _results(state, recipe: Path, space: Space, sweep_dir: Path) -> SweepResult:
    rows: list[Row] = []
    for p in state.points:
        try:
            plan = planned(load_recipe(recipe, space.fixed + p.args()))
        except FinetuneError:
            plan = (None, None)
        rows.append(read_row(p.name, p.overrides, p.status, p.reason, sweep_dir / p.name, plan))
    mark_best(rows)
    return SweepResult(sweep_dir, str(recipe), space.keys, rows)
