"""The rows a decoder runs, and their KV cache: `LeanBatch` (the lean step over a static cache) and `ModelBatch` (the
model's own forward over a transformers cache, for what the lean step does not model).

Both keep row i of the cache for the decoder's sequence i and answer the same four calls:
- `prefill(prompts, adapters)`: new rows at the end, the logits of each prompt's last token;
- `fork(row, copies)`: copies of a row at the end (n choices of one prompt share its prefill);
- `decode(tokens, adapters)`: one token per row at its own position, the logits of the next;
- `keep(rows)`: only these rows stay; returns the old indices in their new order.
`adapters` name each row's PEFT adapter (None: the base).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from finetune.generate.lean import LeanModel
from finetune.generate.step import Cache, forward

BASE = "__base__"  # PEFT's name, in a mixed batch, for rows answered by the base model
COMPILE = "FINETUNE_DECODE_COMPILE"  # 1: the lean step compiled by torch.compile (inductor)
log = logging.getLogger("finetune.generate")
_compiled: dict[str, object] = {}


def decode_step():
    """The lean forward pass, compiled by torch.compile's inductor backend (dynamic shapes: one graph for every batch
    size and length; the graph cache kept on disk, ~/.cache/finetune/inductor unless TORCHINDUCTOR_CACHE_DIR says
    otherwise) when FINETUNE_DECODE_COMPILE=1. Off by default: on a 2-core AVX2 CPU it bought 1.22x at batch 1 and
    1.12x at batch 4 (docs/performance.md, Decoding) for several minutes of compiling before the first token of each
    new batch size. A compile that fails falls back to the eager step, named in the log."""
    if os.environ.get(COMPILE, "0") != "1" or _compiled.get("failed"):
        return forward
    if "step" not in _compiled:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "finetune" / "inductor"))
        _compiled["step"] = torch.compile(forward, dynamic=True)
    return _guarded


def _guarded(*args):
    """The compiled step; on a compile error the eager one (for this call and every later one)."""
    if _compiled.get("failed"):
        return forward(*args)
    try:
        return _compiled["step"](*args)
    except Exception as e:  # dynamo / inductor / the C++ compiler: anything, and the eager step still works
        _compiled["failed"] = True
        log.warning("decoding without torch.compile: compiling the decode step failed (%s: %s)",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return forward(*args)


class LeanBatch:
    """Rows of a static KV cache, kept dense (0..n-1): a row that leaves is filled by the last one. The cache grows
    (rows and positions, rarely: by half again) when a prompt or a decoded token needs room; attention reads only the
    positions the longest row has reached."""

    def __init__(self, lm: LeanModel, step=None):
        self.lm, self.step = lm, step or decode_step()
        self.lengths: list[int] = []
        self.cache: Cache | None = None

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def prefill(self, prompts: list[list[int]], adapters: list[str | None]) -> torch.Tensor:
        n, width = len(prompts), max(map(len, prompts))
        start = self.rows
        self._reserve(start + n, width)
        ids = torch.zeros(n, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        positions = torch.arange(width)[None].expand(n, width)
        last = torch.tensor([len(p) - 1 for p in prompts])
        logits = self.step(self.lm, self.cache, ids, positions, start, width, self._adapters(adapters), last)
        self.lengths += [len(p) for p in prompts]
        return logits

    def fork(self, row: int, copies: int) -> None:
        self._reserve(self.rows + copies, 1)
        span = self.lengths[row]
        for t in self.cache.keys + self.cache.values:
            t[self.rows : self.rows + copies, :, :span] = t[row : row + 1, :, :span]
        self.lengths += [span] * copies

    def decode(self, tokens: list[int], adapters: list[str | None]) -> torch.Tensor:
        n = self.rows
        self._reserve(n, max(self.lengths) + 1)
        positions = torch.tensor(self.lengths)[:, None]
        logits = self.step(self.lm, self.cache, torch.tensor(tokens)[:, None], positions, 0, max(self.lengths) + 1,
                           self._adapters(adapters))
        self.lengths = [x + 1 for x in self.lengths]
        return logits

    def keep(self, rows: list[int]) -> list[int]:
        """Leaving rows' places are taken by the last staying rows: one row copied per hole, not the whole cache."""
        order = list(range(self.rows))
        stay = set(rows)
        holes = [i for i in range(len(rows)) if i not in stay]
        movers = [i for i in range(len(rows), self.rows) if i in stay]
        for hole, mover in zip(holes, movers):
            span = self.lengths[mover]
            for t in self.cache.keys + self.cache.values:
                t[hole, :, :span] = t[mover, :, :span]
            order[hole], self.lengths[hole] = mover, span
        del order[len(rows):], self.lengths[len(rows):]
        return order

    def _adapters(self, names: list[str | None]) -> int | torch.Tensor:
        index = [self.lm.index(a) for a in names]
        return index[0] if len(set(index)) == 1 else torch.tensor(index)

    def _reserve(self, rows: int, positions: int) -> None:
        lm, have = self.lm, self.cache
        old_rows, old_positions = (have.keys[0].shape[0], have.keys[0].shape[2]) if have else (0, 0)
        if rows <= old_rows and positions <= old_positions:
            return
        rows = max(rows, old_rows)
        positions = max(old_positions, -(-max(positions, old_positions * 3 // 2) // 64) * 64)
        shape = (rows, lm.kv_heads, positions, lm.head_dim)
        cache = Cache([torch.zeros(shape, dtype=lm.dtype) for _ in lm.layers],
                      [torch.zeros(shape, dtype=lm.dtype) for _ in lm.layers])
        if have is not None:
            for new, old in zip(cache.keys + cache.values, have.keys + have.values):
                new[:old_rows, :, :old_positions] = old
        self.cache = cache


class ModelBatch:
    """Rows decoded by the model's own forward (PEFT's adapters, any architecture transformers runs): each prompt is
    prefilled alone (batch 1, no padding, the forward `model.generate` runs first) and joins the running batch with
    the shorter of the two caches left-padded with masked zeros; rows of different adapters share a pass through
    PEFT's mixed-adapter batch (`adapter_names=`), one adapter's through `set_adapter`."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache, self.mask, self.lengths = None, None, []
        self.active: str | None = None  # the adapter set on the model (None: unknown)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def prefill(self, prompts: list[list[int]], adapters: list[str | None]) -> torch.Tensor:
        from transformers import DynamicCache

        out, caches = [], []
        for prompt, adapter in zip(prompts, adapters):
            ids = torch.tensor([prompt], device=self.device)
            caches.append(DynamicCache())
            out.append(self._forward(ids, torch.ones_like(ids), None, caches[-1], [adapter]).logits[:, -1].float())
        for prompt, cache in zip(prompts, caches):  # all prefilled: a failure leaves the running rows as they were
            self._join(cache, torch.ones(1, len(prompt), dtype=torch.long, device=self.device))
            self.lengths.append(len(prompt))
        return torch.cat(out)

    def fork(self, row: int, copies: int) -> None:
        index = torch.tensor(list(range(self.rows)) + [row] * copies, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.lengths += [self.lengths[row]] * copies

    def decode(self, tokens: list[int], adapters: list[str | None]) -> torch.Tensor:
        ids = torch.tensor(tokens, device=self.device)[:, None]
        positions = torch.tensor(self.lengths, device=self.device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        out = self._forward(ids, self.mask, positions, self.cache, adapters)
        self.lengths = [x + 1 for x in self.lengths]
        return out.logits[:, -1].float()

    def keep(self, rows: list[int]) -> list[int]:
        self.lengths = [self.lengths[i] for i in rows]
        if not rows:
            self.cache = self.mask = None
            return rows
        index = torch.tensor(rows, device=self.device)
        self.mask = self.mask[index]
        start = int(self.mask.any(dim=0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        return rows

    def _forward(self, ids, mask, positions, cache, adapters: list[str | None]):
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "cache": cache,
                  "use_cache": True, "logits_to_keep": 1}
        model, names = self.model, [a or BASE for a in adapters]
        if not hasattr(model, "peft_config"):
            return model(**kwargs)
        if not model.peft_config:  # every adapter removed: PeftModel.forward wants an active one
            return model.base_model.model(**kwargs)
        if len(set(names)) > 1:
            return model(**kwargs, adapter_names=names)
        if names[0] == BASE:
            with model.disable_adapter():
                return model(**kwargs)
        if self.active != names[0]:
            model.set_adapter(names[0])
            self.active = names[0]
        return model(**kwargs)

    def _join(self, cache, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
