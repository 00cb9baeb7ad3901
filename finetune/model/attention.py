"""Attention for packed and padding-free rows: each example attends only to itself, at its own cost.

A packed row holds several examples end to end; their `position_ids` restart at 0 where
each begins. transformers keeps them apart with a block-diagonal mask over the whole row,
so plain SDPA still computes all T x T scores of a row of T tokens (and, with a mask,
copies the key/value heads for grouped-query attention and cannot take the causal fast
path). Attention is causal within each example, so for examples of lengths l_1..l_k the
work needed is about sum(l_i^2) / 2, not T^2: for a 512-token row of three examples,
about a sixth.

`segmented_sdpa` splits each row where its positions restart and runs causal attention on every segment: the same
numbers as the masked form for every token (to the float rounding of another order of sums). Pieces are `split`
(one concatenation in backward, where slices each allocated and zero-filled a gradient of the whole row) and written
straight into the (batch, tokens, heads, width) layout transformers continues with. Anything else (a KV cache in
generation, rows without restarts under a padding mask) goes to transformers' own SDPA unchanged.
`use_segmented_attention(model)` switches a model that uses SDPA to it; the mask function stays SDPA's, so
generation with left padding is still masked.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

NAME = "finetune_segmented_sdpa"
_last: tuple = (None, None)  # (a position_ids tensor, its segments): the layers of one forward share them


def segmented_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.get("position_ids")
    q_len = query.shape[2]
    if positions is None or positions.dim() != 2 or q_len == 1 or key.shape[2] != q_len or positions.shape[-1] != q_len:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    segments = _segments(positions, query.shape[0])
    if attention_mask is not None and all(len(row) == 1 for row in segments):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    p = dropout if module.training else 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    rows = []
    for b, row in enumerate(segments):
        lengths = [e - s for s, e in row]
        pieces = zip(*(t[b : b + 1].split(lengths, dim=2) for t in (query, key, value)))  # one cat in backward
        outs = [_causal(q, k, v, p, scale).transpose(1, 2) for q, k, v in pieces]  # (1, length, heads, width)
        rows.append(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0].contiguous())
    return (torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]), None


# bf16 examples up to this many tokens run as matrix products, longer ones through SDPA's flash kernel: measured on
# an AVX512_BF16 CPU (`scripts/bench_step.py attention`: forward + backward, SmolLM2's 9 / 3 heads of 64) the
# products are 2.4x, 2.0x and 1.8x faster at 128, 256 and 512 tokens and 0.6x / 0.5x at 1024 / 2048, where flash's
# skipped blocks above the diagonal and its O(n) memory win. They keep a [heads, n, n] bf16 matrix per example for
# backward (the planner counts it: plan/terms.py). float32 always takes flash: 1.2-3.3x faster than the products.
MATH_MAX_TOKENS = 512


def _causal(query, key, value, dropout: float, scale: float) -> torch.Tensor:
    """Causal attention of one example: for a short bf16 example without dropout on a CPU, two bf16 matrix products
    and a softmax (`causal_attention_math`, as transformers' eager attention rounds); SDPA's fused kernel otherwise."""
    if query.dtype == torch.bfloat16 and dropout == 0.0 and query.device.type == "cpu" and \
            query.shape[2] <= MATH_MAX_TOKENS:
        return causal_attention_math(query, key, value, scale)
    return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scale,
                                          enable_gqa=key.shape[1] != query.shape[1])


def causal_attention_math(query, key, value, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v for (batch, heads, length, width) queries over (batch, kv heads,
    length, width) keys and values, as two batched matrix products per key/value head: the g query heads that
    share a key/value head (grouped-query attention, head h reads kv head h // g as transformers' repeat_kv
    does) are stacked into one (g * length) x width operand, so keys and values are never copied per head.

    The first product is one `baddbmm`: the scale is its alpha and the causal mask its added input (0 on and below
    the diagonal, -inf above), so neither the scaled queries nor a masked copy of the scores is a pass of its own,
    forward or backward (softmax gives the masked places a gradient of exactly 0 without a mask): 1.07x a bf16
    micro batch of SmolLM2 on an AMX Xeon (docs/performance.md). The same numbers where the scale is a power of two
    (head width 64, 256); otherwise the scale is applied to the float32 sums instead of the rounded queries."""
    b, heads, n, width = query.shape
    kv = key.shape[1]
    g = heads // kv
    q = query.reshape(b * kv, g * n, width)
    scores = torch.baddbmm(_future(n, g, q.dtype, query.device), q, key.reshape(b * kv, n, width).transpose(-1, -2),
                           alpha=scale)
    return (scores.softmax(dim=-1) @ value.reshape(b * kv, n, width)).view(b, heads, n, width)


@functools.lru_cache(maxsize=8)
def _future(n: int, g: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[g * n, n]: g copies of the causal mask as an additive term, -inf above the diagonal, 0 elsewhere; one tensor
    per length, shared by the layers."""
    above = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)
    return torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(above, float("-inf")).repeat(g, 1)


def _segments(positions: torch.Tensor, batch: int) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) spans between the places where position ids restart at 0."""
    global _last
    if _last[0] is positions:  # the reference held here keeps the identity from being reused
        return _last[1]
    restarts = (positions[:, 1:] == 0).nonzero().tolist()
    starts: list[list[int]] = [[0] for _ in range(positions.shape[0])]
    for b, t in restarts:
        starts[b].append(t + 1)
    width = positions.shape[1]
    segments = [list(zip(row, row[1:] + [width])) for row in starts]
    segments = segments * batch if len(segments) == 1 and batch > 1 else segments
    _last = (positions, segments)
    return segments


def use_segmented_attention(model) -> bool:
    """Switch `model` (if it uses SDPA) to segmented attention; returns whether it did."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, segmented_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    config._attn_implementation = NAME
    return True
