"""What the decode step's matrix products cost per token in each weight format this CPU can run, on a model's own
shapes: the ceiling each format puts on decoding's tokens/s, whatever else the step does.

    python scripts/bench_decode_weights.py                                  # SmolLM2-135M-Instruct's shapes
    python scripts/bench_decode_weights.py --model DIR --rows 1 --repeats 1   # smallest

Every layer gets its own random weights (q, k, v, o, gate, up, down at the config's sizes) plus the LM head, so a
token streams all of them from memory as real decoding does (one layer's weights repeated would sit in cache).
Formats: float32 through `F.linear` (the plain weight), float32 in oneDNN's pre-packed layout (what the lean decode
step uses, finetune/generate/lean.py), float16 and bfloat16 through `F.linear` (half the bytes; a lossy copy of a
float32 model's weights), and bf16 pre-packed where oneDNN accepts it (AVX512/AMX CPUs). Reports ms per token's
products at each row count and the tokens/s that alone allows (rows / time); `--llamacpp-tps` (llama.cpp's batch-1
tokens/s from bench_generate.py) adds each format's ceiling as a ratio of it. Last, which of the two float32 (and bf16)
layouts the decode step chose for one or two rows on this CPU (`plain_rows`, measured once per process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def shapes(model_dir: str) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """([out, in] of every projection of every layer], [vocab, hidden] of the head)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    kv = c.get("num_key_value_heads", heads) * head_dim
    layer = [(heads * head_dim, hidden), (kv, hidden), (kv, hidden), (hidden, heads * head_dim),
             (inter, hidden), (inter, hidden), (hidden, inter)]
    return layer * c["num_hidden_layers"], (c["vocab_size"], hidden)


def formats() -> dict[str, tuple[torch.dtype, bool]]:
    return {"float32": (torch.float32, False), "float32 packed": (torch.float32, True),
            "float16": (torch.float16, False), "bfloat16": (torch.bfloat16, False),
            "bfloat16 packed": (torch.bfloat16, True)}


def per_token(weights: list[torch.Tensor], sizes: list[int], dtype: torch.dtype, packed: bool, rows: int,
              repeats: int) -> float | None:
    """Median seconds for one pass of `rows` rows through every weight (`sizes`: each one's input width); None
    where oneDNN refuses the format."""
    if packed:
        try:
            weights = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
        except (RuntimeError, AttributeError):
            return None
        mm = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    else:
        mm = F.linear
    inputs = {k: torch.randn(rows, k).to(dtype) for k in set(sizes)}
    with torch.inference_mode():
        for w, k in zip(weights, sizes):  # warm-up
            mm(inputs[k], w)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for w, k in zip(weights, sizes):
                mm(inputs[k], w)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models/SmolLM2-135M-Instruct"))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--llamacpp-tps", type=float, default=None, help="llama.cpp's batch-1 tokens/s, for ratios")
    args = ap.parse_args(argv)
    layers, head = shapes(args.model)
    torch.manual_seed(0)
    master = [torch.randn(o, i) * i ** -0.5 for o, i in layers + [head]]
    sizes = [w.shape[1] for w in master]
    mb = sum(w.numel() for w in master) * 4 / 1e6
    print(f"{len(layers)} projections + head, {mb:.0f} MB in float32; {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    header = "| format | " + " | ".join(f"{r} row{'s' if r > 1 else ''}: ms / ceiling tok/s" for r in args.rows)
    lines = [header + " |", "|---" * (len(args.rows) + 1) + "|"]
    for name, (dtype, packed) in formats().items():
        weights = [w.to(dtype) for w in master]
        cells = []
        for rows in args.rows:
            t = per_token(weights, sizes, dtype, packed, rows, args.repeats)
            if t is None:
                cells.append("oneDNN refuses it here")
                continue
            cell = f"{t * 1e3:.1f} / {rows / t:.0f}"
            if rows == 1 and args.llamacpp_tps:
                cell += f" ({1 / t / args.llamacpp_tps:.2f}x llama.cpp)"
            cells.append(cell)
        del weights
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    sys.path.insert(0, str(ROOT))
    from finetune.generate.weights import plain_rows

    print("\nThe decode step on this CPU (finetune.generate.weights.plain_rows, its own probe): "
          + "; ".join(f"{d}: {_choice(plain_rows(getattr(torch, d)))}" for d in ("float32", "bfloat16")))
    return 0


def _choice(rows: int) -> str:
    return "packed at every row count" if rows == 0 else f"plain at up to {rows} row{'s' * (rows > 1)}, packed above"


if __name__ == "__main__":
    sys.exit(main())
