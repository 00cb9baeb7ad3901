"""Requests to engine jobs and back: prompts, sampling, stop strings, n, usage, streaming.

A chat request's messages go through the adapter's own chat template exactly as `finetune chat` renders a turn
(`generate.render_messages`), and its reply is decoded and stripped as `finetune chat` prints it: with
temperature 0 the content equals `finetune chat ADAPTER --prompt ...` for the same adapter and prompt. A completion
request's prompt is plain text (special tokens as the tokenizer adds them), its text is the raw continuation.

Stop strings end a choice where the first one begins (the stop string is not returned); a streamed choice holds
back text that could still turn into a stop string, a half UTF-8 character, and (chat) trailing whitespace, so
the concatenated deltas equal the non-streamed content. Usage counts the prompt's tokens once per prompt and every
generated token, an end-of-sequence token included.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from finetune.errors import FinetuneError, first_line
from finetune.serve import protocol as P
from finetune.serve.engine import Engine, Job, QueueFull
from finetune.serve.registry import Registry, Served


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port (printed when listening)
    api_key: str | None = None  # every endpoint but /health then needs `Authorization: Bearer KEY`
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # requests waiting beyond the batch; more get 429
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # a chat request without max_tokens (as `finetune chat`'s default)
    max_n: int = 8  # choices per request
    max_body_bytes: int = 1 << 20  # request bodies above this get 413


class Choice:
    """One choice's text as tokens arrive (on the engine thread) and what of it may be shown yet."""

    def __init__(self, tok, stops: list[str], strip: bool):
        self.tok, self.stops, self.strip = tok, stops, strip
        self.ids: list[int] = []
        self.text, self.shown = "", 0

    def feed(self, token: int) -> bool:
        """Add a token; True when a stop string has appeared (the text is cut where it begins)."""
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        text = text.lstrip() if self.strip else text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        self.text = text[:min(hits)] if hits else text
        return bool(hits)

    def delta(self, final: bool) -> str:
        """The text not shown yet that is safe to show (all of it when final)."""
        text = self.text
        if final:
            text = text.strip() if self.strip else text
        else:
            if text.endswith("\ufffd"):
                return ""
            held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - held]
            text = text.rstrip() if self.strip else text
        if len(text) <= self.shown:
            return ""
        piece, self.shown = text[self.shown:], len(text)
        return piece


class _Run:
    """A request's jobs in flight: the engine thread puts (index, delta, finish_reason, tokens) events on an
    asyncio queue, the request's coroutine reads them."""

    def __init__(self, served: Served, prompts: list[list[int]], req: P._Request, max_tokens: int, strip: bool):
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.choices = [Choice(served.tok, req.stop, strip) for _ in range(len(prompts) * req.n)]
        self.prompt_tokens = sum(map(len, prompts))
        self.tokens = [0] * len(self.choices)
        self.reasons: list[str | None] = [None] * len(self.choices)
        greedy = req.temperature == 0
        self.jobs = [Job(prompt=p, adapter=served.adapter, max_tokens=max_tokens, eos=served.eos, n=req.n,
                         temperature=req.temperature, top_p=1.0 if greedy else req.top_p, seed=req.seed,
                         emit=self._emitter(k * req.n), finish=self._finisher(k * req.n))
                     for k, p in enumerate(prompts)]

    def _emitter(self, first: int):
        def emit(index: int, token: int) -> bool:
            choice = self.choices[first + index]
            stop = choice.feed(token)
            piece = choice.delta(final=False) if not stop else ""
            if piece:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (first + index, piece, None, 0))
            return stop

        return emit

    def _finisher(self, first: int):
        def finish(index: int, reason: str, tokens: int) -> None:
            piece = self.choices[first + index].delta(final=True)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (first + index, piece, reason, tokens))

        return finish

    def submit(self, engine: Engine) -> None:
        try:
            for job in self.jobs:
                engine.submit(job)
        except QueueFull as e:
            self.cancel()
            raise P.APIError(429, f"The server is busy: {e}; retry later.", type="requests",
                             code="rate_limit_exceeded") from None

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def events(self, raw=None):
        """(index, delta, finish_reason) until every choice has finished; cancels the jobs when the client of
        `raw` (a Starlette request) disconnects or the consumer stops reading."""
        left = len(self.choices)
        try:
            while left:
                try:
                    index, piece, reason, tokens = await asyncio.wait_for(self.queue.get(), 0.5)
                except asyncio.TimeoutError:
                    if raw is not None and await raw.is_disconnected():
                        return
                    continue
                if reason is not None:
                    if reason == "error":
                        raise P.APIError(500, "Generation failed on the server (see its log).", type="server_error")
                    left -= 1
                    self.reasons[index], self.tokens[index] = reason, tokens
                yield index, piece, reason
        finally:
            if left:
                self.cancel()

    def usage(self) -> dict:
        return P.usage(self.prompt_tokens, sum(self.tokens))


class Serving:
    """The endpoints' logic, independent of the HTTP framework (api_router.py maps routes onto it)."""

    def __init__(self, registry: Registry, engine: Engine, options: ServeOptions):
        self.registry, self.engine, self.options = registry, engine, options

    def models(self) -> dict:
        base = self.registry.base_name
        return {"object": "list", "data": [P.model_card(s.name, s.created, None if s.name == base else base)
                                           for s in self.registry.models.values()]}

    async def chat(self, req: P.ChatCompletionRequest, raw=None):
        served = self._served(req)
        from finetune.generate import render_messages

        try:
            prompt = render_messages(served.tok, req.chat_messages(), served.name)
        except FinetuneError as e:
            raise P.APIError(400, str(e), param="messages") from None
        except Exception as e:  # a template refusing the conversation (e.g. roles must alternate)
            raise P.APIError(400, f"The chat template of '{served.name}' refused these messages: {first_line(e)}",
                             param="messages") from None
        run = self._start(served, [prompt], req, req.limit(), strip=True)
        if req.stream:
            return self._chat_stream(run, req, P.new_id("chatcmpl"))
        texts = await self._collect(run, raw)
        return P.chat_completion(P.new_id("chatcmpl"), req.model, list(zip(texts, run.reasons)), run.usage())

    async def completion(self, req: P.CompletionRequest, raw=None):
        served = self._served(req)
        prompts = [served.tok(text)["input_ids"] for text in req.prompts()]
        if not prompts or not all(prompts):
            raise P.APIError(400, "prompt must be one non-empty string or a list of them.", param="prompt")
        run = self._start(served, prompts, req, req.limit(), strip=False)
        if req.stream:
            return self._completion_stream(run, req, P.new_id("cmpl"))
        texts = await self._collect(run, raw)
        choices = [(i, t, r) for i, (t, r) in enumerate(zip(texts, run.reasons))]
        return P.text_completion(P.new_id("cmpl"), req.model, choices, run.usage())

    def _served(self, req: P._Request) -> Served:
        name = req.unsupported()
        if name:
            raise P.APIError(400, f"'{name}' is not supported by finetune serve.", param=name, code="unsupported")
        return self.registry.get(req.model)

    def _start(self, served: Served, prompts: list[list[int]], req: P._Request, max_tokens: int | None,
               strip: bool) -> _Run:
        """Check the request's limits and submit its jobs. Without max_tokens: default_max_tokens, or what the
        context leaves after the prompt when that is less."""
        o, context = self.options, self.engine.context
        longest = max(map(len, prompts))
        max_tokens = max_tokens or max(1, min(o.default_max_tokens, o.max_tokens, context - longest))
        if max_tokens > o.max_tokens:
            raise P.APIError(400, f"max_tokens is {max_tokens}; this server allows at most {o.max_tokens}.",
                             param="max_tokens", code="invalid_value")
        if req.n > min(o.max_n, o.max_batch) or len(prompts) * req.n > o.max_batch:
            raise P.APIError(400, f"n x prompts is {req.n * len(prompts)}; this server allows at most "
                             f"{min(o.max_n, o.max_batch)} choices per request.", param="n", code="invalid_value")
        if longest + max_tokens > context:
            raise P.APIError(400, f"This model's context is {context} tokens; the prompt has {longest} and "
                             f"max_tokens asks for {max_tokens} more.", param="messages",
                             code="context_length_exceeded")
        run = _Run(served, prompts, req, max_tokens, strip)
        run.submit(self.engine)
        return run

    async def _collect(self, run: _Run, raw) -> list[str]:
        texts = [""] * len(run.choices)
        async for index, piece, _ in run.events(raw):
            texts[index] += piece
        return texts

    async def _chat_stream(self, run: _Run, req: P.ChatCompletionRequest, id: str):
        for i in range(len(run.choices)):
            yield _sse(P.chat_chunk(id, req.model, i, {"role": "assistant", "content": ""}))
        try:
            async for index, piece, reason in run.events():
                if piece:
                    yield _sse(P.chat_chunk(id, req.model, index, {"content": piece}))
                if reason:
                    yield _sse(P.chat_chunk(id, req.model, index, {}, reason))
        except P.APIError as e:  # the status line has gone: the error is the stream's last event
            yield _sse(e.body())
        if req.include_usage:
            yield _sse(P.usage_chunk(id, req.model, "chat.completion.chunk", run.usage()))
        yield "data: [DONE]\n\n"

    async def _completion_stream(self, run: _Run, req: P.CompletionRequest, id: str):
        try:
            async for index, piece, reason in run.events():
                yield _sse(P.text_completion(id, req.model, [(index, piece, reason)], None))
        except P.APIError as e:
            yield _sse(e.body())
        if req.include_usage:
            yield _sse(P.usage_chunk(id, req.model, "text_completion", run.usage()))
        yield "data: [DONE]\n\n"


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
