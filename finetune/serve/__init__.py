"""`finetune serve`: one base model, many adapters, behind an OpenAI-compatible API (FastAPI + uvicorn).

`protocol.py` the OpenAI request/response/error shapes; `api_router.py` the routes; `serving.py` requests to jobs
(chat template, sampling, stop strings, streaming, usage); `engine.py` continuous batching with mixed-adapter
batches on one thread; `registry.py` adapters by name, verified, added and removed while serving; `server.py` the
entry function (load once, uvicorn).

Imports: errors, recipe, artifacts, model, generate.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "server": ["app", "listen", "load", "serve"],
    "serving": ["ServeOptions"],
    "engine": ["Engine", "Job"],
})
