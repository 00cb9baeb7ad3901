"""The LoRA layers that read one input (attention's q, k and v; the MLP's gate and up) as one autograd node each.

For members i = 1..k reading x (the frozen weights W_i dequantized and cached, finetune.model.weight_cache), LoRA's
A_i, B_i, scale s_i and the shared dropout D (one draw for the input: finetune.model.dropout, scale d):

    y_i = x W_i^T + c_i (D(x) A_i^T) B_i^T,    c_i = s_i d

computed as two products for the whole group, [y_1 .. y_k] = x [W_1; ..; W_k]^T and [l_1 .. l_k] = D(x) [A_1; ..;
A_k]^T, then y_i += c_i l_i B_i^T in place (each y_i a column block of one tensor). Backward, from the gradients g_i:

    dx = sum_i g_i W_i                 (accumulated in the products: no additions of their own)
    G  = [c_1 g_1 B_1 .. c_k g_k B_k]  (the rank-r gradients side by side)
    dD(x) = G [A_1; ..; A_k]           dA = G^T D(x) (split by member)     dB_i = c_i g_i^T l_i

Per member and layer, autograd ran a node each with its own products and added the members' input gradients one
at a time (k - 1 passes over [tokens, hidden] for the base, k - 1 for the adapters); here there are one product
for the base forward, one for the adapters' inputs, two for their gradients, and none of those additions.
Measured on scripts/bench_step.py's micro batch: bf16 1.06x, fp32 1.01-1.03x (docs/performance.md).

The stacked W is the cached weights themselves: the first training forward concatenates them once and hands each
layer a view of its rows back as its cached weight (no memory of its own). Mathematically the same function as
the per-layer fused forward (finetune.model.fused), numerically within the dtype's rounding (the sums run in
another order). Only training steps on plain LoRA adapters over cached 4-bit weights take it, with every member in
the same state: anything else (eval, another adapter, a variant, no cache, another dtype) computes each layer by
itself, as before; a member called with another input than its siblings' gets its output computed anew.
"""

from __future__ import annotations

import weakref

import torch

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings reading one input (Llama-style)


def group_siblings(model, fused: set) -> int:
    """Give the LoRA layers among `fused` (those with finetune.model.fused's forward) that are siblings in GROUPS
    a shared `LoraGroup` (attribute `lora_group`); returns how many groups."""
    count = 0
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if m is not None and m in fused]
            if len(members) > 1:
                group = LoraGroup(members)
                for m in members:
                    m.__dict__["lora_group"] = group  # a plain attribute: not a submodule, nothing in checkpoints
                count += 1
    return count


def ungroup(model) -> None:
    """Every LoRA layer of `model` computed alone again (benchmarks' and tests' baseline)."""
    for module in model.modules():
        module.__dict__.pop("lora_group", None)


class LoraGroup:
    """Sibling LoRA layers over one input; `output` gives one member's output, computing all of them once per
    input tensor (each kept until its member takes it, or that input is freed)."""

    def __init__(self, members: list):
        self.members = members
        self.parts: list[torch.Tensor] = []  # the cached weights as views of `stacked`, once stacked
        self.stacked: torch.Tensor | None = None
        self._last: tuple | None = None  # (weak reference to the input, the members' outputs)

    def output(self, member, x: torch.Tensor, name: str, plain, dropout_of):
        """`member`'s output for x, or None where the group cannot compute it (the caller computes it alone).
        `plain(module, x)`: the adapter the fused forward would compute for that module, or None;
        `dropout_of(module, x)` -> (dropped x, the scale left to the product), as the fused forward draws it."""
        i = self.members.index(member)
        last = self._last
        if last is not None and last[0]() is x and last[1][i] is not None:
            out, last[1][i] = last[1][i], None  # each output handed out once: nothing kept past the layer's forward
            return out
        weight = self._weight(x)
        drops = [m.lora_dropout[name] for m in self.members]
        if weight is None or any(plain(m, x) != name for m in self.members) or not (
                all(d is drops[0] for d in drops) or all(isinstance(d, torch.nn.Identity) for d in drops)):
            return None  # members drawing their own dropout (a run begun before masks were shared) stay alone
        dropped, scale = dropout_of(member, x)  # one draw for the input, shared by the members (their dropout)
        a = [m.lora_A[name].weight for m in self.members]
        b = [m.lora_B[name].weight for m in self.members]
        c = [m.scaling[name] * scale for m in self.members]
        outs = list(_Grouped.apply(x, dropped, weight, c, [w.shape[0] for w in self.parts], *a, *b))
        out, outs[i] = outs[i], None
        self._last = (weakref.ref(x, self._forget), outs)
        return out

    def _weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The members' cached weights stacked (stacking them the first time, or again if the cache was rebuilt);
        None where a member has none in x's dtype, or a bias."""
        bases = [m.base_layer for m in self.members]
        cached = [b.__dict__.get("cached_weight") for b in bases]
        if any(w is None or w.dtype != x.dtype or w.device != x.device or b.bias is not None
               or "forward" not in b.__dict__ for w, b in zip(cached, bases)):
            return None
        if len(self.parts) != len(cached) or any(w is not p for w, p in zip(cached, self.parts)):
            self.stacked = torch.cat(cached)
            self.parts = list(self.stacked.split([w.shape[0] for w in cached]))
            for b, part in zip(bases, self.parts):
                b.cached_weight = part
        return self.stacked

    def _forget(self, ref) -> None:
        if self._last is not None and self._last[0] is ref:
            self._last = None

    def __getstate__(self):  # copies and pickles start without the kept outputs
        state = self.__dict__.copy()
        state["_last"] = None
        return state


class _Grouped(torch.autograd.Function):
    """forward(x, D(x), [W_1; ..; W_k], [c_i], [out_i], A_1..A_k, B_1..B_k) -> (y_1, .., y_k): the module's math."""

    @staticmethod
    def forward(ctx, x, dropped, weight, c, widths, *ab):
        k = len(widths)
        dtype = weight.dtype
        a = torch.cat([t.to(dtype) for t in ab[:k]])
        b = [t.to(dtype) for t in ab[k:]]
        rows, ranks = x.reshape(-1, x.shape[-1]), [t.shape[0] for t in ab[:k]]
        low = dropped.reshape(-1, x.shape[-1]).to(dtype) @ a.t()  # [tokens, sum r]
        out = rows.to(dtype) @ weight.t()  # [tokens, sum out]: the members' outputs side by side
        outs, lows = [], low.split(ranks, dim=1)
        for y, l_i, b_i, c_i in zip(out.split(widths, dim=1), lows, b, c):
            y.addmm_(l_i, b_i.t(), alpha=c_i)
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.save_for_backward(dropped, low, a, weight, *b)
        ctx.meta = (c, widths, ranks, x.shape, x.dtype, dropped.dtype, [t.dtype for t in ab])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        dropped, low, a, weight, *b = ctx.saved_tensors
        c, widths, ranks, shape, x_dtype, dropped_dtype, ab_dtypes = ctx.meta
        tokens = low.shape[0]
        g = [t.reshape(tokens, w).to(weight.dtype) for t, w in zip(grads, widths)]
        dx = None
        if ctx.needs_input_grad[0]:
            for g_i, w_i in zip(g, weight.split(widths)):
                dx = g_i @ w_i if dx is None else dx.addmm_(g_i, w_i)
            dx = dx.view(shape).to(x_dtype)
        lows = low.split(ranks, dim=1)
        side = torch.cat([(g_i @ b_i).mul_(c_i) for g_i, b_i, c_i in zip(g, b, c)], dim=1)  # [tokens, sum r]
        d_dropped = (side @ a).view(shape).to(dropped_dtype) if ctx.needs_input_grad[1] else None
        da = (side.t() @ dropped.reshape(tokens, -1).to(a.dtype)).split(ranks)
        db = [(g_i.t() @ l_i).mul_(c_i) for g_i, l_i, c_i in zip(g, lows, c)]
        k = len(widths)
        return (dx, d_dropped, None, None, None, *(t.to(d) for t, d in zip(da, ab_dtypes[:k])),
                *(t.to(d) for t, d in zip(db, ab_dtypes[k:])))
