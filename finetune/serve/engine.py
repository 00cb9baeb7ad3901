"""Continuous batching at the token level on one background thread, over the decoding path of `finetune chat` and
`finetune eval --generate` (finetune.generate's Decoder).

A job (one request: a prompt, its adapter, n choices) waits in a bounded queue. Each `step()`:
1. drops cancelled jobs (a client that disconnected) and deletes adapters removed while they were in use;
2. admits waiting jobs while the batch has room, first come first served: their prompts are prefilled together in one
   batched pass (a job's n choices share its prefill), each choice's first token chosen, and their rows join the
   running batch;
3. decodes one token for every running row in one forward pass, each row at its own position. On the lean decode
   step (static KV cache) rows of different adapters share that pass through batched LoRA: one product with every
   adapter's A stacked, each row's columns kept by a mask, one with the stacked B (generate/step.py). An adapter the
   lean step does not model (DoRA) runs on the model's own forward (PEFT) and shares a batch only with itself (its
   job waits, first in line, until the batch drains); so does every adapter when the lean step does not model the
   base (another architecture, a mixture of experts), through PEFT's mixed-adapter batch. PEFT's per-row split
   does not reach a mixture of experts' routers (an adapter training them shares a batch only with itself) nor its
   fused experts (while an adapter on them is loaded, no batch mixes adapters). Serving one adapter (the usual
   `finetune serve runs/x/checkpoint-final`) in float32, a batch of its requests runs it folded into the weights
   (W + s B A, as `chat` does: no LoRA products per token) where memory allows that copy; a base request then waits
   for that batch to drain, as an unmixable adapter does;
4. retires rows that ended (an end-of-sequence id, the job's stop condition, max_tokens, the context): their rows are
   taken by others, so a waiting job can join at the next step.

Greedy choice is argmax of the float32 logits as in `model.generate`, so a reply equals one-by-one generation token
for token (up to floating-point summation order in the batched kernels). Sampling draws from softmax(logits / T)
cut to the top-p nucleus with one torch.Generator per choice, seeded by the request: a seeded request gets the same
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

from finetune.generate import (
    BASE, Decoder, LeanBatch, LeanModel, ModelBatch, Sequence, build_lean, compute_dtype, fits_in_memory, fold_bytes,
    forced, say, why_not_lean,
)

log = logging.getLogger("finetune.serve")
__all__ = ["BASE", "Engine", "Job", "QueueFull"]


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
class Stats:
    steps: int = 0  # decode forward passes
    mixed_steps: int = 0  # of them, over rows of more than one adapter
    max_batch: int = 0  # most rows decoded in one pass
    joined: int = 0  # jobs admitted while other rows were running
    prefills: int = 0  # jobs prefilled
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
        self.decoder: Decoder | None = None
        self.retired: set[str] = set()  # adapters to delete once no row uses them
        self.solo: set[str] = set()  # adapters PEFT cannot mix with others in one batch (DoRA, MoE routers)
        self.unmixed: set[str] = set()  # loaded adapters on MoE experts: while any is, PEFT mixes no batch at all
        self.wakeup = threading.Condition()
        self.stopping, self.thread = False, None
        self._lean: LeanModel | None = None
        self._folded: LeanModel | None = None  # the one served adapter folded into the weights (`_fold_target`)
        self._unmodelled: set[str] | None = None  # adapters the lean step does not model
        self._lean_base: str | None = ""  # why the lean step cannot run the base ("": not asked yet)

    @property
    def rows(self) -> list[Sequence]:
        return self.decoder.rows if self.decoder is not None else []

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

    def adapters_changed(self) -> None:
        """The model's adapters (or the model object) changed: the lean step reads them again at its next use."""
        with self.lock:
            self._lean, self._folded, self._unmodelled = None, None, None
            if self.decoder is not None and isinstance(self.decoder.batch, ModelBatch):
                self.decoder.batch.model, self.decoder.batch.active = self.model, None

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
        """One iteration (see the module docstring). A failing prefill ends its jobs with `error`, a failing
        decoding pass the jobs in the batch; the engine goes on serving."""
        with self.lock:
            try:
                self._drop_cancelled()
                for name in self._deletable():
                    self.model.delete_adapter(name)
                    self.retired.discard(name)
                    self.solo.discard(name)
                    self.unmixed.discard(name)
                    self.adapters_changed()
                self._admit()
                if self.rows:
                    self._decode()
            except Exception:
                for row in self.rows:
                    row.done = row.done or "error"
                if self.rows:
                    self._finish(self.decoder.drop())
                raise

    def _deletable(self) -> list[str]:
        used = {r.adapter for r in self.rows} | {j.adapter for j in self.waiting}
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
            self._finish(self.decoder.drop())

    def _admit(self) -> None:
        jobs = []
        with self.wakeup:
            while self.waiting and self._fits(self.waiting[0], jobs):
                jobs.append(self.waiting.popleft())  # first come, first served: the head waits for room
        if not jobs:
            return
        running = len(self.rows)
        if not running:
            self.decoder = self._decoder(jobs[0].adapter)
        groups = [self._sequences(job) for job in jobs]
        try:
            finished = self.decoder.admit(groups)
        except Exception:  # these jobs fail; the running rows go on
            log.exception("a prefill failed")
            for job in jobs:
                for i in range(job.n):
                    job.finish(i, "error", 0)
            return
        self.stats.prefills += len(jobs)
        self.stats.joined += len(jobs) if running else 0
        self.stats.tokens += sum(map(len, groups))
        self._finish(finished)

    def _fits(self, job: Job, admitting: list[Job]) -> bool:
        """Room in the batch, and an adapter that may share it (one the lean step does not model only shares a
        batch with itself; while an adapter on MoE experts is loaded, every batch holds one adapter)."""
        rows = len(self.rows) + sum(j.n for j in admitting) + job.n
        names = {r.adapter for r in self.rows} | {j.adapter for j in admitting} | {job.adapter}
        if rows > self.max_batch:
            return False
        if len(names) == 1:
            return True
        lead = self.rows[0].adapter if self.rows else (admitting or [job])[0].adapter
        folded = self._folds(self.decoder) if self.rows else lead == self._fold_target()
        return not (names & self._alone() or self.unmixed or folded)

    def _alone(self) -> set[str]:
        """Adapters that never share a batch with another: DoRA (PEFT does not mix it) and, while the lean step
        runs the base, the adapters it does not model."""
        if self._base_reason() is not None:
            return set(self.solo)
        if self._unmodelled is None:
            names = getattr(self.model, "peft_config", None) or {}
            self._unmodelled = {n for n in names if why_not_lean(self.model, [n]) is not None}
        return set(self.solo) | self._unmodelled

    def _base_reason(self) -> str | None:
        if self._lean_base == "":
            self._lean_base = forced() or why_not_lean(self.model, [])
            if self._lean_base is not None:
                say(f"serving with the model's own forward: the lean decode step does not model {self._lean_base}")
        return self._lean_base

    def _decoder(self, adapter: str) -> Decoder:
        """A decoder for a batch starting with `adapter`: the lean step, or the model's forward for what it does not
        model."""
        call = lambda fn, *args: self._forward(fn, *args)  # noqa: E731  (tests replace _forward)
        if self._base_reason() is not None or adapter in self._alone():
            return Decoder(ModelBatch(self.model), self.context, call)
        if adapter == self._fold_target():
            return Decoder(LeanBatch(self._folded_model(adapter)), self.context, call)
        return Decoder(LeanBatch(self._lean_model()), self.context, call)

    def _fold_target(self) -> str | None:
        """The adapter a batch of its own requests runs folded into the weights: the only adapter the lean step
        serves, in float32 (in bf16 the fold would round the sum), where memory allows the folded copy."""
        if self._base_reason() is not None:
            return None
        names = [n for n in getattr(self.model, "peft_config", None) or {} if n not in self._alone()]
        if len(names) != 1 or compute_dtype(self.model) != torch.float32:
            return None
        return names[0] if self._folded is not None or fits_in_memory(fold_bytes(self.model)) else None

    def _folded_model(self, adapter: str) -> LeanModel:
        if self._folded is None or self._folded.folded != adapter:
            self._folded = build_lean(self.model, [], fold=adapter)
        return self._folded

    @staticmethod
    def _folds(decoder: Decoder | None) -> bool:
        return decoder is not None and isinstance(decoder.batch, LeanBatch) and decoder.batch.lm.folded is not None

    def _lean_model(self) -> LeanModel:
        """The lean step's view of the model with every adapter it models stacked (read again after a change)."""
        if self._lean is None:
            alone = self._alone()
            self._lean = build_lean(self.model, [n for n in getattr(self.model, "peft_config", None) or {}
                                                 if n not in alone])
        return self._lean

    def _forward(self, fn, *args):
        """One forward pass of the batch (`fn`: its prefill or decode)."""
        return fn(*args)

    def _sequences(self, job: Job) -> list[Sequence]:
        seed = job.seed if job.seed is not None else random.getrandbits(62)
        out = []
        for i in range(job.n):
            generator = torch.Generator().manual_seed(seed + i) if job.temperature > 0 else None
            emit = (lambda token, i=i: job.emit(i, token))
            out.append(Sequence(job.prompt, job.max_tokens, job.eos, job.adapter, temperature=job.temperature,
                                top_p=job.top_p, generator=generator, emit=emit, job=job, index=i))
        return out

    def _decode(self) -> None:
        if isinstance(self.decoder.batch, LeanBatch):
            lm = self.decoder.batch.lm  # read again if the adapters changed since the last step
            self.decoder.batch.lm = self._folded_model(lm.folded) if lm.folded else self._lean_model()
        n = len(self.rows)
        self.stats.mixed_steps += n > 1 and self.decoder.mixed()
        finished = self.decoder.step()
        self.stats.steps += 1
        self.stats.max_batch = max(self.stats.max_batch, n)
        self.stats.tokens += n
        self._finish(finished)

    def _finish(self, sequences: list[Sequence]) -> None:
        for s in sequences:
            s.job.finish(s.index, s.done, len(s.tokens))
