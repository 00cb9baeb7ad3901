"""LoRA's input dropout on CPU: cheap random integers, one mask per input tensor, the scale left to the product."""

from __future__ import annotations

import weakref

import torch

LEVELS = 2**16  # p is a multiple of 1 / LEVELS


def drop_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A boolean tensor of `shape`, True (drop) with probability round(p * 2^16) / 2^16, from the global generator.

    Each random 64-bit word (random_ over int64's full range: one generator call per four values) is cut into
    four signed 16-bit integers, uniform on [-2^15, 2^15); a value drops where its integer is below
    round(p * 2^16) - 2^15. One comparison per value: no bit masking, no random double per value."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    return words.view(torch.int16)[:n].view(shape) < round(p * LEVELS) - LEVELS // 2


class CpuDropout(torch.nn.Dropout):
    """LoRA's input dropout on CPU: the same distribution as torch's, a 1-byte mask, one mask per input tensor.

    torch's CPU dropout draws its mask with a Bernoulli kernel that takes one random double per value (outside
    Intel's MKL path), and peft draws one mask per adapter, seven per decoder layer, though q, k and v (and gate
    and up) read the same tensor. Here the mask comes from `drop_mask` (16-bit integers from the global generator,
    which checkpoints save: resume stays exact), p rounded to a multiple of 2^-16 (0.05 -> 0.0500031), kept
    values scaled by 1 / (1 - that p), so E[output] = input exactly. Autograd keeps the boolean mask.

    One instance may serve several adapters (`use_cpu_dropout` gives the adapters of one module a single
    instance): the same input tensor then gets the same mask, drawn once, and the dropped tensor is computed and
    kept for backward once. Each adapter still sees dropout with probability p on every value, as with separate
    masks; what changes is that the adapters reading one input drop the same values (a correlated regulariser).
    `dropped` returns the zeroed input without the scale, for finetune.model.fused to fold into its product;
    `forward` the scaled one, as torch's dropout, for peft's own forward (DoRA, AdaLoRA, ...).
    On GPU, torch's fused dropout is used unchanged (one mask per call)."""

    _cache: tuple | None = None  # (weak reference to the last input, its dropped copy, whether that is scaled)

    @property
    def scale(self) -> float:
        return LEVELS / (LEVELS - round(self.p * LEVELS))

    def dropped(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x with the dropped values zeroed, the scale the kept values still need): 1.0 when nothing drops."""
        if not self.training or self.p == 0:
            return x, 1.0
        if x.device.type != "cpu":
            return super().forward(x), 1.0
        hit = self._hit(x)
        if hit is not None:
            return hit[1], 1.0 if hit[2] else self.scale
        out = torch.where(drop_mask(x.shape, self.p), 0.0, x)  # one pass; masked_fill is a clone, then a fill
        self._keep(x, out, scaled=False)
        return out, self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout as torch's (kept values scaled): the form peft's own forward (DoRA, AdaLoRA, ...) calls."""
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        hit = self._hit(x)
        if hit is not None:
            return hit[1] if hit[2] else hit[1] * self.scale
        out = torch.where(drop_mask(x.shape, self.p), 0.0, x).mul_(self.scale)
        self._keep(x, out, scaled=True)
        return out

    def _hit(self, x: torch.Tensor) -> tuple | None:
        cache = self._cache
        return cache if cache is not None and cache[0]() is x else None

    def _keep(self, x: torch.Tensor, out: torch.Tensor, scaled: bool) -> None:
        # held until its input is freed (in training, with the graph after backward): the adapters reading x
        # next find it here; autograd keeps `out` that long anyway
        self._cache = (weakref.ref(x, self._forget), out, scaled)

    def _forget(self, ref) -> None:
        if self._cache is not None and self._cache[0] is ref:
            self._cache = None

    def __getstate__(self):  # copies and pickles start without the cache
        state = self.__dict__.copy()
        state.pop("_cache", None)
        return state


class PerAdapterDropout(torch.nn.Dropout):
    """The CPU dropout of runs begun before masks were shared (finetune before 2026-12-05), kept so that such a
    run resumes on its own random stream: one mask per adapter, from the low 15 bits of each quarter of a random
    63-bit word, p rounded to a multiple of 2^-15, kept values scaled by 1 / (1 - that p)."""

    LEVELS = 2**15

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        drop = round(self.p * self.LEVELS)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
        mask = (words.view(torch.int16)[:n].view(x.shape) & (self.LEVELS - 1)) < drop
        return x.masked_fill(mask, 0).mul_(self.LEVELS / (self.LEVELS - drop))


def use_cpu_dropout(model, shared: bool = True) -> None:
    """On CPU, the dropout of LoRA adapters becomes a `CpuDropout` of the same p, one instance for the adapters
    of one module (attention's q/k/v/o, the MLP's gate/up/down: those reading the same tensor share its mask)
    and p. No weights: checkpoints are unchanged. `shared` False: a `PerAdapterDropout` each, the masks of runs
    begun before masks were shared (a resumed run keeps its random stream: finetune/train/records.py)."""
    from peft.tuners.lora import LoraLayer

    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return
    masks: dict[tuple[str, str, float], CpuDropout] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            parent = path.rsplit(".", 1)[0]
            for name, dropout in module.lora_dropout.items():
                if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                    if not shared:
                        module.lora_dropout[name] = PerAdapterDropout(dropout.p)
                        continue
                    key = (parent, name, dropout.p)
                    module.lora_dropout[name] = masks.setdefault(key, CpuDropout(dropout.p))
