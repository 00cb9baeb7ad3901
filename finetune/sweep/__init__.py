"""`finetune sweep`: a grid (or an Optuna search) of recipe overrides, each point a `finetune train` run in its own
directory under `<run dir>-sweep/`, resumable, then one table, sweep.json, sweep.csv and sweep.png.

- space.py: `key=v1,v2` / `--grid FILE` parsed into fixed overrides, axes and ranges, validated; point names
- runner.py: one point as a `finetune train` child process; sweep-state.json; signals forwarded
- search.py: `--search N` with Optuna (TPE sampler, median pruner at eval steps)
- results.py: rows read back from each run directory; the table, JSON, CSV and plot
- driver.py: `sweep`, the entry function, and `check_sweep` (exit 5 when points failed)

Imports: errors, recipe, artifacts, plan (the predicted memory of each point).
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "driver": ["check_sweep", "sweep"],
    "results": ["print_sweep"],
})
