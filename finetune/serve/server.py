"""`finetune serve`: load the base once, attach the adapters by name, answer the OpenAI API on uvicorn.

MODEL is resolved as `finetune chat` resolves its target (`generate.resolve_target`): a base model directory or hub
id, a `.gguf` file, a merged directory, a recipe (its model and chat template), or an adapter checkpoint, whose
base is loaded and which is served as an adapter named after its run. The base is quantized as `finetune chat`
would load it (`--quantize auto`: 4-bit when the first adapter was trained in 4 bit), so a greedy reply equals
`finetune chat`'s. The server binds 127.0.0.1 unless told otherwise; SIGTERM or Ctrl-C stops accepting
connections, lets the requests in flight finish, stops the engine and returns (exit 0).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from pathlib import Path

import torch

from finetune.errors import FinetuneError, ModelError
from finetune.serve.engine import Engine
from finetune.serve.protocol import APIError
from finetune.serve.registry import Registry
from finetune.serve.serving import ServeOptions, Serving


def serve(model: str, *, adapters: dict[str, str] | None = None, quantize: str = "auto",
          options: ServeOptions | None = None, console=None) -> None:
    """Serve until SIGTERM / Ctrl-C. `adapters`: model name -> adapter checkpoint directory."""
    options = options or ServeOptions()
    uvicorn = _need_serve_extra()
    serving = load(model, adapters=adapters, quantize=quantize, options=options)
    sock = listen(options.host, options.port)
    host, port = sock.getsockname()[:2]
    say = (lambda text: console.print(text, highlight=False, soft_wrap=True)) if console else (lambda text: print(text, file=sys.stderr))
    names = [n for n in serving.registry.models if n != serving.registry.base_name]
    say(f"serving {serving.registry.base_name} (adapters: {', '.join(names) or 'none'}) at "
        f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1 "
        f"{'(API key required) ' if options.api_key else ''}- SIGTERM or Ctrl-C stops it")
    server = uvicorn.Server(uvicorn.Config(app(serving), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=None))
    # uvicorn re-raises the signal it shut down on, under the handlers it found: these make that a clean return.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serving.engine.stop(timeout=30)
    say("stopped: every request in flight was answered")


def load(model: str, *, adapters: dict[str, str] | None = None, quantize: str = "auto",
         options: ServeOptions | None = None) -> Serving:
    """The base loaded once, the adapters attached, the engine built (not started: `app` starts it)."""
    from finetune.generate import resolve_target
    from finetune.model import eval_quantization, load_eval_model, load_tokenizer, saved_recipe

    options = options or ServeOptions()
    recipe, section, found = resolve_target(model)
    named = {}
    if found:  # MODEL is a checkpoint: it is served under its run's name
        ckpt = Path(found[0])
        named[saved_recipe(ckpt).get("name") or (ckpt.parent.name if ckpt.name.startswith("checkpoint") else
                                                 ckpt.name)] = found[0]
    for name, path in (adapters or {}).items():
        if name in named:
            raise ModelError(f"Two adapters are named '{name}'; give each --adapter NAME=PATH its own name.")
        named[name] = path
    quant = eval_quantization(quantize, recipe, section.name_or_path, list(named.values()))
    tok = load_tokenizer(section.name_or_path, recipe.data.chat_template if recipe else None)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    net = load_eval_model(section, quant, device).eval()
    text = net.config.get_text_config()
    engine = Engine(net, context=getattr(text, "max_position_embeddings", None) or 2048,
                    max_batch=options.max_batch, max_queue=options.max_queue)
    source = section.name_or_path
    base_name = Path(source).name if Path(source).expanduser().exists() else source
    registry = Registry(engine, base_name, source, tok)
    for name, path in named.items():
        try:
            registry.add(name, path)
        except APIError as e:
            raise ModelError(f"--adapter {name}={path}: {e.message}") from None
    return Serving(registry, engine, options)


def app(serving: Serving, start: bool = True):
    """The ASGI app; its lifespan starts the engine thread (unless `start` is False: the caller steps it) and, at
    shutdown, after uvicorn has let the requests in flight finish, stops it."""
    from finetune.serve.api_router import build_app

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if start:
            serving.engine.start()
        yield
        serving.engine.stop(timeout=30)

    return build_app(serving, lifespan)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or a clear error when it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise ModelError(f"Cannot listen on {host}:{port}: {e.strerror or e}. Choose another --port or --host.") \
            from None
    return sock


def _need_serve_extra():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise FinetuneError("finetune serve needs FastAPI and uvicorn: pip install 'finetune[serve]'.") from None
    return uvicorn
