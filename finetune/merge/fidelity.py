"""How faithful a merged model is: logits of a fixed probe batch against base + adapter as trained (max / mean
|logit difference|, same top-1 token), for the saved base-weights choice and the other one; the report printed."""

from __future__ import annotations

import os
import resource

import torch

from finetune.merge.output import open_safetensors

# The fixed probe batch of the fidelity report: prose, arithmetic, JSON, code and a chat turn.
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. 12 + 30 = 42.",
    'Extract the name and age as JSON: "Ada, 36" -> {"name": "Ada", "age": 36}',
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>",
]


def probe_batch(tok) -> dict[str, torch.Tensor]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [tok(t, add_special_tokens=True)["input_ids"][:64] for t in PROBE_TEXTS]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask}



def fidelity(out_dir, scratch, probe, reference, base_weights, other, dtype) -> dict[str, dict[str, float]]:
    """Logit differences of the saved model (and of the other base-weights choice) from the reference."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).eval()
    keep = probe["attention_mask"].bool()

    def diff() -> dict[str, float]:
        with torch.no_grad():
            logits = merged(**probe).logits.float()
        d = (logits - reference).abs()[keep]
        same_top1 = (logits.argmax(-1) == reference.argmax(-1))[keep].float().mean()
        return {"max_abs_logit_diff": d.max().item(), "mean_abs_logit_diff": d.mean().item(),
                "top1_agreement": same_top1.item()}

    result = {base_weights: diff()}
    for mode in other:
        with torch.no_grad():  # swap in the other choice's 4-bit layer weights, one tensor at a time
            for shard in sorted(scratch.glob("*.safetensors")):
                f = open_safetensors(shard)
                for key in f.keys():
                    merged.get_parameter(key).copy_(f.get_tensor(key))
        result[mode] = diff()
    return result



def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if os.uname().sysname == "Darwin" else 1024), 1)


def print_merge_report(rep, console) -> None:
    """What `finetune merge` prints: what went where, and the fidelity of each base-weights choice."""
    console.print(
        f"merged {', '.join(rep.adapters)} into {rep.base} ({rep.base_weights} base weights), saved {rep.dtype} "
        f"to [bold]{rep.out}[/] ({rep.shards} shard(s), {rep.size_bytes / 2**20:,.0f} MiB, peak RSS "
        f"{rep.peak_rss_mib:,.0f} MiB, {rep.wall_time_s:.1f}s)",
        highlight=False,
    )
    console.print(f"merge fidelity vs {rep.reference}, on {rep.probe_tokens} probe tokens: max / mean |logit diff|, "
                  "same top-1 token", highlight=False)
    for mode, d in rep.fidelity.items():
        mark = " (saved)" if mode == rep.base_weights else ""
        console.print(f"  {mode:<12} {d['max_abs_logit_diff']:.3g} / {d['mean_abs_logit_diff']:.3g}, "
                      f"{d['top1_agreement']:.1%}{mark}", highlight=False)
    for note in rep.notes:
        console.print(f"  {note}", highlight=False)
    if rep.pushed_to:
        console.print(f"pushed to the Hub repo {rep.pushed_to}")
