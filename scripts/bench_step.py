"""One training micro batch under the microscope: where the time goes, how close it is to the machine's limit,
and the levers of docs/performance.md, each measured on the same fixed micro batch.

    python scripts/bench_step.py profile        # fp32, bf16 as it was (autocast over float32 frozen weights),
                                                # bf16 now: seconds per micro batch, time by kind of op, MFU
    python scripts/bench_step.py peak           # the machine's GEMM rate at the model's shapes, fp32 and bf16
    python scripts/bench_step.py omp            # OMP_WAIT_POLICY unset / PASSIVE / ACTIVE, each a fresh process
    python scripts/bench_step.py shared-a       # one LoRA A projection for q/k/v and gate/up instead of 3 and 2
    python scripts/bench_step.py attention      # padding-free row: masked SDPA vs per-example SDPA vs flex attention;
                                                # one example per length: flash vs matrix products, fp32 and bf16

The micro batch: SmolLM2-135M-Instruct (models/, `make fetch`) in NF4 with double quantization, LoRA r 16 / alpha 32
/ dropout 0.05 on all linear layers, no gradient checkpointing, 4 x 256 random tokens with the loss on the last 128
of each row: forward, loss (finetune/objectives/loss.py), backward. Times are medians of --repeats after one warm-up step.
Model FLOPs as finetune/plan/flops.py counts them; MFU is against the GEMM rate measured here (`peak`), the most this
machine's matrix units deliver at these shapes.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # no weight-loading progress bars in the output
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
sys.path.insert(0, str(ROOT))
PATHS = {  # name -> (compute dtype, frozen float weights cast to it)
    "fp32": ("float32", False),
    "bf16-autocast": ("bfloat16", False),  # before: the QLoRA recipe's float32 norms / embeddings / head under autocast
    "bf16": ("bfloat16", True),  # now (finetune/model/load.py: _frozen_floats_in_compute_dtype)
}
KINDS = [  # (kind, substrings of profiler op names), first match wins
    ("attention", ("scaled_dot_product", "flash_attention", "flex_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int", "mkldnn", "onednn")),
    ("4-bit dequantize", ("bitsandbytes", "dequantize", "bnb")),
    ("dtype casts / copies", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
    ("dropout masks", ("bernoulli", "dropout", "aten::random_", "aten::randint", "masked_fill")),
    ("cross-entropy / softmax", ("softmax", "nll_loss", "logsumexp", "cross_entropy")),
]


def _unshared_dropout(model) -> None:
    """finetune.model.dropout.CpuDropout, but one instance (so one mask) per adapter, as peft draws them."""
    from peft.tuners.lora import LoraLayer

    from finetune.model.dropout import CpuDropout

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, d in module.lora_dropout.items():
                if type(d) is torch_dropout() and d.p > 0:
                    module.lora_dropout[name] = CpuDropout(d.p)


def _byte_masks(model, _masks=None) -> None:
    """finetune.model.dropout.use_cpu_dropout as runs began before 2026-12-08 (whatever `attach_lora` asks for):
    byte masks, shared per input."""
    from finetune.model.dropout import use_cpu_dropout

    use_cpu_dropout(model, "shared")


def torch_dropout():
    import torch

    return torch.nn.Dropout


def _sliced_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """finetune/model/attention.py's segmented attention as it was: SDPA on slices of the row (each slice's
    backward allocates and zero-fills a gradient of the whole row), output transposed and copied after a cat."""
    import torch
    import torch.nn.functional as F

    from finetune.model.attention import _segments

    segments = _segments(kwargs["position_ids"], query.shape[0])
    rows = []
    for b, row in enumerate(segments):
        parts = [F.scaled_dot_product_attention(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e],
                                                value[b : b + 1, :, s:e], is_causal=True, scale=scaling,
                                                enable_gqa=key.shape[1] != query.shape[1]) for s, e in row]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _sdpa_segments(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Today's segmented attention with SDPA's kernel for every segment (instead of bf16 matrix products for short
    examples)."""
    from finetune.model import attention

    keep = attention._causal
    attention._causal = lambda q, k, v, p, scale: attention.F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    try:
        return attention.segmented_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    finally:
        attention._causal = keep


ATTENTION_LEVERS = {"attention=sliced": _sliced_sdpa, "attention=sdpa": _sdpa_segments}
OTHER_LEVERS = ("norms=eager",  # the RMSNorm modules left eager (finetune/model/compile.py not applied)
                "cache=off",  # each NF4 weight dequantized at every use (finetune/model/weight_cache.py not applied)
                "groups=off")  # q/k/v and gate/up each computed alone (finetune/model/grouped.py not applied)


def use_attention(model, levers: str) -> None:
    """Segmented attention (finetune/model/attention.py) for `model`, or the form an attention lever names,
    registered under its own name so that two builds in one process can differ."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from finetune.model.attention import use_segmented_attention

    use_segmented_attention(model)
    for lever in (k for k in levers.split(",") if k in ATTENTION_LEVERS):
        name = "bench_" + lever.replace("=", "_")
        AttentionInterface.register(name, ATTENTION_LEVERS[lever])
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
        model.config._attn_implementation = name


NOOP = lambda *a, **k: None  # noqa: E731
LEVERS = {  # lever=setting -> (the function of finetune.model.load it replaces while the model is built, by what)
    "dropout=torch": ("use_cpu_dropout", NOOP),  # torch's dropout, one mask per adapter (what peft does)
    "dropout=unshared": ("use_cpu_dropout", _unshared_dropout),  # finetune's masks, but one per adapter
    "dropout=masks": ("use_cpu_dropout", _byte_masks),  # byte masks applied by `where` (runs before 2026-12-08)
    "lora=peft": ("use_fused_lora", NOOP),  # peft's LoRA forward (clone, scale, add; fp32 casts under CPU autocast)
}


def build(path: str, dropout: float = 0.05, model_dir: str | Path = MODEL, levers: str = "", layers: int = 0):
    """The micro batch's model on `path`; `levers`: comma-separated LEVERS keys, each undoing one speedup;
    `layers`: keep only the first this many decoder layers (a quicker A/B of per-layer work; 0: all)."""
    import torch

    import finetune.model.load as fm
    from finetune.model import resolve
    from finetune.recipe.schema import Recipe

    dtype, cast = PATHS[path]
    recipe = Recipe.model_validate({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["unused.jsonl"]},
        "quantization": {"compute_dtype": dtype}, "lora": {"dropout": dropout},
        "training": {"gradient_checkpointing": False},
    })
    placement = resolve(recipe.quantization)
    off = dict(LEVERS[k] for k in levers.split(",") if k and k not in ATTENTION_LEVERS and k not in OTHER_LEVERS)
    if not cast:
        off["_frozen_floats_in_compute_dtype"] = NOOP
    saved = {name: getattr(fm, name) for name in off}
    for name, replacement in off.items():
        setattr(fm, name, replacement)
    try:
        torch.manual_seed(0)
        base = fm.load_base_model(recipe.model, recipe.quantization, "cpu", placement)
        if layers:
            base.model.layers = base.model.layers[:layers]
            base.config.num_hidden_layers = layers
            if getattr(base.config, "layer_types", None):
                base.config.layer_types = base.config.layer_types[:layers]
        model = fm.attach_lora(base, recipe, placement)
        if "norms=eager" not in levers.split(","):  # as finetune/train/setup.py does
            from finetune.model.compile import use_compiled_norms

            print(f"norms: {use_compiled_norms(model)}", flush=True)
        if "cache=off" not in levers.split(","):  # as finetune/train/setup.py does where the run fits (a CPU)
            from finetune.model import cache_weights

            print(f"dequantized weight cache: {cache_weights(model, placement.compute_dtype) / 2**20:.0f} MiB",
                  flush=True)
        if "groups=off" in levers.split(","):
            from finetune.model.grouped import ungroup

            ungroup(model)
    finally:
        for name, fn in saved.items():
            setattr(fm, name, fn)
    model.train()
    return model, getattr(torch, dtype)


def micro_batch(vocab: int, rows: int = 4, length: int = 256, labelled: int = 128, layout: str = "padded") -> dict:
    """`padded`: rows x length tokens, the loss on the last `labelled` of each. `padfree`: examples of a GSM8K micro
    batch's lengths (188, 240, 301, 242) end to end in one row, position ids restarting, the loss on each one's
    second half (what training.padding_free feeds the model)."""
    import torch

    g = torch.Generator().manual_seed(0)
    if layout == "padfree":
        lengths = [188, 240, 301, 242]
        ids = torch.randint(10, vocab, (1, sum(lengths)), generator=g)
        labels = ids.clone()
        start = 0
        for n in lengths:
            labels[0, start : start + n // 2] = -100
            start += n
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    ids = torch.randint(10, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, : length - labelled] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def step(model, batch: dict, dtype) -> float:
    import torch

    from finetune.objectives.loss import token_loss_sum

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):  # as accelerate does
        loss = token_loss_sum(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def timed(fn, repeats: int, stat=statistics.median) -> float:
    """stat (median; min for a peak rate) of `repeats` timed calls after one warm-up call (first-call
    allocations, oneDNN primitive creation)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return stat(times)


HEAD_SCOPE = "finetune: LM head + loss"  # profiler scope around finetune/objectives/loss.py's chunked head + CE
OPTIMIZER = "optimizer (a quarter of a step)"
OVERHEAD = "Python / dispatch (outside any op)"


def _scoped_loss():
    """Wrap the chunked LM head + cross-entropy in a profiler scope, so its ops count as one kind."""
    import torch

    from finetune.objectives import loss

    cls = loss.LabelledCrossEntropy
    if getattr(cls, "_bench_scoped", False):
        return
    forward = cls.forward

    def scoped(ctx, *a):
        with torch.profiler.record_function(HEAD_SCOPE):
            return forward(ctx, *a)

    cls.forward, cls._bench_scoped = staticmethod(scoped), True


def classify(events, seconds: float) -> dict[str, float]:
    """Self time by kind of op (seconds), from the profiler's events of one micro batch: ops inside the LM head
    scope count as that, the rest by name (KINDS); the step's time not inside any op is Python and dispatch."""
    kinds: dict[str, float] = {}
    in_ops = 0.0
    for e in events:
        if not e.name.startswith(("aten::", "bitsandbytes::", "mkldnn", "onednn", "inductor", "Torch-Compiled",
                                  "CompiledFunction", "torch_compile")) and "::" not in e.name:
            continue  # record_function scopes and autograd nodes: their self time is Python / dispatch
        if e.name.startswith("autograd::"):
            continue
        parent, scoped = e.cpu_parent, False
        while parent is not None:
            if parent.name == HEAD_SCOPE:
                scoped = True
                break
            parent = parent.cpu_parent
        kind = HEAD_SCOPE.split(": ", 1)[1] if scoped else next(
            (k for k, subs in KINDS if any(x in e.name for x in subs)), "other (elementwise, norms, ...)")
        t = e.self_cpu_time_total / 1e6
        kinds[kind] = kinds.get(kind, 0.0) + t
        in_ops += t
    kinds[OVERHEAD] = max(0.0, seconds - in_ops)
    return kinds


def optimizer_seconds(model, repeats: int) -> float:
    """One paged AdamW (32-bit) step over the adapter's parameters with gradients set, as the bench job runs it."""
    import bitsandbytes as bnb
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=1e-6)

    def one():
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(one, repeats)


def timed_both(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process) of `repeats` calls after a warm-up call. With
    one thread on a shared machine the CPU seconds are the work done, without the time spent descheduled."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def profile(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from finetune.plan.flops import train_flops

    _scoped_loss()
    peaks = gemm_peak(args.repeats, args.gemm_tokens)
    out = {"peak_gflops": peaks, "load": os.getloadavg(), "threads": torch.get_num_threads()}
    for path in args.paths.split(","):
        model, dtype = build(path, model_dir=args.model, levers=args.levers, layers=args.layers)
        batch = micro_batch(model.config.vocab_size, layout=args.layout)
        if args.segmented:  # attention per example of a padding-free row (finetune/model/attention.py)
            use_attention(model, args.levers)
        seconds, cpu_seconds = timed_both(lambda m=model, b=batch, d=dtype: step(m, b, d), args.repeats)
        opt_s = optimizer_seconds(model, args.repeats) / args.accumulation
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step(model, batch, dtype)
            profiled = time.perf_counter() - start  # the shares are of this step's own time
        kinds = classify(prof.events(), profiled)
        kinds[OPTIMIZER] = opt_s * profiled / seconds
        total = sum(kinds.values())
        lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        labelled = int((batch["labels"][:, 1:] != -100).sum())
        lengths = ([188, 240, 301, 242] if args.layout == "padfree"
                   else [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0])
        flops = train_flops(model.config, lengths, labelled, lora)
        peak = peaks["bf16" if dtype == torch.bfloat16 else "fp32"]
        out[path] = {
            "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
            "mfu_cpu_time_vs_own_dtype_peak": round(flops * torch.get_num_threads() / cpu_seconds / 1e9 / peak, 3),
            "profiled_seconds": round(profiled, 3), "optimizer_s_per_micro_batch": round(opt_s, 4),
            "tokens_per_s": round(batch["input_ids"].numel() / seconds, 1),
            "model_gflops": round(flops / 1e9, 1), "achieved_gflops": round(flops / seconds / 1e9, 1),
            "mfu_vs_own_dtype_peak": round(flops / seconds / 1e9 / peak, 3),
            "mfu_vs_bf16_peak": round(flops / seconds / 1e9 / peaks["bf16"], 3),
            "time_share": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_ops": [(e.key, round(e.self_cpu_time_total / 1e6, 3)) for e in
                        sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]],
            "load_after": os.getloadavg()[0],
        }
        print(json.dumps({path: out[path]}, indent=1), flush=True)
        del model
    return out


def ab(args) -> dict:
    """Two builds of the same path in one process, their micro batches interleaved (A, B, A, B, ...): the
    ratio of medians is what a lever buys, robust to a machine whose load drifts. --a / --b: lever settings
    (e.g. `dropout=torch` against the default); each build's loss and LoRA gradients are compared too."""
    import torch

    _scoped_loss()
    builds = {}
    for name, levers in (("A", args.a), ("B", args.b)):
        model, dtype = build(args.paths.split(",")[0], model_dir=args.model, levers=levers, layers=args.layers)
        if args.segmented:
            use_attention(model, levers)
        builds[name] = (model, dtype)
    batch = micro_batch(builds["A"][0].config.vocab_size, layout=args.layout)
    times: dict[str, list[float]] = {"A": [], "B": []}
    cpu: dict[str, list[float]] = {"A": [], "B": []}
    losses = {}
    for name, (model, dtype) in builds.items():  # warm-up, from the same RNG state: the losses must agree
        torch.manual_seed(0)
        losses[name] = step(model, batch, dtype)
    for i in range(args.repeats):
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            model, dtype = builds[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            step(model, batch, dtype)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    out = {"A": args.a, "B": args.b, "A_s": round(med["A"], 3), "B_s": round(med["B"], 3),
           "speedup_B_over_A": round(med["A"] / med["B"], 3),
           # CPU seconds: on a shared machine with one thread, the work done, without the time spent descheduled
           "A_cpu_s": round(med_cpu["A"], 3), "B_cpu_s": round(med_cpu["B"], 3),
           "cpu_speedup_B_over_A": round(med_cpu["A"] / med_cpu["B"], 3),
           "paired_cpu_speedup": round(statistics.median(a / b for a, b in zip(cpu["A"], cpu["B"])), 3),
           "losses": losses, "runs": {k: [round(t, 3) for t in v] for k, v in times.items()},
           "cpu_runs": {k: [round(t, 3) for t in v] for k, v in cpu.items()},
           "load": os.getloadavg(), "threads": torch.get_num_threads()}
    print(json.dumps(out), flush=True)
    return out


def gemm_peak(repeats: int = 3, tokens: int = 1024) -> dict:
    """GFLOP/s of F.linear at SmolLM2's layer shapes (x: tokens x in, W: out x in), fp32 and bf16, FLOP-weighted
    over one decoder layer's seven projections: the best rate these matrix products reach on this machine."""
    import torch
    import torch.nn.functional as F

    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # (in, out)
    result = {}
    for sweep in range(2):  # a peak: the better of two sweeps (the first can meet a cold CPU or a busy neighbour)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            flops, seconds = 0.0, 0.0
            for d_in, d_out in shapes:
                x, w = torch.randn(tokens, d_in, dtype=dtype), torch.randn(d_out, d_in, dtype=dtype)
                n = 20
                t = timed(lambda: [F.linear(x, w) for _ in range(n)], max(repeats, 5), stat=min)  # the best try
                flops += 2 * tokens * d_in * d_out * n
                seconds += t
            result[name] = max(result.get(name, 0.0), round(flops / seconds / 1e9, 1))
    print(f"GEMM peak at the model's shapes ({tokens} tokens): " + ", ".join(f"{k} {v} GFLOP/s" for k, v in
                                                                            result.items()), flush=True)
    return result


def omp(args) -> dict:
    """The bf16 step in fresh processes with OMP_WAIT_POLICY unset, PASSIVE and ACTIVE (alternating, medians)."""
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for policy in ("unset", "PASSIVE", "ACTIVE"):
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "unset":
                env["OMP_WAIT_POLICY"] = policy
            cmd = [sys.executable, __file__, "profile", "--paths", args.paths.split(",")[-1], "--repeats", "3",
                   "--model", str(args.model), "--gemm-tokens", str(args.gemm_tokens), "--json", "-"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            seconds = json.loads(done.stdout.strip().splitlines()[-1])[args.paths.split(",")[-1]]["seconds"]
            runs.setdefault(policy, []).append(seconds)
            print(f"OMP_WAIT_POLICY={policy}: {seconds:.3f} s  (load {os.getloadavg()[0]:.2f})", flush=True)
    return {p: round(statistics.median(s), 3) for p, s in runs.items()}


def shared_a(args) -> dict:
    """LoRA's A projections of q, k, v (and gate, up) read the same input: one matmul with the stacked A
    instead of one per module, forward + backward, at this micro batch's shape (dropout off: with dropout
    each adapter draws its own mask, so there is no shared input to project once)."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(1024, 576, requires_grad=True)
    out = {}
    for count in (3, 2):
        a = [torch.randn(16, 576, requires_grad=True) for _ in range(count)]

        def separate():
            sum(F.linear(x, ai).sum() for ai in a).backward()

        def stacked():
            sum(p.sum() for p in F.linear(x, torch.cat(a)).split(16, dim=-1)).backward()

        out[f"{count} modules"] = {"separate_ms": round(timed(separate, 20) * 1e3, 3),
                                   "stacked_ms": round(timed(stacked, 20) * 1e3, 3)}
    print(json.dumps(out), flush=True)
    return out


def attention(args) -> dict:
    """A padding-free row of 4 examples (lengths of a GSM8K batch), SmolLM2's 9 query / 3 key-value heads of 64,
    laid out as the model hands them over (transposed views of (1, T, heads, 64) projections), forward + backward:
    SDPA with the block-diagonal causal mask over the row (what transformers builds); per example SDPA on slices
    (finetune/model/attention.py before), on split pieces, and as plain matrix products (finetune's `math` form);
    flex attention with a document mask (eager; compiled when --compile)."""
    import torch
    import torch.nn.functional as F

    from finetune.model.attention import causal_attention_math

    lengths = [188, 240, 301, 242]
    total = sum(lengths)
    leaves = [torch.randn(1, total, heads, 64, requires_grad=True) for heads in (9, 3, 3)]
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(total)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    starts = [sum(lengths[:i]) for i in range(len(lengths))]

    def qkv():
        return [t.transpose(1, 2) for t in leaves]

    def masked():
        q, k, v = qkv()
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum().backward()

    def sliced():
        q, k, v = qkv()
        outs = [F.scaled_dot_product_attention(q[:, :, s : s + n], k[:, :, s : s + n], v[:, :, s : s + n],
                                               is_causal=True, enable_gqa=True) for s, n in zip(starts, lengths)]
        torch.cat(outs, dim=2).sum().backward()

    def split():
        outs = [F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                for qs, ks, vs in zip(*(t.split(lengths, dim=2) for t in qkv()))]
        torch.cat(outs, dim=2).sum().backward()

    def math():
        outs = [causal_attention_math(qs, ks, vs, 64**-0.5) for qs, ks, vs in zip(*(t.split(lengths, dim=2)
                                                                                   for t in qkv()))]
        torch.cat(outs, dim=2).sum().backward()

    out = {}
    for name, fn in (("masked_sdpa", masked), ("per_example_sliced_sdpa", sliced),
                     ("per_example_split_sdpa", split), ("per_example_math", math)):
        out[name + "_ms"] = round(timed(fn, args.repeats) * 1e3, 1)
    q, k, v = qkv()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = torch.cat([causal_attention_math(qs, ks, vs, 64**-0.5) for qs, ks, vs in
                     zip(*(t.split(lengths, dim=2) for t in (q, k, v)))], dim=2)
    out["math_max_abs_diff"] = float((ref - got).abs().max())
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def doc_causal(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        block = create_block_mask(doc_causal, None, None, total, total, device="cpu")
        fn = torch.compile(flex_attention) if args.compile else flex_attention

        def flex():
            q, k, v = qkv()
            fn(q, k, v, block_mask=block, enable_gqa=True).sum().backward()

        out["flex_attention_ms" + ("_compiled" if args.compile else "")] = round(timed(flex, args.repeats) * 1e3, 1)
    except Exception as e:  # noqa: BLE001 - report what this torch build cannot do
        out["flex_attention"] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    out["by_length"] = attention_by_length([int(n) for n in args.lengths.split(",")], args.repeats)
    print(json.dumps(out), flush=True)
    return out


def attention_by_length(lengths: list[int], repeats: int) -> dict:
    """One causal example of each length, forward + backward, float32 and bf16: SDPA's flash kernel against the
    matrix products (`causal_attention_math`): where finetune/model/attention.py's MATH_MAX_TOKENS comes from."""
    import torch
    import torch.nn.functional as F

    from finetune.model.attention import causal_attention_math

    forms = {"flash": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
             "math": lambda q, k, v: causal_attention_math(q, k, v, 64**-0.5)}
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for n in lengths:
            leaves = [torch.randn(1, n, heads, 64, dtype=dtype, requires_grad=True) for heads in (9, 3, 3)]
            row = {}
            for form, fn in forms.items():
                def step(fn=fn):
                    fn(*(t.transpose(1, 2) for t in leaves)).float().sum().backward()

                row[form + "_ms"] = round(timed(step, repeats) * 1e3, 2)
            row["math_speedup"] = round(row["flash_ms"] / row["math_ms"], 2)
            out[f"{name} {n}"] = row
            print(f"attention {name} {n} tokens: flash {row['flash_ms']} ms, products {row['math_ms']} ms "
                  f"({row['math_speedup']}x)", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["profile", "ab", "peak", "omp", "shared-a", "attention"])
    p.add_argument("--model", default=str(MODEL), help="The model directory (default: make fetch's SmolLM2).")
    p.add_argument("--gemm-tokens", type=int, default=1024, help="profile, peak: rows of the GEMM rate measurement")
    p.add_argument("--paths", default="fp32,bf16-autocast,bf16", help=f"profile: of {', '.join(PATHS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layout", choices=["padded", "padfree"], default="padded", help="profile: the micro batch")
    p.add_argument("--segmented", action="store_true", help="profile: segmented attention (finetune/model/attention.py)")
    p.add_argument("--compile", action="store_true", help="attention: torch.compile the flex attention call")
    p.add_argument("--lengths", default="128,256,512,1024,2048", help="attention: one example of each length, "
                   "flash vs matrix products in fp32 and bf16")
    p.add_argument("--levers", default="", help="profile: levers turned off, of "
                   f"{', '.join([*LEVERS, *ATTENTION_LEVERS, *OTHER_LEVERS])}")
    p.add_argument("--a", default="", help="ab: build A's levers (comma-separated, as --levers)")
    p.add_argument("--b", default="", help="ab: build B's levers")
    p.add_argument("--layers", type=int, default=0, help="profile, ab: the first N decoder layers only (0: all)")
    p.add_argument("--accumulation", type=int, default=4, help="profile: micro batches per optimizer step")
    p.add_argument("--json", help="write the result here (- for the last line of stdout)")
    args = p.parse_args(argv)
    result = {"profile": profile, "ab": ab, "peak": lambda a: gemm_peak(a.repeats, a.gemm_tokens), "omp": omp,
              "shared-a": shared_a, "attention": attention}[args.what](args)
    if args.json == "-":
        print(json.dumps(result))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
