"""A sweep's results: one row per point read back from its own run directory, the table, sweep.json, sweep.csv and
sweep.png (eval loss against step, one line per point).

Per point: the swept overrides; from summary.json the trainable parameters, final eval loss, wall seconds and peak
memory (GiB: CUDA's max allocated, or the process's peak RSS on CPU); from metrics.jsonl the last logged train loss,
the mean tokens/s over the logged windows and the last generation metrics (eval_exact_match, ...) when the recipe
generates; and `finetune plan`'s predicted peak for the point's recipe. The best point is the finished one with the
lowest eval loss (the lowest train loss without eval data).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.artifacts import write_text_atomic

SCHEMA = "finetune.sweep/1"


@dataclass
class Row:
    name: str
    overrides: dict[str, str]
    status: str
    reason: str | None = None
    run_dir: str = ""
    trainable_parameters: int | None = None
    steps: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    generation: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float | None = None
    seconds: float | None = None
    peak_memory_gib: float | None = None
    planned_memory_gib: float | None = None
    best: bool = False


@dataclass
class SweepResult:
    sweep_dir: Path
    recipe: str
    keys: list[str]
    rows: list[Row]

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "failed"]

    @property
    def best(self) -> Row | None:
        return next((r for r in self.rows if r.best), None)


def read_row(name: str, overrides: dict[str, str], status: str, reason: str | None, run_dir: Path,
             plan: tuple[float | None, int | None] = (None, None)) -> Row:
    """A point's row; the planner's trainable count stands in when the run did not finish (pruned, failed)."""
    row = Row(name, overrides, status, reason, str(run_dir), planned_memory_gib=plan[0],
              trainable_parameters=plan[1])
    metrics = read_metrics(run_dir / "metrics.jsonl")
    train = [m for m in metrics if "loss" in m]
    row.train_loss = train[-1]["loss"] if train else None
    speeds = [m["tokens_per_s"] for m in train if "tokens_per_s" in m]
    row.tokens_per_s = round(sum(speeds) / len(speeds), 1) if speeds else None
    generated = [m for m in metrics if "eval_loss" not in m and any(k.startswith("eval_") for k in m)]
    row.generation = {k: v for k, v in generated[-1].items() if k.startswith("eval_")} if generated else {}
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
        row.eval_loss = evals[-1] if evals else None  # pruned or failed: as far as it got
        row.steps = max((m["step"] for m in metrics), default=None)
        return row
    row.trainable_parameters = summary.get("trainable_parameters", row.trainable_parameters)
    row.steps, row.eval_loss = summary.get("steps"), summary.get("eval_loss")
    row.seconds, row.peak_memory_gib = summary.get("wall_time_s"), summary.get("peak_memory_gib")
    return row


def read_metrics(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written as we read
            continue
    return out


def mark_best(rows: list[Row]) -> None:
    done = [r for r in rows if r.status == "finished"]
    key = "eval_loss" if any(r.eval_loss is not None for r in done) else "train_loss"
    scored = [r for r in done if isinstance(getattr(r, key), float) and math.isfinite(getattr(r, key))]
    if scored:
        min(scored, key=lambda r: getattr(r, key)).best = True


def planned(recipe) -> tuple[float | None, int | None]:
    """`finetune plan`'s predicted peak (GiB) and trainable parameters for this point's recipe; None where the
    planner cannot say (an extra column: its failure must not cost the sweep its results)."""
    import warnings

    from finetune.plan import plan

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. transformers' deprecations, said once per point
            p = plan(recipe)
    except Exception:  # noqa: BLE001 (FinetuneError, or a library's refusal of a setting the planner lacks)
        return None, None
    return round(p.total / 2**30, 3), p.trainable_parameters


def write_results(result: SweepResult) -> None:
    body = {"schema": SCHEMA, "recipe": result.recipe, "keys": result.keys,
            "best": result.best.name if result.best else None, "points": [asdict(r) for r in result.rows]}
    write_text_atomic(result.sweep_dir / "sweep.json", json.dumps(body, indent=2) + "\n")
    write_text_atomic(result.sweep_dir / "sweep.csv", _csv(result))
    plot(result, result.sweep_dir / "sweep.png")


def _csv(result: SweepResult) -> str:
    generation = sorted({k for r in result.rows for k in r.generation})
    columns = ["point", *result.keys, "status", "reason", "trainable_parameters", "steps", "train_loss", "eval_loss",
               *generation, "tokens_per_s", "seconds", "peak_memory_gib", "planned_memory_gib", "best"]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(columns)
    for r in result.rows:
        values = {**asdict(r), **r.overrides, **r.generation, "point": r.name, "best": int(r.best)}
        w.writerow([_blank(values.get(c)) for c in columns])
    return out.getvalue()


def _blank(v) -> str:
    return "" if v is None else str(v)


def plot(result: SweepResult, out: Path) -> None:
    """Eval loss (train loss without eval data) against step, one line per point, the best one thicker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    what = "eval_loss"
    series = {r.name: read_metrics(Path(r.run_dir) / "metrics.jsonl") for r in result.rows}
    if not any("eval_loss" in m for ms in series.values() for m in ms):
        what = "loss"
    for r in result.rows:
        points = [(m["step"], m[what]) for m in series[r.name] if what in m]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, linewidth=3 if r.best else 1.5,
                    label=f"{r.name}{' (best)' if r.best else ''}{'' if r.status == 'finished' else ' ' + r.status}")
    ax.set(xlabel="step", ylabel=f"{'eval' if what == 'eval_loss' else 'train'} loss", title=result.sweep_dir.name)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = out.with_name(f".tmp-{out.name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)


def print_sweep(result: SweepResult, console) -> None:
    """One table: a row per point, the best marked with *; why each point failed or was pruned below it."""
    from rich.table import Table

    from finetune.sweep.space import short_key

    generation = sorted({k for r in result.rows for k in r.generation})
    table = Table(title=f"sweep {result.sweep_dir}", title_justify="left")
    for c in ["", "point", *(short_key(k) for k in result.keys), "trainable", "train loss", "eval loss",
              *(k.removeprefix("eval_") for k in generation), "tok/s", "s", "peak GiB", "plan GiB", "status"]:
        table.add_column(c, justify="left" if c in ("point", "status") else "right")
    for r in result.rows:
        table.add_row("*" if r.best else "", r.name, *(r.overrides.get(k, "") for k in result.keys),
                      _num(r.trainable_parameters, ","), _num(r.train_loss, ".4f"), _num(r.eval_loss, ".4f"),
                      *(_num(r.generation.get(k), ".3f") for k in generation), _num(r.tokens_per_s, ",.0f"),
                      _num(r.seconds, ".1f"), _num(r.peak_memory_gib, ".2f"), _num(r.planned_memory_gib, ".2f"),
                      r.status)
    if console.is_terminal:
        console.print(table)
    else:  # a pipe or a file: the whole table, however wide, rather than cut columns
        from rich.measure import Measurement

        width = console.width
        console.width = max(width, Measurement.get(console, console.options.update(width=10_000), table).maximum)
        try:
            console.print(table)
        finally:
            console.width = width
    for r in result.rows:
        if r.reason and r.status != "finished":
            console.print(f"{r.status} {r.name}: {r.reason}", highlight=False, soft_wrap=True, markup=False)
    console.print(f"wrote {result.sweep_dir / 'sweep.json'}, sweep.csv and sweep.png"
                  + (f"; best: {result.best.name}" if result.best else ""), highlight=False, soft_wrap=True)


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)
