"""The HTTP surface (FastAPI): routes, the API key, the body-size limit, and every error as OpenAI's error JSON.

GET /health (no key), GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/adapters
{name, path}, DELETE /v1/adapters/{name}. A bad request is a 4xx with `{"error": {"message", "type", "param",
"code"}}` (pydantic's validation errors are 400s naming the parameter, as OpenAI answers, not FastAPI's 422);
anything unexpected is a 500 in the same shape, logged, and the server goes on serving.
"""

from __future__ import annotations

import hmac
import itertools
import logging

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from finetune.serve.protocol import AdapterRequest, APIError, ChatCompletionRequest, CompletionRequest
from finetune.serve.serving import Serving

log = logging.getLogger("finetune.serve")
router = APIRouter()


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def _authorized(request: Request) -> None:
    key = request.app.state.serving.options.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'.",
                       code="invalid_api_key")


@router.get("/health")
async def health(serving: Serving = Depends(_serving)) -> dict:
    return {"status": "ok", **serving.engine.load()}


@router.get("/v1/models", dependencies=[Depends(_authorized)])
async def models(serving: Serving = Depends(_serving)) -> dict:
    return serving.models()


@router.post("/v1/chat/completions", dependencies=[Depends(_authorized)])
async def chat_completions(body: ChatCompletionRequest, request: Request, serving: Serving = Depends(_serving)):
    return _answer(await serving.chat(body, request))


@router.post("/v1/completions", dependencies=[Depends(_authorized)])
async def completions(body: CompletionRequest, request: Request, serving: Serving = Depends(_serving)):
    return _answer(await serving.completion(body, request))


@router.post("/v1/adapters", dependencies=[Depends(_authorized)])
async def add_adapter(body: AdapterRequest, serving: Serving = Depends(_serving)) -> dict:
    served = await run_in_threadpool(serving.registry.add, body.name, body.path)  # hashes files: off the loop
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "finetune",
            "parent": serving.registry.base_name, "path": served.path}


@router.delete("/v1/adapters/{name:path}", dependencies=[Depends(_authorized)])
async def remove_adapter(name: str, serving: Serving = Depends(_serving)) -> dict:
    serving.registry.remove(name)
    return {"id": name, "object": "model", "deleted": True}


def _answer(result):
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_app(serving: Serving, lifespan=None) -> FastAPI:
    """The FastAPI application over `serving` (the routes above, the error handlers, the body-size limit)."""
    app = FastAPI(title="finetune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    app.include_router(router)

    app.add_middleware(_BodyLimit, limit=serving.options.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = list(itertools.takewhile(lambda p: "[" not in p, (str(p) for p in first.get("loc", ())[1:])))  # no
        # "body", and nothing from the first union member's tag on (e.g. "function-after[_unicode(), str]")
        if first.get("type") == "json_invalid":
            return _error(APIError(400, "The request body is not valid JSON.", code="invalid_json"))
        return _error(APIError(400, f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}",
                               param=".".join(where) or None, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):
        return _error(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def unexpected(_request, e: Exception):
        log.exception("unexpected error")
        return _error(APIError(500, f"Internal error: {type(e).__name__}.", type="server_error"))

    return app


class _BodyLimit:
    """413 for a request whose Content-Length is over the limit, before its body is read. A plain ASGI middleware:
    Starlette's BaseHTTPMiddleware would hide a client's disconnect from the endpoint."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        size = dict(scope.get("headers") or []).get(b"content-length", b"0").decode() if scope["type"] == "http" \
            else "0"
        if not size.isdigit() or int(size) > self.limit:
            error = APIError(413, f"The request body has {size} bytes; this server takes at most {self.limit}.",
                             code="request_too_large")
            return await _error(error)(scope, receive, send)
        await self.app(scope, receive, send)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)
