"""The planner's predicted peak memory (`finetune plan`) for each run's resolved recipe, to show beside the
peak it measured. Planning builds the model on the meta device and may summarise the data, so it runs in one
background thread; until it is done (or when it cannot plan, e.g. the data moved) the table shows none.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import yaml


def _plan_gib(run_dir: Path) -> float | None:
    from finetune.plan import plan
    from finetune.recipe import Recipe

    recipe = Recipe.model_validate(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    try:
        device = json.loads((run_dir / "environment.json").read_text()).get("device", "cpu")
    except (OSError, ValueError):
        device = "cpu"
    return round(plan(recipe, device="cpu" if str(device).startswith("cpu") else "cuda").total / 2**30, 3)


class Plans:
    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="board-plan")
        self.futures: dict[tuple, Future] = {}

    def get(self, run_dir: Path) -> float | None:
        """The predicted peak in GiB if known; starts planning it otherwise (keyed by the recipe's mtime)."""
        try:
            key = (str(run_dir), (run_dir / "recipe.yaml").stat().st_mtime_ns)
        except OSError:
            return None
        if key not in self.futures:
            self.futures[key] = self.pool.submit(_plan_gib, run_dir)
        future = self.futures[key]
        if not future.done() or future.exception() is not None:
            return None
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
