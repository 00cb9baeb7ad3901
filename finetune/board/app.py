"""`finetune board`: one local page to watch, compare, launch and talk to runs (Starlette + uvicorn).

Everything the page loads comes from this package (`static/`) or an installed wheel (plotly.min.js from the
plotly package): nothing from the internet. The page polls the JSON routes below; a running run's new metrics
lines come as the rows after the byte offset the page already has, so curves grow without reload.

Safety: it binds 127.0.0.1 by default; since it can start processes, every request needs the token printed at
start (the URL carries it once, then a SameSite cookie), unless `--no-token` on a loopback host. Paths in
requests are resolved and must stay inside RUNS_DIR (runs, checkpoints) or the recipes directory, else 404.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from finetune.artifacts import held_by
from finetune.board import inside, runs
from finetune.board.chat import Chats
from finetune.board.launch import Jobs, OverrideErrors
from finetune.board.plans import Plans
from finetune.errors import FinetuneError

STATIC = Path(__file__).parent / "static"


class BoardError(FinetuneError):
    """Bad arguments to `finetune board` (exit 2)."""

    exit_code = 2

COOKIE = "finetune_board_token"


@dataclass
class Board:
    runs_dir: Path
    recipes_dir: Path
    token: str | None
    jobs: Jobs
    chats: Chats
    plans: Plans
    verifier: inside.Verifier


def _static(request: Request) -> Response:
    name = request.path_params["name"]
    if name == "plotly.min.js":
        import plotly

        return FileResponse(Path(plotly.__file__).parent / "package_data" / "plotly.min.js",
                            media_type="text/javascript")
    if name not in {"board.js", "board.css"}:
        return PlainTextResponse("not found", 404)
    return FileResponse(STATIC / name)


def _index(request: Request) -> Response:
    response = FileResponse(STATIC / "index.html")
    token = request.app.state.board.token
    if token and request.query_params.get("token") == token:
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
    return response


class TokenCheck:
    """Refuse (403) any request without the board's token (query `token`, the cookie, or X-Board-Token)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        board = scope["app"].state.board if "app" in scope else None
        if scope["type"] == "http" and board is not None and not board.token:
            host = Request(scope).url.hostname or ""  # no token: only pages served as a loopback host may ask
            if not is_loopback(host.strip("[]")):  # (a DNS-rebinding site's Host header names itself)
                return await PlainTextResponse("forbidden: not a loopback host", 403)(scope, receive, send)
        elif scope["type"] == "http" and board is not None:
            request = Request(scope)
            given = (request.query_params.get("token") or request.cookies.get(COOKIE)
                     or request.headers.get("x-board-token") or "")
            if not hmac.compare_digest(given.encode(), board.token.encode()):
                response = PlainTextResponse("forbidden: open the URL `finetune board` printed (it carries the "
                                             "token)", 403)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _board(request: Request) -> Board:
    return request.app.state.board


def _run_dir(request: Request, key: str = "run") -> Path:
    rel = request.path_params.get(key) or request.query_params.get(key) or ""
    path = runs.confined(_board(request).runs_dir, rel)
    if not runs.is_run(path):
        raise runs.NotFound(rel)
    return path


def api_runs(request: Request) -> Response:
    board = _board(request)
    rows = runs.scan(board.runs_dir)
    for r in rows:
        if r["status"] != "damaged":
            r["plan_gib"] = board.plans.get(board.runs_dir / r["id"])
    return JSONResponse({"runs": rows, "runs_dir": str(board.runs_dir)})


def api_metrics(request: Request) -> Response:
    run_dir = _run_dir(request)
    rows, offset = runs.read_metrics(run_dir, int(request.query_params.get("offset", 0)))
    return JSONResponse({"rows": rows, "offset": offset, "running": held_by(run_dir) is not None})


def api_run(request: Request) -> Response:
    board = _board(request)
    return JSONResponse(inside.detail(board.runs_dir, _run_dir(request), board.verifier))


def api_diff(request: Request) -> Response:
    return JSONResponse({"diff": runs.recipe_diff(_run_dir(request, "a"), _run_dir(request, "b"))})


def _recipe_path(board: Board, rid: str) -> Path:
    """A launchable recipe: `recipes/<file>` in the recipes directory or `runs/<run>` (the run's recipe.yaml)."""
    where, _, rel = rid.partition("/")
    if where == "recipes" and rel.endswith((".yaml", ".yml")):
        return runs.confined(board.recipes_dir, rel)
    if where == "runs":
        return runs.confined(board.runs_dir, rel + "/recipe.yaml")
    raise runs.NotFound(rid)


def api_recipes(request: Request) -> Response:
    board = _board(request)
    own = sorted(p.name for p in board.recipes_dir.glob("*.y*ml")) if board.recipes_dir.is_dir() else []
    ids = [f"recipes/{n}" for n in own] + [f"runs/{p.relative_to(board.runs_dir).as_posix()}"
                                             for p, _ in runs.run_dirs(board.runs_dir) if (p / "recipe.yaml").is_file()]
    text = None
    if request.query_params.get("id"):
        text = _recipe_path(board, request.query_params["id"]).read_text(errors="replace")
    return JSONResponse({"recipes": ids, "text": text, "sweep": board.jobs.sweep_available()})


async def api_launch(request: Request) -> Response:
    board = _board(request)
    body = await request.json()
    overrides = [o.strip() for o in body.get("overrides", []) if o.strip()]
    recipe = _recipe_path(board, str(body.get("recipe", "")))
    try:
        if body.get("kind") == "sweep":
            if not board.jobs.sweep_available():
                return JSONResponse({"general": ["`finetune sweep` is not available in this installation."]}, 400)
            job = board.jobs.sweep(recipe, overrides)
        else:
            job = board.jobs.train(recipe, overrides)
    except OverrideErrors as e:
        return JSONResponse({"errors": e.by_key, "general": e.general}, 400)
    return JSONResponse(job.state())


def api_jobs(request: Request) -> Response:
    return JSONResponse({"jobs": [j.state() for j in _board(request).jobs.jobs.values()]})


def api_job_log(request: Request) -> Response:
    jobs = _board(request).jobs
    n = int(request.path_params["job"])
    if n not in jobs.jobs:
        raise runs.NotFound(str(n))
    text, offset = jobs.log(n, int(request.query_params.get("offset", 0)))
    return JSONResponse({"text": text, "offset": offset, **jobs.jobs[n].state()})


def api_stop(request: Request) -> Response:
    run_dir = _run_dir(request)
    holder = held_by(run_dir)
    if not holder or not isinstance(holder.get("pid"), int):
        return JSONResponse({"error": f"{run_dir.name} is not running"}, 409)
    _board(request).jobs.stop(holder["pid"])
    return JSONResponse({"stopping": holder["pid"]})


def api_resume(request: Request) -> Response:
    board, run_dir = _board(request), _run_dir(request)
    try:
        job = board.jobs.train(run_dir / "recipe.yaml", [f"output_dir={run_dir}"], resume=True)
    except OverrideErrors as e:
        return JSONResponse({"errors": e.by_key, "general": e.general}, 400)
    return JSONResponse(job.state())


async def api_chat(request: Request) -> Response:
    from finetune.generate import ChatOptions

    board = _board(request)
    body = await request.json()
    ckpt = runs.confined(board.runs_dir, str(body.get("checkpoint", "")))
    if not (ckpt / "adapter_config.json").is_file():
        raise runs.NotFound(str(body.get("checkpoint")))
    options = ChatOptions(max_new_tokens=int(body.get("max_new_tokens", 256)),
                          temperature=float(body.get("temperature", 0.0)), seed=int(body.get("seed", 0)))
    pieces = board.chats.stream(ckpt, body.get("history") or [], str(body.get("prompt", "")), options,
                                bool(body.get("base")))

    async def lines():
        async for item in pieces:
            yield json.dumps(item) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def _not_found(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("not found", 404)


async def _bad_input(request: Request, exc: Exception) -> Response:
    return JSONResponse({"general": [str(exc)]}, 400)


def make_app(runs_dir: Path, recipes_dir: Path = Path("recipes"), token: str | None = None) -> Starlette:
    """The board's ASGI app over `runs_dir`; `token` None: no token asked (loopback only, see `serve_board`)."""
    board = Board(Path(runs_dir), Path(recipes_dir), token, Jobs(Path(runs_dir)), Chats(), Plans(),
                  inside.Verifier())
    get = ["GET"]
    routes = [
        Route("/", _index), Route("/static/{name}", _static),
        Route("/api/runs", api_runs), Route("/api/metrics/{run:path}", api_metrics, methods=get),
        Route("/api/run/{run:path}", api_run), Route("/api/diff", api_diff), Route("/api/recipes", api_recipes),
        Route("/api/launch", api_launch, methods=["POST"]), Route("/api/jobs", api_jobs),
        Route("/api/jobs/{job:int}/log", api_job_log), Route("/api/stop/{run:path}", api_stop, methods=["POST"]),
        Route("/api/resume/{run:path}", api_resume, methods=["POST"]),
        Route("/api/chat", api_chat, methods=["POST"]),
    ]
    handlers = {runs.NotFound: _not_found, FileNotFoundError: _not_found, FinetuneError: _bad_input,
                ValueError: _bad_input}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        board.plans.close()  # runs it started go on (they hold their locks; the next board shows and stops them)

    app = Starlette(routes=routes, middleware=[Middleware(TokenCheck)], exception_handlers=handlers,
                    lifespan=lifespan)
    app.state.board = board
    return app


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_board(runs_dir: Path, host: str = "127.0.0.1", port: int = 7860, no_token: bool = False,
                recipes_dir: Path = Path("recipes"), announce=print) -> None:
    """Serve the board until Ctrl-C; `announce(url)` is told the URL to open (with the token)."""
    import uvicorn

    if no_token and not is_loopback(host):
        raise BoardError(f"--no-token is only allowed on a loopback host (127.0.0.1, ::1, localhost), not "
                            f"{host}: the page can start processes, so anyone who can reach {host} could.")
    if not Path(runs_dir).is_dir():
        raise BoardError(f"{runs_dir} is not a directory; give the runs directory (default: runs).")
    token = None if no_token else secrets.token_urlsafe(18)
    app = make_app(Path(runs_dir), Path(recipes_dir), token)
    shown = f"[{host}]" if ":" in host else host
    announce(f"http://{shown}:{port}/" + (f"?token={token}" if token else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning")
