"""`finetune board`: a local web page over RUNS_DIR to watch runs (table, live curves, what is inside each),
compare them (overlaid curves, recipe diff), launch, stop and resume them, and chat with their checkpoints.

- runs.py: the runs table (status from the lock and the records), metrics read from a byte offset, recipe diff
- inside.py: one run's recipe, environment, checkpoints with their verify verdict, eval reports, samples
- plans.py: the planner's predicted peak memory per run (background)
- launch.py: `finetune train` / `finetune sweep` child processes, overrides validated first; stop, resume
- chat.py: streamed replies through `finetune chat`'s session code
- app.py: the Starlette app, the token check, `serve_board`; static/: the page

Imports: errors, artifacts, recipe, generate, plan (layer 9).
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "app": ["is_loopback", "make_app", "serve_board"],
})
