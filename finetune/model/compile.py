"""RMSNorm on CPU as one compiled kernel per direction (torch.compile, inductor's C++ backend), with a clean fallback.

Eager RMSNorm is six passes over the activations forward (cast, square, mean, rsqrt, two multiplications) and
about ten backward; a decoder has two per layer. inductor fuses each direction into one loop over the row:
3.3x faster forward + backward at SmolLM2's shapes (docs/performance.md). The compiled function is the
model's own formula (transformers' LlamaRMSNorm, which Mistral, Qwen2/3 and others copy; only modules whose
forward has that bytecode are switched), compiled with dynamic shapes for every layer and row length.
Each model gets a compiled copy of its own (`_fresh`): dynamo keys its compiled variants, and the budget of 8
recompilations after which it silently runs a function eagerly, on the function's code object, so one copy per
process let earlier runs in the process (a sweep's trials, a test session) decide whether a later run's norms were
compiled, and so its rounding in bf16. Compiled code is cached on disk (inductor's FX graph cache, under
~/.cache/finetune/inductor unless TORCHINDUCTOR_CACHE_DIR says otherwise), so only a machine's first run pays the
compilation.

Compilation is tried once, on a small probe, forward and backward, before training: where it cannot run (no
C++ compiler, an unsupported torch build, FINETUNE_COMPILE=0), the model keeps its eager norms and the reason
is returned for the run's log (environment.json, the banner)."""

from __future__ import annotations

import os
import types
from pathlib import Path

import torch

_compiled = None  # True once the probe compiled the norm, or the reason it is not available (str), once per process


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward: float32 statistics, the weight applied in the input's dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def use_compiled_norms(model) -> str:
    """On CPU, switch the model's Llama-style RMSNorm modules to the compiled kernel. Returns what was done:
    'compiled (n RMSNorm)', or 'eager: <why>' (also when nothing was switched)."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return "eager: not on CPU"
    norms = [m for m in model.modules() if _llama_style(m)]
    if not norms:
        return "eager: no Llama-style RMSNorm in this model"
    verdict = compiled_norm(norms[0].weight.shape[-1])
    if isinstance(verdict, str):
        return f"eager: {verdict}"
    fn = _fresh()
    for m in norms:
        m.forward = _Forward(fn, m)
    return f"compiled ({len(norms)} RMSNorm, torch.compile inductor)"


class _Forward:
    """A norm module's forward through the compiled function (a plain callable, so copies and pickles of the
    module keep working: they carry the function by reference)."""

    def __init__(self, fn, module):
        self.fn, self.module = fn, module

    def __call__(self, x):
        m = self.module
        return self.fn(x, m.weight, m.variance_epsilon)


def _fresh():
    """`rms_norm` compiled under a code object of its own: variants and recompilation budget start from nothing,
    as in a fresh process (inductor's disk cache makes each variant's compilation quick)."""
    code = rms_norm.__code__.replace()  # a new code object, the same bytecode
    return torch.compile(types.FunctionType(code, rms_norm.__globals__, rms_norm.__name__), dynamic=True)


def compiled_norm(width: int) -> bool | str:
    """True where `rms_norm` compiles, probed forward and backward once per process; a string saying why not."""
    global _compiled
    if _compiled is not None:
        return _compiled
    if os.environ.get("FINETUNE_COMPILE", "1") == "0":
        _compiled = "FINETUNE_COMPILE=0"
        return _compiled
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "finetune" / "inductor"))
    try:
        fn = _fresh()
        g = torch.Generator().manual_seed(0)  # the probe leaves the global generator (dropout's) as it was
        for dtype in (torch.float32, torch.bfloat16):  # the probe: both directions, the dtypes training uses
            x = torch.randn(1, 3, width, generator=g).to(dtype).requires_grad_()
            w = torch.ones(width, dtype=dtype)
            got = fn(x, w, 1e-6)
            got.sum().backward()
            if not torch.allclose(got.float(), rms_norm(x, w, 1e-6).float(), rtol=1e-2, atol=1e-2):
                raise RuntimeError("the compiled norm disagrees with the eager one")
        _compiled = True
    except Exception as e:  # noqa: BLE001 - any failure to compile means the eager norm, named in the log
        _compiled = f"torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})"
    return _compiled


def _llama_style(module) -> bool:
    """A norm module whose forward is transformers' LlamaRMSNorm.forward, bytecode for bytecode."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    forward = getattr(type(module), "forward", None)
    if forward is None or not hasattr(module, "variance_epsilon") or not isinstance(
            getattr(module, "weight", None), torch.Tensor):
        return False
    ref = LlamaRMSNorm.forward.__code__
    code = getattr(forward, "__code__", None)
    return code is not None and code.co_code == ref.co_code and code.co_names == ref.co_names
