"""Attention for packed and padding-free rows: each example attends only to itself, at its own cost.

A packed row holds several examples end to end; their `position_ids` restart at 0 where
each begins. transformers keeps them apart with a block-diagonal mask over the whole row,
so plain SDPA still computes all T x T scores of a row of T tokens (and, with a mask,
copies the key/value heads for grouped-query attention and cannot take the causal fast
path). Attention is causal within each example, so for examples of lengths l_1..l_k the
work needed is about sum(l_i^2) / 2, not T^2: for a 512-token row of three examples,
about a sixth.

`segmented_sdpa` splits each row where its positions restart and runs causal SDPA on every
segment: the same numbers as the masked form for every token. Anything else (a KV cache
in generation, rows without restarts under a padding mask) goes to transformers' own SDPA
unchanged. `use_segmented_attention(model)` switches a model that uses SDPA to it; the
mask function stays SDPA's, so generation with left padding is still masked.
"""

from __future__ import annotations

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
    gqa = key.shape[1] != query.shape[1]
    p = dropout if module.training else 0.0
    rows = []
    for b, row in enumerate(segments):
        parts = [F.scaled_dot_product_attention(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e],
                                                value[b : b + 1, :, s:e], dropout_p=p, is_causal=True,
                                                scale=scaling, enable_gqa=gqa)
                 for s, e in row]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


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
