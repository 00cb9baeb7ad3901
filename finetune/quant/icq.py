"""ICQ-NF4: IR-QLoRA's Information Calibration Quantization (arXiv 2402.05445, section 3.1) on NF4 blocks.

Plain NF4 maps each block of 64 weights onto 16 levels centred on 0; a block whose values are not centred there
uses few of the levels, and its 4-bit codes carry less than 4 bits of information. ICQ quantizes w - tau
instead, with one calibration constant tau per block chosen to maximise the entropy of the block's codes:

    tau* = argmax_tau  H( NF4((w - tau) / absmax(w - tau)) ),     w = absmax * f[q] + tau*  on dequantization,

searched, as the authors' implementation does (github.com/htqin/IR-QLoRA, utils.py `search`), over
tau = tau0 + lambda * absmax(w - tau0), tau0 the block's median, lambda on 2n + 1 evenly spaced points of
[-R sigma, R sigma] with R = 0.1, n = 100 and sigma = 1 / Phi^-1(0.9677083) (the quantile NF4's outermost level
is built from). Where several candidates reach the maximum entropy the one nearest the median wins (the
reference keeps the first in grid order, the most negative shift). tau is stored in float16, and the codes
are computed against that rounded tau, so dequantization reproduces exactly what the search scored (the
reference stores tau in 8 bits per block plus one float per 256 blocks; float16 costs 0.25 bit per weight
instead of ~0.13).

The shift is an offset like GGUF's m: an update constant within each block folds into it exactly (`fold`), up to
the float16 rounding of tau + update.
"""

from __future__ import annotations

import torch

from finetune.quant.format import Packed, QuantFormat, register
from finetune.quant.nf4 import BLOCK, NF4, _bounds, as_blocks, code_entropy, nf4_codes, pack_nibbles

SEARCH_RANGE = 0.1  # R: the reference's tau_lambda
SEARCH_STEPS = 100  # n: the reference's tau_n; 2n + 1 candidates per block
CHUNK_VALUES = 2**22  # thresholds per chunk of blocks (x 4 bytes: ~16 MB per working tensor)


def sigma() -> float:
    """1 / Phi^-1(0.9677083), the reference's sigma (0.541)."""
    return 1.0 / float(torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64)))


def candidates(steps: int = SEARCH_STEPS, search_range: float = SEARCH_RANGE) -> torch.Tensor:
    """The lambda grid, (2 steps + 1,) float32, ascending."""
    half = search_range * sigma()
    return torch.linspace(-half, half, 2 * steps + 1)


def search_tau(blocks: torch.Tensor, steps: int = SEARCH_STEPS) -> torch.Tensor:
    """The float16 tau of each block of `blocks` (..., 64) whose NF4 codes have the most entropy; among equals,
    the one nearest the block's median.

    Counting, not quantizing: a value's code is the number of NF4 decision boundaries b_k below
    (w - tau) / absmax(w - tau), so the 16 code counts of a candidate are differences of the counts of values at
    or under the 15 thresholds t_k = tau + absmax * b_k. Each t_k only grows with the shift (|b_k| < 1), so for
    every value and boundary one binary search over the candidates finds the first candidate whose threshold
    reaches the value, and a cumulative histogram of those positions gives every candidate's counts at once:
    15 x 64 searches per block, whatever the number of candidates."""
    flat = blocks.reshape(-1, blocks.shape[-1]).float()
    lambdas = candidates(steps).to(flat.device)
    bounds = _bounds().to(flat.device)
    n, c = flat.shape[-1], len(lambdas)
    best = torch.empty(flat.shape[0], dtype=torch.float16, device=flat.device)
    per_chunk = max(1, CHUNK_VALUES // (c * len(bounds)))
    for start in range(0, flat.shape[0], per_chunk):
        w = flat[start:start + per_chunk].sort(dim=-1).values  # (b, 64)
        tau0 = w[:, (n - 1) // 2]  # the lower median, as torch (and the reference) take it
        spread = torch.maximum(w[:, -1] - tau0, tau0 - w[:, 0])
        tau = (tau0[:, None] + lambdas[None] * spread[:, None]).half().float()  # (b, c), as it will be stored
        absmax = torch.maximum(w[:, -1:] - tau, tau - w[:, :1])
        thresholds = (tau[:, None, :] + absmax[:, None, :] * bounds[None, :, None]).contiguous()  # (b, 15, c)
        values = w[:, None, :].expand(-1, len(bounds), -1).contiguous()
        first = torch.searchsorted(thresholds, values)  # (b, 15, 64): first candidate with t_k >= w_i
        reached = torch.zeros(*first.shape[:2], c + 1, device=flat.device)
        reached.scatter_add_(-1, first, torch.ones_like(first, dtype=reached.dtype))
        below = reached.cumsum(-1)[..., :c]  # (b, 15, c): values at or under t_k for each candidate
        edges = torch.cat([torch.zeros_like(below[:, :1]), below, torch.full_like(below[:, :1], n)], dim=1)
        p = edges.diff(dim=1) / n  # (b, 16, c) code frequencies
        entropy = -(p * torch.log2(p.clamp(min=1e-30))).sum(1)  # (b, c)
        top = entropy >= entropy.amax(dim=-1, keepdim=True) - 1e-6
        pick = torch.where(top, lambdas.abs()[None], torch.full_like(entropy, float("inf"))).argmin(dim=-1)
        best[start:start + per_chunk] = tau.gather(1, pick[:, None]).squeeze(1).half()
    return best.view(blocks.shape[:-1])


class ICQNF4(QuantFormat):
    """NF4 codes of w - tau with a per-block float16 tau: codes (out, in / 2) uint8, absmax and tau
    (out, in / 64), float32 and float16."""

    name = "icq_nf4"
    block_size = BLOCK
    folds_exactly = True

    def pack(self, w: torch.Tensor) -> Packed:
        blocks = as_blocks(w.float(), self.name)
        tau = search_tau(blocks)
        codes, absmax = nf4_codes(blocks - tau.float().unsqueeze(-1))
        return Packed(self.name, tuple(w.shape),
                      {"codes": pack_nibbles(codes.flatten(1)), "absmax": absmax, "tau": tau})

    def dequantize(self, p: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, n = p.shape
        centred = NF4().dequantize(Packed("nf4", p.shape, {"codes": p.data["codes"], "absmax": p.data["absmax"]}))
        return (centred.view(out, n // BLOCK, BLOCK) + p.data["tau"].float().unsqueeze(-1)).view(out, n).to(dtype)

    def fold(self, p: Packed, delta: torch.Tensor) -> Packed:
        """tau + delta, rounded to float16 (codes and absmax untouched)."""
        tau = (p.data["tau"].float() + delta.to(p.data["tau"].device).float()).half()
        return Packed(self.name, p.shape, {**p.data, "tau": tau})


def quantization_error(w: torch.Tensor, fmt: QuantFormat) -> dict[str, float]:
    """How well `fmt` keeps `w`: mean squared error, relative Frobenius error ||w - q|| / ||w||, and the mean
    entropy (bits) of the 4-bit codes per block (NF4 formats; 4.0 is the most 16 codes can carry)."""
    p = fmt.pack(w)
    q = fmt.dequantize(p)
    diff = (w.float() - q).double()
    report = {"mse": float(diff.pow(2).mean()), "rel_frobenius": float(diff.norm() / w.double().norm())}
    if "codes" in p.data:
        codes = torch.stack([p.data["codes"] >> 4, p.data["codes"] & 0xF], -1).flatten(-2)
        report["code_entropy_bits"] = float(code_entropy(as_blocks(codes, fmt.name)).mean())
    return report


register(ICQNF4())
