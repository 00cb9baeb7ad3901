"""Continuous batching at the token level on one background thread.

A job (one request: a prompt, its adapter, n choices) waits in a bounded queue. Each `step()`:
1. drops cancelled jobs (a client that disconnected) and deletes adapters removed while they were in use;
2. admits waiting jobs while the batch has room: each is prefilled alone (batch 1, no padding, exactly the forward
   `model.generate` runs first), its KV cache copied n times, its first token chosen, and its rows joined to the
   running batch (the shorter of the two caches left-padded with masked zeros);
3. decodes one token for every running row in one forward pass: input = each row's last token, position = its own
   length, attention mask = its real tokens; rows whose jobs name different adapters share that pass through PEFT's
   mixed-adapter batch (`adapter_names=` per row; "__base__" for the base model). A batch of one adapter uses the
   plain path (`set_adapter`), which costs no per-row routing. PEFT does not mix DoRA adapters, nor adapters that
   train a mixture of experts' routers (its per-row split does not reach a router's flattened tokens): a job for
   one joins only a batch of its own adapter (and waits, first in line, until the batch drains otherwise); while
   an adapter on MoE experts (PEFT's target_parameters) is loaded no batch mixes adapters;
4. retires rows that ended (an end-of-sequence id, the job's stop condition, max_tokens, the context): their cache
   rows are cut out and fully padded columns trimmed, so a waiting job can join at the next step.

Greedy choice is argmax of the float32 logits as in `model.generate`; padding is masked to exact zeros in
attention, so a reply equals one-by-one generation token for token (up to floating-point summation order in the
batched kernels, which has not changed an argmax in the tests). Sampling draws from softmax(logits / T) cut to the
top-p nucleus with one torch.Generator per choice, seeded by the request: a seeded request gets the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

log = logging.getLogger("finetune.serve")
BASE = "__base__"  # PEFT's name, in a mixed batch, for rows answered by the base model


class QueueFull(Exception):
    """More jobs wait than the engine's max_queue allows."""


@dataclass
class Job:
    """One request as the engine sees it. `emit(index, token) -> bool` receives each generated token of choice
    `index` (not the end-of-sequence one) and returns True to end that choice (a stop string); `finish(index,
    reason, tokens)` is called once per choice with reason stop | length | cancelled | error and the number of
    tokens generated (the end-of-sequence token included). Both run on the engine thread and must be quick."""

    prompt: list[int]
    adapter: str  # PEFT adapter name or BASE
    max_tokens: int
    eos: frozenset[int]
    emit: Callable[[int, int], bool]
    finish: Callable[[int, str, int], None]
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """Thread-safe: the engine drops this job's rows at its next step."""
        self.cancelled = True


@dataclass
class _Row:
    job: Job
    index: int
    length: int  # real tokens in the cache
    last: int = -1  # the token to feed next
    generated: int = 0
    generator: torch.Generator | None = None
    done: str | None = None


@dataclass
class Stats:
    steps: int = 0  # decode forward passes
    mixed_steps: int = 0  # of them, through PEFT's mixed-adapter batch
    max_batch: int = 0  # most rows decoded in one pass
    joined: int = 0  # jobs admitted while other rows were running
    prefills: int = 0
    cancelled: int = 0
    tokens: int = 0


@dataclass
class Engine:
    model: object
    context: int  # positions the model takes (max_position_embeddings)
    max_batch: int = 16
    max_queue: int = 64
    lock: threading.RLock = field(default_factory=threading.RLock)  # held for a step; registry changes take it
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self):
        self.waiting: collections.deque[Job] = collections.deque()
        self.rows: list[_Row] = []
        self.cache, self.mask = None, None
        self.active: str | None = None  # adapter set on the model for the plain path (None: unknown)
        self.retired: set[str] = set()  # adapters to delete once no row uses them
        self.solo: set[str] = set()  # adapters PEFT cannot mix with others in one batch (DoRA, MoE routers)
        self.unmixed: set[str] = set()  # loaded adapters on MoE experts: while any is, PEFT mixes no batch at all
        self.wakeup = threading.Condition()
        self.stopping, self.thread = False, None
        self.device = next(self.model.parameters()).device

    # ------------------------------------------------------------------ outside the engine thread

    def submit(self, job: Job) -> None:
        with self.wakeup:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self.waiting.append(job)
            self.wakeup.notify()

    def retire_adapter(self, name: str) -> None:
        """Delete PEFT adapter `name` once no running or waiting job uses it."""
        with self.wakeup:
            self.retired.add(name)
            self.wakeup.notify()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="finetune-serve-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every admitted and waiting job, then end the thread."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def load(self) -> dict:
        return {"running": len(self.rows), "waiting": len(self.waiting), **vars(self.stats)}

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while True:
            with self.wakeup:
                while not (self.waiting or self.rows or self.stopping or self._deletable()):
                    self.wakeup.wait()
                if self.stopping and not (self.waiting or self.rows):
                    return
            try:
                self.step()
            except Exception:  # the jobs it held got `error`; the next request is served as usual
                log.exception("a decoding step failed")

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration (see the module docstring). A failing prefill ends its job with `error`, a failing
        decoding pass the jobs in the batch; the engine goes on serving."""
        with self.lock:
            try:
                self._drop_cancelled()
                for name in self._deletable():
                    self.model.delete_adapter(name)
                    self.retired.discard(name)
                    self.solo.discard(name)
                    self.unmixed.discard(name)
                    self.active = None
                self._admit()
                if self.rows:
                    self._decode()
            except Exception:
                for row in self.rows:
                    row.done = row.done or "error"
                self._retire()
                raise

    def _deletable(self) -> list[str]:
        used = {r.job.adapter for r in self.rows} | {j.adapter for j in self.waiting}
        return sorted(self.retired - used)

    def _drop_cancelled(self) -> None:
        with self.wakeup:
            gone = [j for j in self.waiting if j.cancelled]
            for job in gone:
                self.waiting.remove(job)
        for job in gone:
            self.stats.cancelled += 1
            for i in range(job.n):
                job.finish(i, "cancelled", 0)
        for row in self.rows:
            if row.job.cancelled and row.done is None:
                row.done = "cancelled"
        if any(r.done for r in self.rows):
            self.stats.cancelled += len({id(r.job) for r in self.rows if r.done == "cancelled"})
            self._retire()

    def _admit(self) -> None:
        while True:
            with self.wakeup:
                if not self.waiting or not self._fits(self.waiting[0]):
                    return  # first come, first served: the head waits for room, so no job starves
                job = self.waiting.popleft()
            try:
                self._prefill(job)
            except Exception:  # this job fails alone; the running rows go on
                log.exception("a prefill failed")
                for i in range(job.n):
                    job.finish(i, "error", 0)

    def _fits(self, job: Job) -> bool:
        """Room in the batch, and an adapter that may share it (a DoRA adapter only shares with itself; while an
        adapter on MoE experts is loaded, every batch holds one adapter: PEFT's expert wrapper refuses mixed ones)."""
        names = {r.job.adapter for r in self.rows} | {job.adapter}
        mixable = not (names & self.solo or self.unmixed)
        return len(self.rows) + job.n <= self.max_batch and (len(names) == 1 or mixable)

    def _prefill(self, job: Job) -> None:
        from transformers import DynamicCache

        ids = torch.tensor([job.prompt], device=self.device)
        cache = DynamicCache()
        out = self._forward(ids, torch.ones_like(ids), None, cache, [job.adapter])
        self.stats.prefills += 1
        seed = job.seed if job.seed is not None else random.getrandbits(62)
        rows = []
        for i in range(job.n):
            generator = None
            if job.temperature > 0:
                generator = torch.Generator(device=self.device).manual_seed(seed + i)
            rows.append(_Row(job, i, len(job.prompt), generator=generator))
        self._accept(rows, out.logits[:, -1].expand(job.n, -1))
        if job.n > 1:
            cache.batch_repeat_interleave(job.n)
        live = [r for r in rows if r.done is None]
        if not live:
            return
        if len(live) < len(rows):
            cache.batch_select_indices(torch.tensor([r.index for r in live], device=self.device))
        mask = torch.ones(len(live), len(job.prompt), dtype=torch.long, device=self.device)
        if self.rows:
            self.stats.joined += 1
        self._join(live, cache, mask)

    def _decode(self) -> None:
        ids = torch.tensor([[r.last] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.length] for r in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        out = self._forward(ids, self.mask, positions, self.cache, [r.job.adapter for r in self.rows])
        self.stats.steps += 1
        self.stats.max_batch = max(self.stats.max_batch, len(self.rows))
        for r in self.rows:
            r.length += 1
        self._accept(self.rows, out.logits[:, -1])
        self._retire()

    def _forward(self, ids, mask, positions, cache, adapters: list[str]):
        """One forward pass; `adapters` names each row's adapter (BASE: none)."""
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "cache": cache,
                  "use_cache": True, "logits_to_keep": 1}
        names = set(adapters)
        if not hasattr(self.model, "peft_config"):
            return self.model(**kwargs)
        if not self.model.peft_config:  # every adapter removed: PeftModel.forward wants an active one
            return self.model.base_model.model(**kwargs)
        if len(names) > 1:
            self.stats.mixed_steps += len(ids) > 1
            return self.model(**kwargs, adapter_names=adapters)
        if adapters[0] == BASE:
            with self.model.disable_adapter():
                return self.model(**kwargs)
        if self.active != adapters[0]:
            self.model.set_adapter(adapters[0])
            self.active = adapters[0]
        return self.model(**kwargs)

    def _accept(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token from its logits and hand it to its job; mark rows that ended."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            job = row.job
            token = greedy[i] if row.generator is None else _sample(logits[i], job.temperature, job.top_p,
                                                                   row.generator)
            row.generated += 1
            self.stats.tokens += 1
            if token in job.eos:
                row.done = "stop"
            elif job.emit(row.index, token):
                row.done = "stop"
            elif row.generated >= job.max_tokens or row.length >= self.context:  # no position left to feed it
                row.done = "length"
            row.last = token
            if row.done:
                job.finish(row.index, row.done, row.generated)

    def _join(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        """Add prefilled rows (their cache and mask) to the running batch, left-padding the shorter side."""
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.rows = self.rows + rows

    def _retire(self) -> None:
        """Cut finished rows out of the batch and trim the columns no remaining row attends to."""
        keep = [i for i, r in enumerate(self.rows) if r.done is None]
        if len(keep) == len(self.rows):
            return
        for i, r in enumerate(self.rows):
            if r.done == "cancelled" or r.done == "error":
                r.job.finish(r.index, r.done, r.generated)
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        start = int(self.mask.any(dim=0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One draw from softmax(logits / temperature), restricted to the smallest set of tokens whose probability
    reaches top_p (the most likely token always stays)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(descending=True)
        probs[(probs.cumsum(0) - probs) > top_p] = 0.0
        return int(order[torch.multinomial(probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
