"""LoRA's input dropout on CPU: the dropped positions drawn as geometric gaps, one draw per input tensor, the scale
left to the product."""

from __future__ import annotations

import math
import weakref

import torch

LEVELS = 2**16  # the byte masks' p is a multiple of 1 / LEVELS
POSITIONS_MAX_P = 0.125  # above it, 8-byte positions would hold more memory than a 1-byte mask


def drop_positions(n: int, p: float) -> torch.Tensor:
    """The sorted int64 positions in [0, n) to drop, each independently with probability p (0 < p < 1), from the
    global generator.

    In a sequence of Bernoulli(p) trials the numbers of kept values between drops are independent geometric gaps,
    G = floor(log(1 - U) / log(1 - p)) for U uniform on [0, 1), so a draw of n values takes about n p uniforms
    instead of one random number per value: position_k = (G_1 + 1) + ... + (G_k + 1) - 1. In float64, so p is
    exact to double precision and the floor falls alike on every CPU (a last-bit difference between vector and
    scalar log1p moves it with odds ~1e-16 a draw). n p + 6 sqrt(n p) + 16 uniforms per batch of draws, another
    batch only where they fall short of n (odds ~1e-9)."""
    q = math.log1p(-p)
    batch = int(n * p + 6 * math.sqrt(n * p) + 16)
    parts, end = [torch.empty(0, dtype=torch.int64)], 0
    while end < n:  # the next drop may still fall below n
        ends = torch.rand(batch, dtype=torch.float64).neg_().log1p_().div_(q).add_(1).to(torch.int64)
        parts.append(ends.cumsum_(0).add_(end))  # 1-based positions: G + 1 apart
        end = int(parts[-1][-1])
    ends = torch.cat(parts) if len(parts) > 2 else parts[-1]
    return ends[: int(torch.searchsorted(ends, n, right=True))].sub_(1)


def drop_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A boolean tensor of `shape`, True (drop) with probability round(p * 2^16) / 2^16, from the global generator.

    Each random 64-bit word (random_ over int64's full range: one generator call per four values) is cut into
    four signed 16-bit integers, uniform on [-2^15, 2^15); a value drops where its integer is below
    round(p * 2^16) - 2^15. One comparison per value: no bit masking, no random double per value."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    return words.view(torch.int16)[:n].view(shape) < round(p * LEVELS) - LEVELS // 2


class CpuDropout(torch.nn.Dropout):
    """LoRA's input dropout on CPU: the same distribution as torch's, one draw per input tensor.

    torch's CPU dropout draws its mask with a Bernoulli kernel that takes one random double per value (outside
    Intel's MKL path), and peft draws one mask per adapter, seven per decoder layer, though q, k and v (and gate
    and up) read the same tensor; applying a boolean mask (`where`, forward and backward) is not vectorized on a
    CPU either: dropout was a sixth of a bf16 step. Here, for p up to 1/8 (`positions`, runs begun since
    2026-12-08), the dropped positions come from `drop_positions` (about n p uniforms from the global generator,
    which checkpoints save: resume stays exact) and the input is copied with zeros there (`index_fill`; its
    gradient likewise): p exact, kept values scaled by 1 / (1 - p), autograd keeping the positions (8 p bytes a
    value). Above 1/8, and for runs begun before (`positions` False), a byte mask from `drop_mask` (16-bit
    integers, p rounded to a multiple of 2^-16: 0.05 -> 0.0500031) applied by `where`, autograd keeping it.

    One instance may serve several adapters (`use_cpu_dropout` gives the adapters of one module a single
    instance): the same input tensor then gets the same mask, drawn once, and the dropped tensor is computed and
    kept for backward once. Each adapter still sees dropout with probability p on every value, as with separate
    masks; what changes is that the adapters reading one input drop the same values (a correlated regulariser).
    `dropped` returns the zeroed input without the scale, for finetune.model.fused to fold into its product;
    `forward` the scaled one, as torch's dropout, for peft's own forward (DoRA, AdaLoRA, ...).
    On GPU, torch's fused dropout is used unchanged (one mask per call)."""

    _cache: tuple | None = None  # (weak reference to the last input, its dropped copy, whether that is scaled)

    def __init__(self, p: float = 0.5, positions: bool = True):
        super().__init__(p)
        self.positions = positions and p <= POSITIONS_MAX_P

    @property
    def scale(self) -> float:
        return 1 / (1 - self.p) if self.positions else LEVELS / (LEVELS - round(self.p * LEVELS))

    def _zeroed(self, x: torch.Tensor) -> torch.Tensor:
        """x with the dropped values zeroed, unscaled: one copy (and one in backward)."""
        if self.positions:
            return x.reshape(-1).index_fill(0, drop_positions(x.numel(), self.p), 0).view(x.shape)
        return torch.where(drop_mask(x.shape, self.p), 0.0, x)  # one pass; masked_fill is a clone, then a fill

    def dropped(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x with the dropped values zeroed, the scale the kept values still need): 1.0 when nothing drops."""
        if not self.training or self.p == 0:
            return x, 1.0
        if x.device.type != "cpu":
            return super().forward(x), 1.0
        hit = self._hit(x)
        if hit is not None:
            return hit[1], 1.0 if hit[2] else self.scale
        out = self._zeroed(x)
        self._keep(x, out, scaled=False)
        return out, self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout as torch's (kept values scaled): the form peft's own forward (DoRA, AdaLoRA, ...) calls."""
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        hit = self._hit(x)
        if hit is not None:
            return hit[1] if hit[2] else hit[1] * self.scale
        out = self._zeroed(x).mul_(self.scale)
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


MASKS = ("positions", "shared", "per adapter")  # how runs draw their masks, newest first (environment.json)


def use_cpu_dropout(model, masks: str = "positions") -> None:
    """On CPU, the dropout of LoRA adapters becomes a `CpuDropout` of the same p, one instance for the adapters
    of one module (attention's q/k/v/o, the MLP's gate/up/down: those reading the same tensor share its draw)
    and p. No weights: checkpoints are unchanged. `masks` (one of MASKS) is how the run began, which a resumed
    run keeps, and its random stream with it (finetune/train/records.py): "positions" (since 2026-12-08),
    "shared" (byte masks shared by an input's adapters), "per adapter" (a `PerAdapterDropout` each, before
    2026-12-05)."""
    from peft.tuners.lora import LoraLayer

    assert masks in MASKS, masks  # records.dropout_masks names a checkpoint's unknown value
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return
    shared: dict[tuple[str, str, float], CpuDropout] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            parent = path.rsplit(".", 1)[0]
            for name, dropout in module.lora_dropout.items():
                if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                    if masks == "per adapter":
                        module.lora_dropout[name] = PerAdapterDropout(dropout.p)
                        continue
                    key = (parent, name, dropout.p)
                    module.lora_dropout[name] = shared.setdefault(key, CpuDropout(dropout.p, masks == "positions"))
