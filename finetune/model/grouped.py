"""The LoRA layers that read one input (attention's q, k and v; the MLP's gate and up) as one autograd node each.

For members i = 1..k reading x (the frozen weights W_i dequantized and cached, finetune.model.weight_cache), LoRA's
A_i, B_i, scale s_i and the shared dropout D (one draw for the input: finetune.model.dropout, scale d):

    y_i = x W_i^T + c_i (D(x) A_i^T) B_i^T,    c_i = s_i d

computed with one product for the adapters' inputs over the stacked A, [l_1 .. l_k] = D(x) [A_1; ..; A_k]^T, and
each y_i = x W_i^T + c_i l_i B_i^T as a tensor of its own (views of one stacked product were 10% faster forward,
but kept q and k alive as long as attention keeps v). Backward, from the gradients g_i:

    dx = sum_i g_i W_i                 (accumulated in the products: no additions of their own)
    G  = [c_1 g_1 B_1 .. c_k g_k B_k]  (the rank-r gradients side by side)
    dD(x) = G [A_1; ..; A_k]           dA = G^T D(x) (split by member)     dB_i = c_i g_i^T l_i

Per member and layer, autograd ran a node each with its own products and added the members' input gradients one
at a time (k - 1 passes over [tokens, hidden] for the base, k - 1 for the adapters); here the adapters' input
gradient is one product and the base's accumulates inside its products. What it buys, measured on
scripts/bench_step.py's micro batch: docs/performance.md, "An eighth pass".

Mathematically the same function as the per-layer fused forward (finetune.model.fused), numerically within the
dtype's rounding (the sums run in another order). Only training steps on plain LoRA adapters over cached 4-bit
weights take it, with every member in the same state and sharing one dropout: anything else (eval, another
adapter, a variant, no cache, another dtype, one dropout mask per adapter) computes each layer by itself, as
before; a member called with another input than its siblings' gets its output computed anew.
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
        weights = self._weights(x)
        drops = [m.lora_dropout[name] for m in self.members]
        if weights is None or any(plain(m, x) != name for m in self.members) or not (
                all(d is drops[0] for d in drops) or all(isinstance(d, torch.nn.Identity) for d in drops)):
            return None  # members drawing their own dropout (a run begun before masks were shared) stay alone
        dropped, scale = dropout_of(member, x)  # one draw for the input, shared by the members (their dropout)
        a = [m.lora_A[name].weight for m in self.members]
        b = [m.lora_B[name].weight for m in self.members]
        c = [m.scaling[name] * scale for m in self.members]
        outs = list(_Grouped.apply(x, dropped, c, *weights, *a, *b))
        out, outs[i] = outs[i], None
        self._last = (weakref.ref(x, self._forget), outs)
        return out

    def _weights(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """The members' cached weights; None where a member has none in x's dtype, or a bias."""
        bases = [m.base_layer for m in self.members]
        cached = [b.__dict__.get("cached_weight") for b in bases]
        if any(w is None or w.dtype != x.dtype or w.device != x.device or b.bias is not None
               or "forward" not in b.__dict__ for w, b in zip(cached, bases)):
            return None
        return cached

    def _forget(self, ref) -> None:
        if self._last is not None and self._last[0] is ref:
            self._last = None

    def __getstate__(self):  # copies and pickles start without the kept outputs
        state = self.__dict__.copy()
        state["_last"] = None
        return state


class _Grouped(torch.autograd.Function):
    """forward(x, D(x), [c_i], W_1..W_k, A_1..A_k, B_1..B_k) -> (y_1, .., y_k): the module's math."""

    @staticmethod
    def forward(ctx, x, dropped, c, *wab):
        k = len(c)
        w, a, b = wab[:k], wab[k:2 * k], wab[2 * k:]
        dtype = w[0].dtype
        stacked_a = torch.cat([t.to(dtype) for t in a])
        b_c = [t.to(dtype) for t in b]
        rows, ranks = x.reshape(-1, x.shape[-1]).to(dtype), [t.shape[0] for t in a]
        low = dropped.reshape(-1, x.shape[-1]).to(dtype) @ stacked_a.t()  # [tokens, sum r]
        outs = []
        for w_i, l_i, b_i, c_i in zip(w, low.split(ranks, dim=1), b_c, c):
            y = (rows @ w_i.t()).addmm_(l_i, b_i.t(), alpha=c_i)  # each output a tensor of its own
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.save_for_backward(dropped, low, stacked_a, *w, *b_c)
        ctx.meta = (c, ranks, x.shape, x.dtype, dropped.dtype, [t.dtype for t in (*a, *b)])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        dropped, low, stacked_a, *wb = ctx.saved_tensors
        c, ranks, shape, x_dtype, dropped_dtype, ab_dtypes = ctx.meta
        k = len(c)
        w, b = wb[:k], wb[k:]
        tokens = low.shape[0]
        g = [t.reshape(tokens, w_i.shape[0]).to(w_i.dtype) for t, w_i in zip(grads, w)]
        dx = None
        if ctx.needs_input_grad[0]:
            for g_i, w_i in zip(g, w):
                dx = g_i @ w_i if dx is None else dx.addmm_(g_i, w_i)
            dx = dx.view(shape).to(x_dtype)
        side = torch.cat([(g_i @ b_i).mul_(c_i) for g_i, b_i, c_i in zip(g, b, c)], dim=1)  # [tokens, sum r]
        d_dropped = (side @ stacked_a).view(shape).to(dropped_dtype) if ctx.needs_input_grad[1] else None
        da = (side.t() @ dropped.reshape(tokens, -1).to(stacked_a.dtype)).split(ranks)
        db = [(g_i.t() @ l_i).mul_(c_i) for g_i, l_i, c_i in zip(g, low.split(ranks, dim=1), c)]
        return (dx, d_dropped, None, *(None for _ in w), *(t.to(d) for t, d in zip((*da, *db), ab_dtypes)))
