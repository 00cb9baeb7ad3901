"""The one decoding loop: `chat`, `eval --generate`, training's generation metrics, GRPO's rollouts and `serve` all
decode through a `Decoder`.

A `Sequence` is one completion being generated. `admit` prefills new ones (several prompts in one batched pass on
the lean step; n sequences of one prompt share its prefill) and `step` decodes one token for every running sequence
in one forward pass; sequences that end leave the batch at once, so waiting ones take their rows at the next call
(continuous batching). Per token, the only Python is choosing each row's token and checking its stop conditions.

Greedy choice is argmax of the float32 logits, as `model.generate`'s. Sampling draws from softmax(logits / T), cut
to the top_k most likely tokens and then to the top_p nucleus, with each sequence's own torch.Generator: a seeded
sequence gets the same tokens whatever else shares its batch.

`lean_decoder` decodes a model's active adapter on the lean step (lean.py) where it models the network; callers fall
back to the model's own forward where it does not (named in the log once per reason).
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from finetune.generate import lean, weights
from finetune.generate.batch import BASE, LeanBatch

log = logging.getLogger("finetune.generate")
_said: set[str] = set()
_LEAN: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()


@dataclass
class Sequence:
    """One completion. `emit(token) -> bool` sees each generated token but an end-of-sequence one and returns True
    to end it (a stop string). `done`: stop | length, or what the caller set (cancelled, error)."""

    prompt: list[int]
    max_new_tokens: int
    eos: frozenset[int]
    adapter: str | None = None  # PEFT adapter name; None (or BASE): the base
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    generator: torch.Generator | None = None
    emit: Callable[[int], bool] | None = None
    tokens: list[int] = field(default_factory=list)  # generated, the end-of-sequence token included
    done: str | None = None
    job: object = None  # the caller's (the server's request)
    index: int = 0  # the caller's (the choice's number)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)


class Decoder:
    """Sequences running on one batch of rows (LeanBatch or ModelBatch). `call(fn, *args)` runs each forward pass
    (the server wraps it); `context`: positions the model takes."""

    def __init__(self, rows, context: int | None = None, call: Callable | None = None):
        self.batch, self.context = rows, context
        self.call = call or (lambda fn, *args: fn(*args))
        self.rows: list[Sequence] = []
        self.adapter: str | None = None  # what a plain forward of the model applies (`lean_decoder`)

    @property
    def lean(self) -> bool:
        return isinstance(self.batch, LeanBatch)

    def admit(self, groups: list[list[Sequence]]) -> list[Sequence]:
        """Prefill each group's prompt (the group's sequences share prompt and adapter) in one pass, choose every
        sequence's first token; returns the sequences that already ended (they never join)."""
        if not groups:
            return []
        logits = self.call(self.batch.prefill, [g[0].prompt for g in groups], [g[0].adapter for g in groups])
        start = self.batch.rows - len(groups)
        for k, group in enumerate(groups):
            if len(group) > 1:
                self.batch.fork(start + k, len(group) - 1)
        rows = [g[0] for g in groups] + [s for g in groups for s in g[1:]]
        rows_logits = torch.cat([logits, *(logits[k : k + 1].expand(len(g) - 1, -1)
                                           for k, g in enumerate(groups) if len(g) > 1)])
        self.rows += rows
        self._accept(rows, rows_logits)
        return self._leave()

    def step(self) -> list[Sequence]:
        """Decode one token for every running sequence; returns the ones that ended."""
        if not self.rows:
            return []
        logits = self.call(self.batch.decode, [s.tokens[-1] for s in self.rows], [s.adapter for s in self.rows])
        self._accept(self.rows, logits)
        return self._leave()

    def mixed(self) -> bool:
        return len({s.adapter or BASE for s in self.rows}) > 1

    def drop(self) -> list[Sequence]:
        """Remove the sequences a caller marked done (cancelled); returns them."""
        return self._leave()

    def _accept(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        # max's indices are argmax's (the first of equal maxima; NaN counts as the largest) in 2.5-3x less time:
        # 33 us against 85 at one 49k-vocabulary row, 224 against 632 at 16 rows (2-core AMX Xeon)
        greedy = logits.max(dim=-1).indices.tolist()
        for i, s in enumerate(rows):
            token = greedy[i] if s.temperature <= 0 else sample(logits[i], s)
            s.tokens.append(token)
            if token in s.eos or (s.emit is not None and s.emit(token)):
                s.done = "stop"
            elif len(s.tokens) >= s.max_new_tokens or (self.context is not None and s.length >= self.context):
                s.done = "length"

    def _leave(self) -> list[Sequence]:
        gone = [s for s in self.rows if s.done]
        if gone:
            order = self.batch.keep([i for i, s in enumerate(self.rows) if not s.done])
            self.rows = [self.rows[i] for i in order]
        return gone


NUCLEUS_CANDIDATES = 128  # tokens sorted for a top_p draw before the whole vocabulary is


def sample(logits: torch.Tensor, s: Sequence) -> int:
    """One draw from softmax(logits / temperature) cut to the top_k tokens, then to the smallest set whose
    probability reaches top_p (the most likely token always stays)."""
    logits = logits / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        cut = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < cut, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        # the nucleus is nearly always among the most likely few dozen: sort those (a whole 49k vocabulary took
        # 4 ms a row, half of GRPO's generation), the whole vocabulary only when the nucleus reaches past them
        every = probs
        probs, order = every.topk(min(NUCLEUS_CANDIDATES, len(every)))
        if len(probs) < len(every) and probs[:-1].sum() <= s.top_p:
            probs, order = every.sort(descending=True)
        probs[(probs.cumsum(0) - probs) > s.top_p] = 0.0
        return int(order[torch.multinomial(probs, 1, generator=s.generator)])
    return int(torch.multinomial(probs, 1, generator=s.generator))


def lean_decoder(model, context: int | None = None) -> Decoder | None:
    """A decoder over `model`'s active adapter (folded into the weights in float32 compute, where memory allows; in
    bf16 into the int8 copies where FINETUNE_DECODE_WEIGHTS=int8, beside the exact weights) on the lean step; None,
    with the reason in the log, where the lean step does not model `model`."""
    several = getattr(model, "peft_config", None) and len(model.active_adapters) > 1
    active = active_adapter(model)
    reason = forced() or ("several adapters active at once" if several else
                          lean.why_not_lean(model, [active] if active else []))
    if reason is not None:
        say(f"decoding with the model's own generate: the lean decode step does not model {reason}")
        return None
    decoder = Decoder(LeanBatch(lean_model(model)), context)
    decoder.adapter = active
    return decoder


def lean_model(model) -> lean.LeanModel:
    """`lean.build_lean` for the active adapter, kept while `model` lives and until that adapter's weights change (GRPO
    trains them between rollouts; `finetune chat` asks again for every reply) or FINETUNE_DECODE_WEIGHTS does."""
    active = active_adapter(model)
    params = [p for n, p in model.named_parameters() if active is not None and f".{active}." in n and "lora_" in n]
    key = (active, tuple(p._version for p in params), tuple(p.data_ptr() for p in params), weights.int8_requested())
    kept = _LEAN.get(model)
    if kept is not None and kept[0] == key:
        return kept[1]
    folds = active is not None and weights.compute_dtype(model) == torch.float32 and \
        weights.fits_in_memory(weights.fold_bytes(model))
    built = lean.build_lean(model, [active] if active else [], fold=active if folds else None,
                            fold_int8=None if folds else active)
    _LEAN[model] = (key, built)
    return built


def active_adapter(model) -> str | None:
    """The adapter a plain forward of `model` applies (None: no PEFT adapter, or adapters disabled)."""
    if not getattr(model, "peft_config", None):
        return None
    for module in model.modules():
        if hasattr(module, "lora_A") and module.lora_A:
            if module.disable_adapters or getattr(module, "merged", False):
                return None
            break
    active = model.active_adapters
    return active[0] if len(active) == 1 else None


def forced() -> str | None:
    """FINETUNE_DECODE=model: every caller decodes with the model's own forward (`generate`), as before the lean
    step: the way to compare the two, or to step around the lean step."""
    return "anything (FINETUNE_DECODE=model)" if os.environ.get("FINETUNE_DECODE") == "model" else None


def say(message: str) -> None:
    """Log `message` once per process."""
    if message not in _said:
        _said.add(message)
        log.warning(message)
