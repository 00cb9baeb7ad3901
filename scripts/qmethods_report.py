"""How much the 4-bit base loses, and how much LoftQ wins back at step 0 (the numbers of docs/methods.md, "LoftQ and
IR-QLoRA"): for a recipe's model and eval data,

1. the quantization error of the base's linear weights in NF4 (bitsandbytes' codes, no double quantization) and in
   ICQ-NF4 (IR-QLoRA): mean squared error, relative Frobenius error ||W - Q|| / ||W|| and the mean entropy of the
   4-bit codes per block of 64 (4 bits is the most 16 codes can carry);
2. the eval loss before any training step of: the full-precision model; QLoRA's start (the 4-bit base, B = 0) in
   NF4 (the recipe's double quantization) and in ICQ-NF4; and LoftQ's start for each --loftq-iters T.

    python scripts/qmethods_report.py recipes/quickstart.yaml --loftq-iters 1 5 --json runs/qmethods_report.json

The ICQ search is cached (finetune/model/icq_base.py); the first run on a 135M model spends minutes in it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--loftq-iters", type=int, nargs="*", default=[1, 5])
    parser.add_argument("--limit", type=int, help="evaluate on the first N eval examples only")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, ["quantization.compute_dtype=float32"])  # the error, not bf16's rounding
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe.model_copy(update={"output_dir": tmp})
        report = {"model": recipe.model.name_or_path, "quantization_error": quantization_errors(recipe),
                  "step0_eval_loss": step0_losses(recipe, args.loftq_iters, args.limit)}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def quantization_errors(recipe) -> dict[str, dict[str, float]]:
    """NF4 and ICQ-NF4 over every linear weight a 4-bit base quantizes, all weights pooled."""
    from finetune.model import load_base_model, resolve
    from finetune.model.icq_base import quantizable
    from finetune.quant import get_format, quant_linears
    from finetune.quant.nf4 import as_blocks, code_entropy, unpack_nibbles

    float_q = recipe.quantization.model_copy(update={"load_in_4bit": False})
    full = {n: m.weight.detach().float() for n, m in
            quantizable(load_base_model(recipe.model, float_q, "cpu", resolve(float_q))).items()}
    icq_q = recipe.quantization.model_copy(update={"load_in_4bit": True, "quant_type": "icq_nf4"})
    icq = {n: m.packed for n, m in quant_linears(load_base_model(recipe.model, icq_q, "cpu", resolve(icq_q))).items()}
    nf4 = get_format("nf4")
    out = {}
    for name, packs in (("nf4", {n: nf4.pack(w) for n, w in full.items()}), ("icq_nf4", icq)):
        fmt, sq, norm, entropy, blocks = get_format(name), 0.0, 0.0, 0.0, 0
        for n, w in full.items():
            diff = (w - fmt.dequantize(packs[n])).double()
            sq, norm = sq + float(diff.pow(2).sum()), norm + float(w.double().pow(2).sum())
            h = code_entropy(as_blocks(unpack_nibbles(packs[n].data["codes"]), name))
            entropy, blocks = entropy + float(h.sum()), blocks + h.numel()
        values = sum(w.numel() for w in full.values())
        out[name] = {"mse": sq / values, "rel_frobenius": (sq / norm) ** 0.5, "code_entropy_bits": entropy / blocks}
        print(f"{name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def step0_losses(recipe, loftq_iters: list[int], limit: int | None) -> dict[str, float]:
    """Eval loss of each model as training would start it (adapters at their initial values)."""
    import torch
    from torch.utils.data import DataLoader

    from finetune.data import Collator, cache_dir, train_eval_split
    from finetune.evaluate.measure import eval_loss
    from finetune.model import (
        attach_lora, load_base_model, load_tokenizer, loftq_initialise, prepare_loftq_base, resolve,
    )

    tok = load_tokenizer(recipe.model, recipe.data.chat_template)
    eval_set = train_eval_split(recipe.data, tok, recipe.training.seed, cache_dir(recipe.run_dir))[1]
    eval_set = [eval_set[i] for i in range(min(limit or len(eval_set), len(eval_set)))]
    loader = DataLoader(eval_set, batch_size=recipe.training.micro_batch_size, collate_fn=Collator(tok.pad_token_id))

    def started(quant: dict, lora: dict | None = None) -> float:
        r = recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update=quant),
                                      "lora": recipe.lora.model_copy(update=lora or {}),
                                      "output_dir": str(recipe.run_dir / f"T{(lora or {}).get('loftq_iter', 0)}")})
        placement = resolve(r.quantization)
        source = prepare_loftq_base(r, placement.compute_dtype, write=True, resuming=False) \
            if r.lora.init == "loftq" else r.model
        torch.manual_seed(r.training.seed)
        model = attach_lora(load_base_model(source, r.quantization, "cpu", placement), r, placement)
        if r.lora.init == "loftq":
            loftq_initialise(model, r)
        loss = eval_loss(model, loader)
        print(f"step-0 eval loss {loss:.4f}: {quant} {lora or ''}", file=sys.stderr, flush=True)  # as they come
        return loss

    losses = {"full_precision": started({"load_in_4bit": False}),
              "qlora_nf4": started({"load_in_4bit": True, "quant_type": "nf4"}),
              "qlora_icq_nf4": started({"load_in_4bit": True, "quant_type": "icq_nf4"})}
    for t in loftq_iters:
        losses[f"loftq_nf4_T{t}"] = started({"load_in_4bit": True, "quant_type": "nf4"},
                                            {"init": "loftq", "loftq_iter": t})
    return losses


if __name__ == "__main__":
    main()
