"""What the decode step's matrix products cost per token in each weight format this CPU can run, on a model's own
shapes: the ceiling each format puts on decoding's tokens/s, whatever else the step does.

    python scripts/bench_decode_weights.py                                  # SmolLM2-135M-Instruct's shapes
    python scripts/bench_decode_weights.py --model DIR --rows 1 --repeats 1   # smallest
    python scripts/bench_decode_weights.py --accuracy ../shared/data/gsm8k/train.jsonl --quantize 4bit

Every layer gets its own random weights (q, k, v, o, gate, up, down at the config's sizes) plus the LM head, so a
token streams all of them from memory as real decoding does (one layer's weights repeated would sit in cache).
Formats: float32 through `F.linear` (the plain weight), float32 in oneDNN's pre-packed layout (what the lean decode
step uses, finetune/generate/lean.py), float16 and bfloat16 through `F.linear` (half the bytes; a lossy copy of a
float32 model's weights), bf16 pre-packed where oneDNN accepts it (AVX512/AMX CPUs), and int8 with a bf16 scale per
row through torch's weight-only int8 product (FINETUNE_DECODE_WEIGHTS=int8: float32 in, bf16 in the kernel, float32
out, as the decode step runs it; a quarter of the bytes, not the same numbers). Reports ms per token's
products at each row count and the tokens/s that alone allows (rows / time); `--llamacpp-tps` (llama.cpp's batch-1
tokens/s from bench_generate.py) adds each format's ceiling as a ratio of it. Last, which of the two float32 (and bf16)
layouts the decode step chose for one or two rows on this CPU (`plain_rows`, measured once per process).

`--accuracy FILE` (JSONL: a "text" field, or "question" and "answer" as GSM8K's) also measures what int8 decode
weights cost in accuracy: the model (`--quantize 4bit`: its NF4 form, as QLoRA trains on it) decodes each text token
by token through the lean decode step, its own tokens forced, with the exact weights and with
FINETUNE_DECODE_WEIGHTS=int8; reported: how often the two agree on the next token (top-1) and the mean KL divergence
of int8's next-token distribution from the exact one.
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
sys.path.insert(0, str(ROOT))


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
            "bfloat16 packed": (torch.bfloat16, True), "int8, float32 in and out": (torch.int8, False)}


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
    elif dtype == torch.int8:  # FINETUNE_DECODE_WEIGHTS=int8: the decode step's int8 product, conversions included
        from finetune.generate.weights import int8_available, int8_product, int8_weight

        if not int8_available():
            return None
        weights = [int8_weight(w) for w in weights]
        mm = lambda x, w: int8_product(x, *w)  # noqa: E731
        dtype = torch.float32
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
    ap.add_argument("--accuracy", type=Path, default=None, help="JSONL texts: int8 vs exact decode weights")
    ap.add_argument("--texts", type=int, default=8, help="texts of --accuracy used")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens of each text used")
    ap.add_argument("--quantize", default="none", choices=["4bit", "none"], help="the model's form for --accuracy")
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
        weights = [w.to(dtype) if dtype != torch.int8 else w for w in master]
        cells = []
        for rows in args.rows:
            t = per_token(weights, sizes, dtype, packed, rows, args.repeats)
            if t is None:
                cells.append("oneDNN refuses it here" if packed else "this torch lacks it")
                continue
            cell = f"{t * 1e3:.1f} / {rows / t:.0f}"
            if rows == 1 and args.llamacpp_tps:
                cell += f" ({1 / t / args.llamacpp_tps:.2f}x llama.cpp)"
            cells.append(cell)
        del weights
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    from finetune.generate.weights import FOLD_WIN, int8_available, int8_rows, plain_rows

    print("\nThe decode step on this CPU (finetune.generate.weights.plain_rows, its own probe): "
          + "; ".join(f"{d}: {_choice(plain_rows(getattr(torch, d)))}" for d in ("float32", "bfloat16")))
    print("With FINETUNE_DECODE_WEIGHTS=int8 (finetune.generate.weights.int8_rows): "
          + "; ".join(f"{d}: {_int8(int8_rows(getattr(torch, d)))} (with one adapter folded in: "
                      f"{_int8(int8_rows(getattr(torch, d), FOLD_WIN))})" for d in ("float32", "bfloat16")))
    if args.accuracy and not int8_available():
        print("\nint8 decode weights vs exact: not measured (this torch has no weight-only int8 product)")
    elif args.accuracy:
        agree, kl, tokens, dtype = accuracy(args.model, args.accuracy, args.texts, args.max_tokens,
                                            args.quantize == "4bit")
        print(f"\nint8 decode weights vs exact ({Path(args.model).name}, {args.quantize}, {tokens} tokens of "
              f"{args.texts} texts of {args.accuracy.name}, compute dtype {dtype}): next-token top-1 agreement "
              f"{agree:.2%}, mean KL {kl:.5f} per token")
    return 0


def accuracy(model_dir: str, path: Path, count: int, max_tokens: int,
             four_bit: bool) -> tuple[float, float, int, torch.dtype]:
    """(top-1 agreement, mean KL(exact || int8), tokens, compute dtype) of the lean decode step's next-token
    distributions with int8 and with exact weights, each text decoded token by token (one row per step: the products
    int8 runs)."""
    import os

    from transformers import AutoTokenizer

    from finetune.generate import lean
    from finetune.generate.lean import build_lean
    from finetune.generate.weights import DECODE_WEIGHTS
    from finetune.model import load_base_model, resolve
    from finetune.recipe.schema import QuantizationSection

    quant = QuantizationSection(load_in_4bit=four_bit)
    model = load_base_model(model_dir, quant, "cpu", resolve(quant)).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:count]
    texts = [r["text"] if "text" in r else f"{r['question']} {r['answer']}" for r in rows]
    exact = build_lean(model)
    os.environ[DECODE_WEIGHTS] = "int8"
    # the numbers int8 gives, measured even on a CPU where it is not faster (where the step keeps the exact weights)
    lean.int8_rows = lambda dtype, bar: 1
    try:
        eight = build_lean(model)
    finally:
        del os.environ[DECODE_WEIGHTS]
    assert eight.head.int8 is not None
    agree = kl = tokens = 0
    with torch.inference_mode():
        for text in texts:
            ids = tok(text)["input_ids"][:max_tokens]
            a, b = forced_logits(exact, ids), forced_logits(eight, ids)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            kl += float(F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum"))
            tokens += len(a)
    return agree / tokens, kl / tokens, tokens, exact.dtype


def forced_logits(lm, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] logits of the next token after each prefix of `ids`, one token per decode step."""
    from finetune.generate.batch import LeanBatch

    batch = LeanBatch(lm)
    out = [batch.prefill([ids[:1]], [None])]
    out += [batch.decode([t], [None]) for t in ids[1:]]
    return torch.cat(out)




def _int8(rows: int) -> str:
    return "the exact weights at every row count" if rows == 0 else f"int8 at up to {rows} rows, the exact above"


def _choice(rows: int) -> str:
    return "packed at every row count" if rows == 0 else f"plain at up to {rows} row{'s' * (rows > 1)}, packed above"


if __name__ == "__main__":
    sys.exit(main())
