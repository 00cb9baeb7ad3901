"""The decode step's forward pass: `forward` runs a `LeanModel` (lean.py: a model read out of its modules once) for
one pass over a static KV cache, a prefill of whole prompts or one token per row, each row with its adapter.

Per layer it is what the model's forward computes, as plain ops: RMSNorm as transformers computes it (float32
statistics), q/k/v from one stacked product where lean.py stacked them (their adapters added into its columns),
rotary embeddings on q and k together in four ops (the same numbers as transformers' rotate_half), keys and values
written into the cache, SDPA over the cache's positions, then the MLP (gate/up stacked, SiLU, down). Adapters beside
the weights are added after each projection, as PEFT adds them: one adapter for every row (`_Masks.uniform`) as its
own A and B, mixed rows as one batched op (every adapter's A stacked, a column mask per row, the stacked B). At one
row every op's call costs a few microseconds whatever its size, so the step works in place where a value is its
own (the same numbers, fewer allocations and calls), and a row decoding alone takes `_one_row`: the same ops, each
layer's products (with their adapter) chosen once per lean model and adapter instead of at every call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from finetune.generate.lean import SHARED, Layer, LeanModel, Linear, Lora


@dataclass
class Cache:
    """Keys and values per layer, [rows, kv heads, positions, head dim]; row r holds one sequence from position 0."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def forward(lm: LeanModel, cache: Cache, ids: torch.Tensor, positions: torch.Tensor, start: int, span: int,
            adapters: int | torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """float32 logits [n, vocab] for cache rows start..start+n-1: `ids`/`positions` [n, T]. T = 1 decodes one token per
    row at its position; T > 1 prefills rows from position 0 (right-padded; `last` [n]: each row's last real index).
    Attention reads the first `span` positions of each row. `adapters`: the adapter index (`LeanModel.index`) every
    row uses (-1: none), or a tensor [n] of each row's."""
    if lm.int8_folded is not None and (isinstance(adapters, torch.Tensor) or adapters != lm.index(lm.int8_folded)):
        raise ValueError(f"this decode step holds adapter {lm.int8_folded!r} in its int8 weights: every row must "
                         "decode with it")
    n, t = ids.shape
    if n == 1 and t == 1 and last is None and isinstance(adapters, int):  # one row decoding its next token
        plan = _row_plan(lm, adapters)
        if plan is not None and positions[0, 0].item() == span - 1:
            return _one_row(lm, plan, cache, ids, positions, start, span)
    x = F.embedding(ids.reshape(-1), lm.embed)  # [n * t, hidden]: 2-D products (a 3-D input takes a slower path)
    cos, sin = lm.rotary(x, positions)
    cos, sin = cos.unsqueeze(2), _swapped_signed(sin).unsqueeze(2)  # [n, t, 1, head dim]: every head of a position
    # one row decoding reads every cached position: no mask, and its keys and values written by slicing
    alone = positions[0, 0].item() if n == 1 and t == 1 else None
    mask = None if alone == span - 1 else \
        (torch.arange(span, device=ids.device)[None, None, :] <= positions[:, :, None]).unsqueeze(1)
    masks = _Masks(lm, adapters)
    rows = torch.arange(n, device=ids.device)  # the pass's rows, as indices into its view of the cache
    whole = start == 0 and n == cache.keys[0].shape[0]  # the pass covers every cache row: no view of its rows
    for i, layer in enumerate(lm.layers):
        q, k, v = _attention_inputs(_rms(x, layer.attn_norm, lm.eps), layer, masks, lm, n, t, cos, sin)
        keys, values = cache.keys[i], cache.values[i]
        if not whole:
            keys, values = keys.narrow(0, start, n), values.narrow(0, start, n)
        if alone is not None:  # [1, kv heads, 1, head dim] into its place: two views, not four selects each side
            keys.narrow(2, alone, 1).copy_(k)
            values.narrow(2, alone, 1).copy_(v)
        elif t == 1:
            keys[rows, :, positions[:, 0]] = k[:, :, 0]
            values[rows, :, positions[:, 0]] = v[:, :, 0]
        else:
            keys[:, :, :t] = k
            values[:, :, :t] = v
        o = F.scaled_dot_product_attention(q, keys.narrow(2, 0, span), values.narrow(2, 0, span), attn_mask=mask,
                                           scale=lm.head_dim ** -0.5, enable_gqa=True)
        x = x + _proj(o.transpose(1, 2).reshape(n * t, -1), layer.proj["o_proj"], masks, lm)
        h = _rms(x, layer.mlp_norm, lm.eps)
        gate, up = _projs(h, layer, SHARED[1], masks, lm)  # fresh tensors or views of one: free to overwrite
        x = x + _proj(F.silu(gate, inplace=True).mul_(up), layer.proj["down_proj"], masks, lm)
    x = x.view(n, t, -1)
    x = x[:, -1] if last is None else x[torch.arange(n, device=ids.device), last]
    return lm.head(_rms(x, lm.norm, lm.eps)).float()


def _one_row(lm: LeanModel, plan: list, cache: Cache, ids: torch.Tensor, positions: torch.Tensor, start: int,
             span: int) -> torch.Tensor:
    """`forward` for one row decoding the token at position span - 1 (chat, eval, one serve stream, a GRPO row left
    alone): the loop's ops for n = t = 1, each layer's products as `_row_plan` chose them, adapters included. The
    same numbers (tests/test_generate_path.py); ~1.5 ms less Python a token than the general loop (1.07x at one row,
    int8 weights, 2-core AMX Xeon), and q/k/v split by views of one row instead of slices and transposes."""
    x = F.embedding(ids.reshape(-1), lm.embed)
    cos, sin = lm.rotary(x, positions)
    cos, sin = cos.unsqueeze(2), _swapped_signed(sin).unsqueeze(2)
    pos, heads, rotating, whole = span - 1, lm.heads, lm.heads + lm.kv_heads, cache.keys[0].shape[0] == 1
    for (attn_norm, qkv, o_proj, mlp_norm, gate_up, widths, down), keys, values in zip(plan, cache.keys, cache.values):
        if not whole:
            keys, values = keys.narrow(0, start, 1), values.narrow(0, start, 1)
        out = qkv(_rms(x, attn_norm, lm.eps)).view(1, 1, -1, lm.head_dim)  # [1, 1, heads + 2 kv heads, head dim]
        q, k = _rotated(out[:, :, :rotating], cos, sin).view(1, rotating, 1, -1).split_with_sizes(
            (heads, rotating - heads), 1)
        keys.narrow(2, pos, 1).copy_(k)
        values.narrow(2, pos, 1).copy_(out[:, :, rotating:].transpose(1, 2))
        o = F.scaled_dot_product_attention(q, keys.narrow(2, 0, span), values.narrow(2, 0, span),
                                           scale=lm.head_dim ** -0.5, enable_gqa=True)
        x = x + o_proj(o.view(1, -1))
        gate, up = gate_up(_rms(x, mlp_norm, lm.eps)).split_with_sizes(widths, dim=1)
        x = x + down(F.silu(gate, inplace=True).mul_(up))
    return lm.head(_rms(x, lm.norm, lm.eps)).float()


def _row_plan(lm: LeanModel, adapter: int) -> list | None:
    """Per layer, for `_one_row` with `adapter` (-1: none): (attention norm, q/k/v's stacked product, o's, MLP norm,
    gate/up's stacked product, their widths, down's), each product a function of one row with its adapter added
    as `forward` adds it; built once per lean model and adapter. None (the general loop runs) where a layer's
    q/k/v or gate/up are not stacked (a plain-weight copy runs few rows) or k and v differ in width."""
    if adapter in lm.rows:
        return lm.rows[adapter]
    masks, plan = _Masks(lm, adapter), []
    for layer in lm.layers:
        qkv, gate_up = layer.fused.get(SHARED[0]), layer.fused.get(SHARED[1])
        if qkv is None or gate_up is None or qkv.widths[1:] != [lm.kv_heads * lm.head_dim] * 2:
            plan = None
            break
        plan.append((layer.attn_norm, _row_product(qkv, layer, SHARED[0], masks, lm), _row_product(
            layer.proj["o_proj"], layer, ("o_proj",), masks, lm), layer.mlp_norm, _row_product(
            gate_up, layer, SHARED[1], masks, lm), gate_up.widths, _row_product(
            layer.proj["down_proj"], layer, ("down_proj",), masks, lm)))
    lm.rows[adapter] = plan
    return plan


def _row_product(lin: Linear, layer: Layer, names: tuple[str, ...], masks: _Masks, lm: LeanModel):
    """x -> `lin`'s product for one row (`Linear.row`), with the adapters of `names` (its columns, in order) added
    where the product does not hold them, as the general loop adds them (`_into_columns` for a stacked group)."""
    product, held = lin.row(lm.dtype)
    loras = [layer.proj[p].lora for p in names]
    if held or masks.uniform == -1 or not any(lora is not None and masks.uniform in lora.parts for lora in loras):
        return product
    if len(names) == 1:
        return lambda x: _adapt(x, product(x), loras[0], masks, lm)
    return lambda x: _into_columns(x, product(x), lin.widths, loras, masks, lm)


def _into_columns(x: torch.Tensor, out: torch.Tensor, widths: list[int], loras: list, masks: _Masks,
                  lm: LeanModel) -> torch.Tensor:
    """A stacked product's `out` (columns of `widths`) with each projection's adapters (`loras`, in order) added into
    its own columns, in place."""
    for part, lora in zip(out.split_with_sizes(widths, dim=1), loras):
        _adapt(x, part, lora, masks, lm, into=True)
    return out


def _attention_inputs(h: torch.Tensor, layer: Layer, masks: _Masks, lm: LeanModel, n: int, t: int,
                      cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [n, heads, t, head dim] from the normed input `h`, rotary embeddings on q and k. Where q/k/v are
    one stacked product (`Layer.fused`), their adapters go into its columns in place and q and k rotate together,
    as one [n, t, heads + kv heads, head dim] view: four ops for both instead of four each, the same numbers."""
    fused = layer.fused.get(SHARED[0])
    if fused is None:
        q, k, v = (o.view(n, t, -1, lm.head_dim) for o in _projs(h, layer, SHARED[0], masks, lm))
        q, k = _rotated(q, cos, sin), _rotated(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = fused(h)
    if not fused.holds_adapter(h):
        _into_columns(h, out, fused.widths, [layer.proj[p].lora for p in SHARED[0]], masks, lm)
    heads = out.view(n, t, -1, lm.head_dim)
    qk = _rotated(heads[:, :, : lm.heads + lm.kv_heads], cos, sin)
    return (qk[:, :, : lm.heads].transpose(1, 2), qk[:, :, lm.heads :].transpose(1, 2),
            heads[:, :, lm.heads + lm.kv_heads :].transpose(1, 2))


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, t, heads, head dim] with rotary embeddings: transformers' x * cos + rotate_half(x) * sin, with `sin`
    given as `_swapped_signed(sin)`: x * that is rotate_half(x) * sin with its halves swapped, each added into the
    other half of x * cos (no copy to swap x's halves)."""
    half = x.shape[-1] // 2
    out, turned = x * cos, x * sin
    out[..., :half].add_(turned[..., half:])
    out[..., half:].add_(turned[..., :half])
    return out


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm: float32 statistics, the normalized value cast back before the weight; in float32
    torch's fused kernel computes the same numbers in one op. Its float32 copy of a bf16 x is new: the ops after it
    work in place (the same numbers, fewer allocations: every op counts at one row)."""
    if x.dtype == torch.float32:
        if weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h
    width, eps = _norm_constants(x.shape[-1], eps)
    h = x.to(torch.float32)
    h.mul_(h.pow(2).sum(-1, keepdim=True).div_(width).add_(eps).rsqrt_())  # mean(-1) is that sum and division
    h = h.to(x.dtype)
    return h.mul_(weight) if weight.dtype == h.dtype else weight * h


@functools.cache
def _norm_constants(width: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm's width and eps as float32 0-d tensors: an op given a Python number wraps it and converts it to the
    tensor's dtype at every call (`mean` divides by its count that way), two hidden conversions per norm, ~4 of its
    19 us at one row (AMX Xeon); the same numbers."""
    return torch.tensor(float(width)), torch.tensor(eps, dtype=torch.float32)


def _swapped_signed(sin: torch.Tensor) -> torch.Tensor:
    """cat(s2, -s1) for sin = cat(s1, s2), once per pass: transformers' rotate_half(x) * sin is cat(-x2 s1, x1 s2),
    and x * cat(s2, -s1) is cat(x1 s2, -x2 s1), its halves swapped: the same numbers (a product's rounding is
    symmetric in sign)."""
    half = sin.shape[-1] // 2
    return torch.cat((sin[..., half:], -sin[..., :half]), dim=-1)


class _Masks:
    """Per forward pass: the adapter every row uses (`uniform`; -1: none), else the [rows, R] 0/1 column masks and
    the [rows, 1] scalings, built once per layout."""

    def __init__(self, lm: LeanModel, adapters: int | torch.Tensor):
        self.cache = {}
        self.uniform, self.adapters = (adapters, None) if isinstance(adapters, int) else (None, adapters)

    def get(self, lora: Lora, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([rows * tokens, R] each token's row's columns, [rows * tokens, 1] its row's adapter's scaling)."""
        got = self.cache.get(lora.layout)
        if got is None:
            each = tokens // len(self.adapters)
            mask = (self.adapters[:, None] == lora.owner[None, :]).to(lora.a.dtype).repeat_interleave(each, dim=0)
            scale = lora.scale[self.adapters][:, None].repeat_interleave(each, dim=0)  # float32, as PEFT's float
            got = self.cache[lora.layout] = mask, scale
        return got


def _proj(x: torch.Tensor, lin: Linear, masks: _Masks, lm: LeanModel) -> torch.Tensor:
    """x through a projection: its weights, then its adapters (not where its int8 copy holds them)."""
    out = lin(x)
    return out if lin.holds_adapter(x) else _adapt(x, out, lin.lora, masks, lm)


def _adapt(x: torch.Tensor, out: torch.Tensor, lora: Lora | None, masks: _Masks, lm: LeanModel,
           into: bool = False) -> torch.Tensor:
    """`out` (x's product with a projection's weights) plus its adapters' products for the batch's rows; `into`:
    added into `out` itself (the same numbers: an in-place add computes in the promoted dtype, then rounds to out's)."""
    if lora is None or masks.uniform == -1:
        return out
    if masks.uniform is not None:
        part = lora.parts.get(masks.uniform)
        if part is None:
            return out
        a, b, s = part
        y = _product(_product(x, a, lora.rounds), b, lora.rounds) * s
    else:
        mask, scale = masks.get(lora, x.shape[0])
        y = (_product(_product(x, lora.a, lora.rounds) * mask, lora.b, lora.rounds) * scale).to(lora.rounds or
                                                                                                 lora.a.dtype)
    if into:
        return out.add_(y.to(out.dtype) if lm.cast_before_add else y)
    return out + y.to(out.dtype) if lm.cast_before_add else (out + y).to(out.dtype)


def _projs(x: torch.Tensor, layer: Layer, names: tuple[str, ...], masks: _Masks, lm: LeanModel) -> list:
    """`_proj` for each of `names` (projections reading x), through their stacked weights where `Layer.fused` holds
    them (one product, split into each one's columns), then each one's adapters."""
    fused = layer.fused.get(names)
    if fused is None:
        return [_proj(x, layer.proj[p], masks, lm) for p in names]
    outs = fused(x).split_with_sizes(fused.widths, dim=1)  # (Tensor.split is a Python wrapper: ~5 us at one row)
    if fused.holds_adapter(x):
        return list(outs)
    return [_adapt(x, out, layer.proj[p].lora, masks, lm) for out, p in zip(outs, names)]


def _product(x: torch.Tensor, weight: torch.Tensor, rounds: torch.dtype | None) -> torch.Tensor:
    """x W^T in `weight`'s dtype; with `rounds` (bf16), as a bf16 product gives it (float32 sums, the result rounded
    once) from W's float32 copy of bf16 values: the same numbers to the order of the sums, at a fraction of the cost,
    since a product of rank-16 LoRA size pays ~17 us of oneDNN set-up in bf16 and 3-6 us in float32 (2-core
    AVX512_BF16 EPYC, docs/performance.md)."""
    if rounds is None:
        return F.linear(x.to(weight.dtype), weight)
    return F.linear(x.float(), weight).to(rounds)
