"""`--search N`: Optuna's TPE sampler proposes each point from the ranges and categorical axes, and its median
pruner stops hopeless points at eval steps.

The objective is the point's final eval loss (minimised). The study lives in `<sweep dir>/optuna.journal`
(Optuna's file journal), so a restarted sweep continues it: finished trials stay known to TPE, and an interrupted
trial is resumed and then told its result. While a point trains, the driver reads the eval records of its
metrics.jsonl as they appear, reports each (eval loss at its step) to the trial and, when the pruner says the
trial is worse than the median of earlier trials at the same step (after `N_STARTUP` complete trials), sends
the child SIGTERM (it checkpoints and stops) and marks the point pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from finetune.errors import RecipeError
from finetune.sweep.results import read_metrics
from finetune.sweep.space import Space

N_STARTUP = 2  # complete trials before the pruner judges any


def require_optuna():
    """Optuna, or a RecipeError saying how to install it (checked before the sweep writes anything)."""
    try:
        import optuna
        import optuna.storages.journal
    except ImportError:
        raise RecipeError("finetune sweep --search needs Optuna: pip install 'finetune[sweep]' (or pip install "
                          "optuna); a grid (key=v1,v2) needs nothing more.") from None
    return optuna


def open_study(sweep_dir: Path, seed: int, n: int):
    """The sweep's study (created, or loaded from its journal). TPE samples its first max(2, min(10, n // 3))
    points at random (Optuna's default is 10, a whole small search), then from its model of the results. Its seed
    is the recipe's plus the trials already run, so a restarted search draws new points instead of replaying."""
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(sweep_dir / "optuna.journal")))
    study = optuna.create_study(study_name="sweep", storage=storage, load_if_exists=True, direction="minimize")
    sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=max(2, min(10, n // 3)))
    return optuna.load_study(study_name="sweep", storage=storage, sampler=sampler,
                             pruner=optuna.pruners.MedianPruner(n_startup_trials=N_STARTUP, n_warmup_steps=0))


def suggest(trial, space: Space) -> dict[str, str]:
    """The trial's overrides: a value from each range (log-uniform with :log, integers with :int; floats rounded to
    4 significant digits, which is what the point trains with) and axis."""
    out = {}
    for r in space.ranges:
        if r.integer:
            out[r.key] = str(trial.suggest_int(r.key, int(r.low), int(r.high), log=r.log))
        else:
            out[r.key] = f"{trial.suggest_float(r.key, r.low, r.high, log=r.log):.4g}"  # 4 digits: readable
    for a in space.axes:
        out[a.key] = trial.suggest_categorical(a.key, list(a.values))
    return out


def pruning_monitor(trial) -> Callable[[Path], str | None]:
    """A monitor for PointRunner: report new eval losses to the trial; a reason to stop when it should be pruned."""
    reported: set[int] = set()

    def monitor(run_dir: Path) -> str | None:
        for m in read_metrics(run_dir / "metrics.jsonl"):
            if "eval_loss" in m and m["step"] not in reported:
                reported.add(m["step"])
                trial.report(m["eval_loss"], m["step"])
                if trial.should_prune():
                    return f"eval loss {m['eval_loss']:.4f} at step {m['step']} above the earlier trials' median"
        return None

    return monitor


def tell(study, number: int, status: str, eval_loss: float | None) -> None:
    """Tell the study how trial `number` ended (a trial already told, e.g. before a crash, is left alone)."""
    import optuna

    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is None or trial.state != optuna.trial.TrialState.RUNNING:
        return
    if status == "finished" and eval_loss is not None:
        study.tell(number, eval_loss)
    elif status == "pruned":
        study.tell(number, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
