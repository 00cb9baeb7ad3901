"""One training micro batch under the microscope: where the time goes, how close it is to the machine's limit,
and the levers of docs/performance.md, each measured on the same fixed micro batch.

    python scripts/bench_step.py profile        # fp32, bf16 as it was (autocast over float32 frozen weights),
                                                # bf16 now: seconds per micro batch, time by kind of op, MFU
    python scripts/bench_step.py peak           # the machine's GEMM rate at the model's shapes, fp32 and bf16
    python scripts/bench_step.py omp            # OMP_WAIT_POLICY unset / PASSIVE / ACTIVE, each a fresh process
    python scripts/bench_step.py shared-a       # one LoRA A projection for q/k/v and gate/up instead of 3 and 2
    python scripts/bench_step.py attention      # padding-free row: masked SDPA vs per-example SDPA vs flex attention

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


def build(path: str, dropout: float = 0.05, model_dir: str | Path = MODEL):
    import torch

    import finetune.model.load as fm
    from finetune.recipe.schema import Recipe

    dtype, cast = PATHS[path]
    recipe = Recipe.model_validate({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["unused.jsonl"]},
        "quantization": {"compute_dtype": dtype}, "lora": {"dropout": dropout},
        "training": {"gradient_checkpointing": False},
    })
    from finetune.model import resolve

    placement = resolve(recipe.quantization)
    keep, dropout = fm._frozen_floats_in_compute_dtype, getattr(fm, "use_cpu_dropout", None)
    if not cast:
        fm._frozen_floats_in_compute_dtype = lambda *a, **k: None
    if os.environ.get("BENCH_TORCH_DROPOUT") and dropout:  # torch's dropout instead of finetune.model.dropout.CpuDropout
        fm.use_cpu_dropout = lambda *a, **k: None
    try:
        torch.manual_seed(0)
        base = fm.load_base_model(recipe.model, recipe.quantization, "cpu", placement)
        model = fm.attach_lora(base, recipe, placement)
    finally:
        fm._frozen_floats_in_compute_dtype = keep
        if dropout:
            fm.use_cpu_dropout = dropout
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


def profile(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from finetune.plan.flops import train_flops

    peaks = gemm_peak(args.repeats, args.gemm_tokens)
    out = {"peak_gflops": peaks}
    for path in args.paths.split(","):
        model, dtype = build(path, model_dir=args.model)
        batch = micro_batch(model.config.vocab_size, layout=args.layout)
        if args.segmented:  # a candidate attention for padding-free rows (finetune/model/attention.py where present)
            from finetune.model.attention import use_segmented_attention

            use_segmented_attention(model)
        seconds = timed(lambda m=model, b=batch, d=dtype: step(m, b, d), args.repeats)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step(model, batch, dtype)
        kinds: dict[str, float] = {}
        for e in prof.key_averages():
            kind = next((k for k, subs in KINDS if any(s in e.key for s in subs)), "other (elementwise, norms, ...)")
            kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total / 1e6
        total = sum(kinds.values())
        lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        labelled = int((batch["labels"][:, 1:] != -100).sum())
        lengths = ([188, 240, 301, 242] if args.layout == "padfree"
                   else [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0])
        flops = train_flops(model.config, lengths, labelled, lora)
        peak = peaks["bf16" if dtype == torch.bfloat16 else "fp32"]
        out[path] = {
            "seconds": round(seconds, 3), "tokens_per_s": round(batch["input_ids"].numel() / seconds, 1),
            "model_gflops": round(flops / 1e9, 1), "achieved_gflops": round(flops / seconds / 1e9, 1),
            "mfu_vs_own_dtype_peak": round(flops / seconds / 1e9 / peak, 3),
            "mfu_vs_bf16_peak": round(flops / seconds / 1e9 / peaks["bf16"], 3),
            "time_share": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_ops": [(e.key, round(e.self_cpu_time_total / 1e6, 3)) for e in
                        sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]],
        }
        print(json.dumps({path: out[path]}, indent=1), flush=True)
        del model
    return out


def gemm_peak(repeats: int = 3, tokens: int = 1024) -> dict:
    """GFLOP/s of F.linear at SmolLM2's layer shapes (x: tokens x in, W: out x in), fp32 and bf16, FLOP-weighted
    over one decoder layer's seven projections: the best rate these matrix products reach on this machine."""
    import torch
    import torch.nn.functional as F

    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # (in, out)
    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        flops, seconds = 0.0, 0.0
        for d_in, d_out in shapes:
            x, w = torch.randn(tokens, d_in, dtype=dtype), torch.randn(d_out, d_in, dtype=dtype)
            n = 20
            t = timed(lambda: [F.linear(x, w) for _ in range(n)], max(repeats, 5), stat=min)  # a peak: the best try
            flops += 2 * tokens * d_in * d_out * n
            seconds += t
        result[name] = round(flops / seconds / 1e9, 1)
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
    """A padding-free row of 4 examples (lengths of a GSM8K batch), SmolLM2's 9 query / 3 key-value heads of 64:
    SDPA with the block-diagonal causal mask over the row (what transformers builds), SDPA per example, and flex
    attention with a document mask (eager; compiled when --compile), forward + backward."""
    import torch
    import torch.nn.functional as F

    lengths = [188, 240, 301, 242]
    total = sum(lengths)
    q = torch.randn(1, 9, total, 64, requires_grad=True)
    k, v = (torch.randn(1, 3, total, 64, requires_grad=True) for _ in range(2))
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(total)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])

    def masked():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum().backward()

    def per_example():
        outs = [F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                for qs, ks, vs in zip(*(t.split(lengths, dim=2) for t in (q, k, v)))]
        torch.cat(outs, dim=2).sum().backward()

    out = {"masked_sdpa_ms": round(timed(masked, args.repeats) * 1e3, 1),
           "per_example_sdpa_ms": round(timed(per_example, args.repeats) * 1e3, 1)}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def doc_causal(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        block = create_block_mask(doc_causal, None, None, total, total, device="cpu")
        fn = torch.compile(flex_attention) if args.compile else flex_attention

        def flex():
            fn(q, k, v, block_mask=block, enable_gqa=True).sum().backward()

        out["flex_attention_ms" + ("_compiled" if args.compile else "")] = round(timed(flex, args.repeats) * 1e3, 1)
    except Exception as e:  # noqa: BLE001 - report what this torch build cannot do
        out["flex_attention"] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["profile", "peak", "omp", "shared-a", "attention"])
    p.add_argument("--model", default=str(MODEL), help="The model directory (default: make fetch's SmolLM2).")
    p.add_argument("--gemm-tokens", type=int, default=1024, help="profile, peak: rows of the GEMM rate measurement")
    p.add_argument("--paths", default="fp32,bf16-autocast,bf16", help=f"profile: of {', '.join(PATHS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layout", choices=["padded", "padfree"], default="padded", help="profile: the micro batch")
    p.add_argument("--segmented", action="store_true", help="profile: segmented attention (finetune/model/attention.py)")
    p.add_argument("--compile", action="store_true", help="attention: torch.compile the flex attention call")
    p.add_argument("--json", help="write the result here (- for the last line of stdout)")
    args = p.parse_args(argv)
    result = {"profile": profile, "peak": lambda a: gemm_peak(a.repeats, a.gemm_tokens), "omp": omp,
              "shared-a": shared_a, "attention": attention}[args.what](args)
    if args.json == "-":
        print(json.dumps(result))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
