"""QA-LoRA folded exactly into a Q4_1 GGUF, against plain LoRA merged and re-quantized (docs/quantized.md).

Trains two adapters on the same GGUF file's own blocks (quantization.quant_type gguf), with the same data, steps,
learning rate and seed: QA-LoRA (lora.use_qalora, groups of --group inputs) and plain LoRA. Exports both with
`finetune export --type TYPE`: the QA-LoRA update is folded into the file's block offsets, the LoRA one is merged
and re-quantized. Each file is read back by transformers and its logits compared with its own trained model (the
file's blocks + the adapter, float32) on the export probe texts and the eval examples: max and mean |logit
difference|, top-1 agreement. Also: the base's own quantization error (the file's blocks against the float
conversion, and the NF4 re-quantization the nf4 path trains on instead), and, when llama-cpp-python is installed,
each file's greedy reply in llama.cpp against `finetune chat`'s reply to the same prompt.

    python scripts/qalora_export.py [--gguf FILE] [--train F] [--eval F] [--steps N] [--out DIR] [--type q4_1]
        [--group 32] [--rank 16] [--lr 1e-3] [--prompt TEXT] [--max-new-tokens 40] [--no-llama]

Writes OUT/qalora_export.json and prints the table.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Extract the person's name, age and city as JSON.\n\nLena, 29, teacher, Oslo."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--train", type=Path, default=ROOT / "data" / "quickstart" / "train.jsonl")
    p.add_argument("--eval", type=Path, default=ROOT / "data" / "quickstart" / "eval.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "qalora-export")
    p.add_argument("--type", default="q4_1", choices=["q4_1", "q5_1"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-examples", type=int, default=16)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--no-llama", action="store_true", help="skip the llama.cpp replies")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))  # run as a script: finetune from this checkout
    args.out.mkdir(parents=True, exist_ok=True)
    texts = eval_texts(args.eval, args.eval_examples)
    result = {"gguf": str(args.gguf), "type": args.type, "steps": args.steps, "group": args.group,
              "base": base_error(args.gguf, texts), "runs": {}}
    for name, qalora in (("qalora", True), ("lora", False)):
        started = time.time()
        ckpt = train(args, name, qalora)
        out = args.out / name / f"{name}-{args.type}.gguf"
        out.parent.mkdir(exist_ok=True)
        from finetune.export.gguf import export

        report = export(ckpt, out, type=args.type, overwrite=True)  # as `finetune export CKPT --type TYPE` does
        row = {"export": "folded" if report.fold else "merged + re-quantized", "fold": report.fold,
               "notes": report.notes, **logits_vs_trained(ckpt, out, texts), "size_bytes": out.stat().st_size}
        if not args.no_llama:
            row.update(replies(ckpt, out, args.prompt, args.max_new_tokens))
        row["wall_s"] = round(time.time() - started, 1)
        result["runs"][name] = row
    (args.out / "qalora_export.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def finetune(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-m", "finetune", *argv], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"finetune {' '.join(argv[:2])} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done.stdout


def train(args, name: str, qalora: bool) -> Path:
    recipe = {
        "name": name, "output_dir": str(args.out / name / "run"), "model": {"name_or_path": str(args.gguf)},
        "quantization": {"quant_type": "gguf", "compute_dtype": "float32"},
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.05, "target_modules": "all-linear",
                 **({"use_qalora": True, "qalora_group_size": args.group} if qalora else {})},
        "data": {"train": str(args.train), "eval": str(args.eval), "format": "alpaca", "max_length": args.max_length},
        "training": {"max_steps": args.steps, "micro_batch_size": args.batch, "learning_rate": args.lr,
                     "warmup_steps": min(2, args.steps - 1), "optimizer": "adamw_torch", "gradient_checkpointing": False,
                     "logging_steps": max(1, args.steps // 4), "seed": 42},
    }
    path = args.out / f"{name}.yaml"
    path.write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    finetune("train", str(path), "--overwrite")
    return args.out / name / "run" / "checkpoint-final"


def eval_texts(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    return [{"role": "user", "content": f"{r['instruction']}\n\n{r.get('input', '')}".strip(), "answer": r["output"]}
            for r in rows]


def batches(tok, texts: list[dict]) -> list[dict]:
    """The export probe batch, and the eval examples (prompt + answer through the chat template) one by one."""
    from finetune.merge import probe_batch

    out = [probe_batch(tok)]
    for t in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": t["content"]},
                                       {"role": "assistant", "content": t["answer"]}], tokenize=True,
                                      return_dict=True)["input_ids"]
        ids = torch.tensor([list(ids)])
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def compare(model_a, model_b, inputs: list[dict]) -> dict:
    diffs, same = [], []
    with torch.no_grad():
        for b in inputs:
            keep = b["attention_mask"].bool()
            a, c = model_a(**b).logits.float(), model_b(**b).logits.float()
            diffs.append((a - c).abs()[keep])
            same.append((a.argmax(-1) == c.argmax(-1))[keep])
    d, s = torch.cat(diffs), torch.cat(same)
    return {"max_abs_logit_diff": d.max().item(), "mean_abs_logit_diff": d.mean().item(),
            "top1_agreement": s.float().mean().item(), "positions": int(s.numel())}


def base_error(gguf: Path, texts: list[dict]) -> dict:
    """The base as each path trains on it, against the file's float conversion (its exact dequantization)."""
    from finetune.model import cache_weights, load_base_model, load_tokenizer, resolve
    from finetune.recipe import QuantizationSection

    def load(**q):
        quant = QuantizationSection(compute_dtype="float32", **q)
        model = load_base_model(str(gguf), quant, "cpu", resolve(quant)).eval()
        cache_weights(model, torch.float32)  # GGUF layers: dequantized once (the same numbers, faster)
        return model

    inputs = batches(load_tokenizer(str(gguf)), texts)
    reference = load(load_in_4bit=False)
    return {"gguf blocks (quant_type gguf)": compare(load(quant_type="gguf"), reference, inputs),
            "nf4 of the dequantized file (quant_type nf4)": compare(load(quant_type="nf4"), reference, inputs)}


def logits_vs_trained(ckpt: Path, file: Path, texts: list[dict]) -> dict:
    from transformers import AutoModelForCausalLM

    from finetune.model import (
        attach_saved_adapter, cache_weights, load_adapter_tokenizer, load_base_model, resolve, saved_recipe,
    )
    from finetune.recipe import QuantizationSection

    recipe = saved_recipe(ckpt)
    quant = QuantizationSection.model_validate(recipe["quantization"]).model_copy(update={"compute_dtype": "float32"})
    base = recipe["model"]["name_or_path"]
    trained = load_base_model(base, quant, "cpu", resolve(quant))
    cache_weights(trained, torch.float32)  # dequantized once: the same numbers, faster
    trained = attach_saved_adapter(trained, ckpt, "a0").eval()
    exported = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    return compare(exported, trained, batches(load_adapter_tokenizer(ckpt, base)[0], texts))


def replies(ckpt: Path, file: Path, prompt: str, max_new_tokens: int) -> dict:
    """`finetune chat`'s greedy reply and llama.cpp's greedy continuation of the same prompt ids with `file`."""
    try:
        import llama_cpp
    except ImportError:
        return {"llama_cpp": "not installed (pip install -e '.[llamacpp]')"}
    from finetune.generate import render_messages
    from finetune.model import load_adapter_tokenizer, saved_recipe

    chat = finetune("chat", str(ckpt), "--prompt", prompt, "--max-new-tokens", str(max_new_tokens)).strip()
    tok = load_adapter_tokenizer(ckpt, saved_recipe(ckpt)["model"]["name_or_path"])[0]
    ids = render_messages(tok, [{"role": "user", "content": prompt}], str(ckpt))
    llm = llama_cpp.Llama(model_path=str(file), n_ctx=512, n_threads=2, verbose=False)
    stop, out = {tok.eos_token_id, llm.token_eos()}, []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if t in stop:
            break
        out.append(t)
        if len(out) == max_new_tokens:
            break
    llama = tok.decode(out, skip_special_tokens=True).strip()
    return {"chat_reply": chat, "llama_cpp_reply": llama, "replies_equal": chat == llama}


def print_table(r: dict) -> None:
    print(f"{Path(r['gguf']).name}, {r['steps']} steps, export --type {r['type']}")
    print(f"{'':44} {'max |dlogit|':>12} {'mean':>9} {'top-1':>7}")
    for name, m in r["base"].items():
        print(f"base: {name:38} {m['max_abs_logit_diff']:12.4g} {m['mean_abs_logit_diff']:9.3g} "
              f"{m['top1_agreement']:7.2%}")
    for name, m in r["runs"].items():
        label = f"{'QA-LoRA' if name == 'qalora' else 'LoRA'} ({m['export']}) vs trained"
        print(f"{label:44} {m['max_abs_logit_diff']:12.4g} {m['mean_abs_logit_diff']:9.3g} {m['top1_agreement']:7.2%}")
    fold = r["runs"]["qalora"].get("fold")
    if fold:
        print(f"fold: {fold['folded_tensors']} tensors; scales and codes identical {fold['scales_and_codes_identical']}, "
              f"other tensors identical {fold['other_tensors_identical']}, same size {fold['same_size']}, same types "
              f"{fold['same_types']}; m + U rounded to fp16: max {fold['offset_rounding_max']:.3g}, mean "
              f"{fold['offset_rounding_mean']:.3g} (|U| up to {fold['update_max_abs']:.3g})")
    for name, m in r["runs"].items():
        if "replies_equal" in m:
            print(f"{name}: llama.cpp reply == finetune chat reply: {m['replies_equal']}  ({m['llama_cpp_reply']!r})")


if __name__ == "__main__":
    main()
