"""The OpenAI API's shapes (as vLLM's entrypoints/openai/protocol.py keeps them): request bodies validated by pydantic,
responses and stream chunks built as plain models, and the error body every 4xx/5xx answer carries:
`{"error": {"message", "type", "param", "code"}}`.

Parameters the server does not implement (tools, logprobs, penalties other than 0, logit_bias, echo, suffix) are
refused with a 400 naming the parameter rather than silently ignored; unknown extra keys are ignored, as the
OpenAI clients send some (e.g. `user`, `stream_options`) that change nothing here.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from finetune.recipe import is_text


def _unicode(v: str) -> str:
    if not is_text(v):
        raise ValueError("holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not Unicode text")
    return v


Text = Annotated[str, AfterValidator(_unicode)]  # what reaches the tokenizer: encodable as UTF-8


class APIError(Exception):
    """An answer other than 200: its HTTP status and the OpenAI error body's fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy (what `finetune chat` does)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Union[Text, list[Text], None] = Field(None, validate_default=True)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[dict] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict] = None
    logprobs: Union[bool, int, None] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def unsupported(self) -> str | None:
        """The first parameter asked for that this server does not implement (None: all fine)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name
        if self.logit_bias:
            return "logit_bias"
        if self.logprobs:
            return "logprobs"
        return None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list] = None
    response_format: Optional[dict] = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        return super().unsupported()

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict]:
        """role/content dicts as chat templates take them (`developer` is OpenAI's newer name for system)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: Union[Text, list[Text]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: Optional[str] = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        return super().unsupported()

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def limit(self) -> int | None:
        return self.max_tokens


class AdapterRequest(BaseModel):
    """POST /v1/adapters: serve the adapter checkpoint at `path` as model `name`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
    path: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens).model_dump()


def chat_completion(id: str, model: str, choices: list[tuple[str, str]], use: dict) -> dict:
    """`chat.completion`: one (content, finish_reason) per choice."""
    return {"id": id, "object": "chat.completion", "created": now(), "model": model, "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, (text, reason) in enumerate(choices)], "usage": use}


def chat_chunk(id: str, model: str, index: int, delta: dict, finish_reason: str | None = None) -> dict:
    """`chat.completion.chunk` with one choice's delta (`{"role": ...}` first, then `{"content": ...}`)."""
    return {"id": id, "object": "chat.completion.chunk", "created": now(), "model": model, "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def text_completion(id: str, model: str, choices: list[tuple[int, str, str | None]], use: dict | None) -> dict:
    """`text_completion`: (index, text, finish_reason) per choice (also each stream chunk: one choice, no usage)."""
    return {"id": id, "object": "text_completion", "created": now(), "model": model, "system_fingerprint": None,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, text, reason in choices], **({"usage": use} if use else {})}


def usage_chunk(id: str, model: str, object: str, use: dict) -> dict:
    """The last chunk of a stream with `stream_options: {"include_usage": true}`: no choices, the usage."""
    return {"id": id, "object": object, "created": now(), "model": model, "choices": [], "usage": use}


def model_card(name: str, created: int, parent: str | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "finetune", "parent": parent}
