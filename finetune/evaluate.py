"""`finetune eval`: loss, perplexity and sample generations for a base model, an adapter or a merged model.

Loss is the mean cross-entropy over response tokens only (the same masking as
training), so a before/after comparison measures exactly what training optimised.
Perplexity is exp(loss). `exact_match` compares greedy generations with the
reference response after stripping whitespace.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from finetune.data import IGNORE, Collator, prompt_and_reference, split_records, tokenize_all
from finetune.errors import DataError
from finetune.recipe import Recipe


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose label is not -100."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model(**inputs, use_cache=False)
    logits = out.logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def eval_loss(model, dataloader, accelerator=None) -> float:
    """Mean response-token loss over a dataloader (summed over processes when distributed)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in dataloader:
        batch = {k: v.to(device) for k, v in batch.items()}
        total[0] += token_loss_sum(model, batch).double()
        total[1] += (batch["labels"][:, 1:] != IGNORE).sum()
    if accelerator is not None:
        total = accelerator.reduce(total, "sum")
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy completions of token-id prompts, batched with left padding."""
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tok.pad_token_id, use_cache=True,
        )
        outputs += [tok.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    return outputs


@dataclass
class EvalReport:
    data: str
    examples: int
    models: dict[str, dict] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"data": self.data, "examples": self.examples, "models": self.models, "samples": self.samples}


def evaluate(
    recipe: Recipe,
    *,
    adapter: str | None = None,
    model_path: str | None = None,
    compare: bool = False,
    generate_n: int = 0,
    max_new_tokens: int = 128,
) -> EvalReport:
    """Evaluate the recipe's model (or `model_path`), with `adapter` if given; `compare` adds the base."""
    from finetune.model import load_adapter, load_base_model, load_tokenizer

    source = model_path or recipe.model.name_or_path
    model_section = recipe.model.model_copy(update={"name_or_path": source})
    tok = load_tokenizer(adapter or model_section, recipe.data.chat_template)
    _, records = split_records(recipe.data, recipe.training.seed)
    if not records:
        raise DataError(
            "Nothing to evaluate on: the recipe has neither data.eval nor data.eval_fraction. "
            "Add one (or override it, e.g. data.eval=path/to/eval.jsonl)."
        )
    examples, _ = tokenize_all(records, recipe.data, tok)
    dl = DataLoader(examples, batch_size=recipe.training.micro_batch_size, collate_fn=Collator(tok.pad_token_id))
    prompts = [prompt_and_reference(r, recipe.data.format, tok) for r in records[:generate_n]]
    if recipe.data.format == "text":
        prompts = []  # raw text has no prompt/response split to generate against

    candidates = [("adapter" if adapter else "model" if model_path else "base", model_section, adapter)]
    if compare and (adapter or model_path):
        candidates.insert(0, ("base", recipe.model, None))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    data_name = recipe.data.eval or f"{recipe.data.eval_fraction:.0%} of {', '.join(recipe.data.train)}"
    report = EvalReport(data=data_name, examples=len(examples))
    report.samples = [{"prompt": tok.decode(p), "reference": ref} for p, ref in prompts]
    for label, section, adapter_dir in candidates:
        model = load_base_model(section, recipe.quantization, device)
        if adapter_dir:
            model = load_adapter(model, adapter_dir)
        model.eval()
        loss = eval_loss(model, dl)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
        if prompts:
            predictions = generate(model, tok, [p for p, _ in prompts], max_new_tokens)
            for sample, prediction in zip(report.samples, predictions):
                sample[label] = prediction
                sample[f"{label}_correct"] = prediction == sample["reference"].strip()
            metrics["exact_match"] = sum(s[f"{label}_correct"] for s in report.samples) / len(prompts)
        report.models[label] = metrics
        del model
    return report


def print_report(report: EvalReport, console: Console, show_samples: bool = True) -> None:
    if show_samples:
        for i, s in enumerate(report.samples):
            console.rule(f"sample {i + 1}")
            console.print(f"[dim]{s['prompt'][-300:]}[/]", markup=True, highlight=False)
            console.print(f"[bold]reference:[/] {s['reference']}", highlight=False)
            for label in report.models:
                mark = "[green]✓[/]" if s.get(f"{label}_correct") else "[red]✗[/]"
                console.print(f"[bold]{label}:[/] {mark} {s.get(label, '')}", highlight=False)
    table = Table(title=f"eval on {report.data} ({report.examples} examples)")
    table.add_column("model")
    columns = sorted({k for m in report.models.values() for k in m}, key=["loss", "perplexity", "exact_match"].index)
    for c in columns:
        table.add_column(c, justify="right")
    for label, metrics in report.models.items():
        table.add_row(label, *(f"{metrics[c]:.4f}" if c in metrics else "-" for c in columns))
    console.print(table)


def write_report(report: EvalReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
