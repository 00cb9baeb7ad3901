"""`finetune eval`: loss, perplexity and generation metrics for base models, adapters and merged models.

Loss is the mean cross-entropy over response tokens only (the same masking as
training, from data.py), so a before/after comparison measures exactly what
training optimised; perplexity is exp(loss). Generation metrics (exact_match, contains,
chrF/BLEU) come from batched completions of each example's prompt (generation.py).

Several adapters share one loaded base (PEFT switches between them), and the base
itself is measured with the adapters disabled, so a comparison costs one model load.
Training's periodic evaluation calls `eval_loss` (and may call `generation_metrics`)
from here, so numbers during and after training are the same computation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import DataLoader

from finetune.data import Collator, split_records, tokenize_all
from finetune.errors import DataError, ModelError, first_line
from finetune.generate import (  # noqa: F401  (re-exported: eval's public names)
    GenerationOptions, generate, generation_kwargs, generation_metrics, last_number, make_extractor,
    normalize_number, score_example,
)
from finetune.model import (
    adapter_labels, check_adapter_dir, compute_like_training, eval_quantization, load_adapters, load_eval_model,
    load_tokenizer, resolve_compute_dtype,
)
from finetune.progress import track
from finetune.recipe import DataSection, ModelSection, QuantizationSection, Recipe

SCHEMA = "finetune.eval/1"


# ------------------------------------------------------------------- loss


@torch.no_grad()
def eval_objective(model, dataloader, objective=None, accelerator=None, on_batch=None) -> dict[str, float]:
    """Mean loss per unit (and the objective's metrics per unit) over a dataloader, summed over processes
    when distributed; the objective defaults to SFT, the response-token cross-entropy.
    `on_batch(1)` is called after each batch (progress.py's `Task.advance`)."""
    from finetune.objectives import SFT

    objective = objective or SFT()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2 + len(objective.metrics), dtype=torch.float64, device=device)  # loss, units, metrics
    for batch in dataloader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = objective(model, batch)
        total[0] += out.total.double()
        total[1] += objective.units(batch)
        for i, name in enumerate(objective.metrics):
            total[2 + i] += out.metrics[name].double()
        if on_batch is not None:
            on_batch(1)
    if accelerator is not None:
        total = accelerator.reduce(total, "sum")
    model.train(was_training)
    means = (total / total[1].clamp(min=1)).tolist()
    return {"loss": means[0], **dict(zip(objective.metrics, means[2:]))}


def eval_loss(model, dataloader, accelerator=None, on_batch=None) -> float:
    """Mean response-token loss over a dataloader (summed over processes when distributed)."""
    return eval_objective(model, dataloader, accelerator=accelerator, on_batch=on_batch)["loss"]


# ---------------------------------------------------------------- models


@dataclass
class Candidate:
    """One row of the comparison: a model, optionally with one adapter active."""

    label: str
    model: str
    adapter: str | None
    quantization: str


def _describe(q: QuantizationSection) -> str:
    return f"4-bit {q.quant_type}" if q.load_in_4bit else "none"


# ----------------------------------------------------------------- data


def eval_data(recipe: Recipe | None, data: str | None, data_format: str | None = None,
              fields: dict[str, str] | None = None) -> DataSection:
    """The data section to evaluate on: the recipe's eval split, or `data` read like the recipe's data
    (or in `data_format`, with `fields` mapping format fields to its columns)."""
    if data is None:
        if recipe is None:
            raise DataError("Nothing to evaluate on: give a recipe (its eval data) or --data FILE.")
        return recipe.data
    if not Path(data).is_file():
        raise DataError(f"--data: '{data}' is not a file.")
    base = recipe.data.model_dump(exclude_unset=True) if recipe else {}
    for key in ("eval_fraction", "datasets"):  # only --data is read
        base.pop(key, None)
    fmt = data_format or (recipe.data.format if recipe else _guess_format(data))
    if fields is not None or (recipe and fmt != recipe.data.format):
        base["fields"] = fields or {}
    try:
        return DataSection.model_validate({**base, "train": [data], "eval": data, "format": fmt})
    except ValueError as e:  # pydantic's ValidationError: one line per problem, without its URL boilerplate
        errors = e.errors() if hasattr(e, "errors") else [{"loc": (), "msg": str(e)}]
        option = {"format": "--format", "fields": "--field"}
        problems = "; ".join(f"{option.get(str(err['loc'][0]), err['loc'][0]) if err['loc'] else '--data'}: "
                             f"{err['msg'].removeprefix('Value error, ')}" for err in errors)
        raise DataError(f"--data {data}: {problems}.") from None


def _guess_format(path: str) -> str:
    """The format whose fields the first record has (preference, feedback, chat, alpaca, completion, text)."""
    from finetune.data import read_rows

    rows, _ = read_rows(path)
    first = rows[0][1] if rows and isinstance(rows[0][1], dict) else {}
    for fmt, key in (("preference", "chosen"), ("feedback", "label"), ("chat", "messages"), ("alpaca", "instruction"),
                     ("completion", "prompt"), ("text", "text")):
        if key in first:
            return fmt
    raise DataError(f"{path}: cannot tell the data format from the fields {sorted(first)}; pass --format.")


# ---------------------------------------------------------------- report


@dataclass
class EvalReport:
    data: str
    examples: int
    generated: int
    generation: dict | None
    models: dict[str, dict] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)  # one per (model, generated example)

    def to_json(self) -> dict:
        """The --json document (schema `finetune.eval/1`); samples go to --samples instead."""
        return {"schema": SCHEMA, "data": self.data, "examples": self.examples, "generated": self.generated,
                "generation": self.generation, "models": self.models}


def evaluate(
    recipe: Recipe | None = None,
    *,
    model: str | None = None,
    adapters: list[str] | tuple = (),
    compare: bool = False,
    data: str | None = None,
    data_format: str | None = None,
    fields: dict[str, str] | None = None,
    quantize: str = "auto",
    limit: int | None = None,
    generate_n: int = 0,
    options: GenerationOptions | None = None,
    harness: list[str] | None = None,
    harness_include: str | None = None,
) -> EvalReport:
    """Evaluate `model` (default: the recipe's) with each adapter, and the base too with `compare`."""
    options = options or GenerationOptions()
    make_extractor(options.extractor)  # a bad pattern fails before any model loads
    adapters = [str(a) for a in adapters]
    head = "score" if recipe and recipe.training.objective == "reward" else "lm"  # a reward model's adapter
    for path in adapters:
        check_adapter_dir(path, head=head)
    if recipe is None and model is None:
        raise ModelError("Which model? Give a recipe or --model (a hub id, a directory or a .gguf file).")
    source = model or recipe.model.name_or_path
    section = recipe.model.model_copy(update={"name_or_path": source}) if recipe else ModelSection(name_or_path=source)
    quant = eval_quantization(quantize, recipe, source, adapters)
    run = _inputs(recipe, eval_data(recipe, data, data_format, fields), data, adapters[0] if adapters else source,
                  limit, generate_n, options)
    run.harness, run.harness_include, run.limit = harness, harness_include, limit
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if compare and model and not adapters and recipe and source != recipe.model.name_or_path:
        base_quant = eval_quantization("auto", recipe, recipe.model.name_or_path, [])
        base = load_eval_model(recipe.model, base_quant, device, head=run.objective.head).eval()
        _measure(run, Candidate("base", recipe.model.name_or_path, None, _describe(base_quant)), base)
        del base
    net = load_eval_model(section, quant, device, head=run.objective.head).eval()  # reward models: a score head
    if not adapters:
        _measure(run, Candidate("model" if model else "base", source, None, _describe(quant)), net)
        return run.report
    net = compute_like_training(load_adapters(net, adapters).eval(), resolve_compute_dtype(quant.compute_dtype))
    if compare:
        with net.disable_adapter():
            _measure(run, Candidate("base", source, None, _describe(quant)), net)
    for i, (label, path) in enumerate(zip(adapter_labels(adapters), adapters)):
        net.set_adapter(f"a{i}")
        _measure(run, Candidate(label, source, path, _describe(quant)), net)
    return run.report


@dataclass
class _EvalRun:
    """What every candidate is measured on: the tokenizer, the loss data, the prompts to generate for."""

    tok: object
    loader: DataLoader
    objective: object  # objectives: SFT, or the preference objective of the pairs / feedback (`_objective`)
    to_generate: list
    options: GenerationOptions
    report: EvalReport
    harness: list[str] | None = None
    harness_include: str | None = None
    limit: int | None = None


def _inputs(recipe, data_section: DataSection, data: str | None, tokenizer_source: str, limit, generate_n,
            options: GenerationOptions) -> _EvalRun:
    from finetune.data import Feedback, FeedbackCollator, PairCollator, Pairs

    records = split_records(data_section, recipe.training.seed if recipe else 42)[1]
    if not records:
        raise DataError("Nothing to evaluate on: the recipe has neither data.eval nor data.eval_fraction. "
                        "Add one (or override it, e.g. data.eval=path/to/eval.jsonl), or pass --data FILE.")
    records = records[:limit] if limit else records
    tok = load_tokenizer(tokenizer_source, data_section.chat_template)  # also a .gguf
    examples, _ = tokenize_all(records, data_section, tok)
    batch_size = recipe.training.micro_batch_size if recipe else options.batch_size
    shapes = {r.fmt for r in records}
    pairs, feedback = shapes == {"preference"}, shapes == {"feedback"}  # the objective's metrics, not a token loss
    collate = PairCollator(Collator(tok.pad_token_id)) if pairs else Collator(tok.pad_token_id)
    collate = FeedbackCollator(collate) if feedback else collate
    dataset = Pairs(examples) if pairs else Feedback(examples, data_section.max_length) if feedback else examples
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    with_prompt = [r for r in records if r.fmt in ("alpaca", "chat", "completion")]  # text has no prompt/response
    to_generate = with_prompt[: len(with_prompt) if generate_n < 0 else generate_n]
    report = EvalReport(
        data=str(data or data_section.eval or f"{data_section.eval_fraction:.0%} held out of the training data"),
        examples=len(loader.dataset), generated=len(to_generate),
        generation={**asdict(options)} if to_generate else None,
    )
    return _EvalRun(tok, loader, _objective(recipe, pairs, feedback), to_generate, options, report)


def _objective(recipe, pairs: bool, feedback: bool):
    """The recipe's own objective on data it reads (DPO, ORPO, SimPO, reward model on pairs; KTO on feedback);
    else DPO on pairs, KTO on feedback, SFT's token loss on anything else."""
    from finetune.objectives import DPO, KTO, SFT, make_objective

    own = recipe.training.objective if recipe else None
    if (pairs and own in ("dpo", "orpo", "simpo", "reward")) or (feedback and own == "kto"):
        return make_objective(recipe)
    return DPO(recipe) if pairs else KTO(recipe) if feedback else SFT()


def _measure(run: _EvalRun, candidate: Candidate, net) -> None:
    """One row of the report: loss (or preference metrics), generation metrics, harness tasks."""
    started = time.perf_counter()
    out = _loss_with_progress(net, run.loader, candidate.label, run.objective)
    metrics = {"loss": out["loss"]}
    if run.objective.unit == "token":
        metrics["perplexity"] = math.exp(min(out["loss"], 50))
    metrics.update({k: v for k, v in out.items() if k != "loss"})
    seconds = {"loss": round(time.perf_counter() - started, 2)}
    if run.to_generate:
        started = time.perf_counter()
        gen_metrics, samples = _generation_with_progress(net, run.tok, run.to_generate, run.options, candidate.label)
        metrics.update(gen_metrics)
        seconds["generate"] = round(time.perf_counter() - started, 2)
        run.report.samples += [{"model": candidate.label, "index": i, **s} for i, s in enumerate(samples)]
    if run.harness:
        started = time.perf_counter()
        metrics.update(run_harness(net, run.tok, run.harness, limit=run.limit, include=run.harness_include,
                                   batch_size=run.options.batch_size))
        seconds["harness"] = round(time.perf_counter() - started, 2)
    run.report.models[candidate.label] = {**asdict(candidate), "metrics": metrics, "seconds": seconds}


def _loss_with_progress(net, loader, label: str, objective=None) -> dict[str, float]:
    with track(f"loss ({label})", total=len(loader), unit="batches") as task:  # on stderr
        return eval_objective(net, loader, objective, on_batch=task.advance)


def _generation_with_progress(net, tok, records, options, label: str) -> tuple[dict, list[dict]]:
    with track(f"generate ({label})", total=len(records), unit="examples") as task:  # examples, tokens/s, ETA
        return generation_metrics(net, tok, records, options, on_chunk=task.advance)


# --------------------------------------------------------------- harness


def run_harness(model, tok, tasks: list[str], *, limit: int | None = None, include: str | None = None,
                batch_size: int = 8) -> dict[str, float]:
    """Run lm-evaluation-harness tasks on the in-memory model (adapter active, nothing merged).

    Returns `task/metric` -> value for every numeric metric (standard errors left out).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ModelError("--harness needs lm-evaluation-harness: pip install 'finetune[harness]'.") from None
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    manager = TaskManager(include_path=include) if include else TaskManager()
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager)
    except (KeyError, ValueError) as e:
        raise DataError(f"lm-eval could not run {', '.join(tasks)}: {first_line(e)}") from None
    out = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key:
                out[f"{task}/{key.removesuffix(',none')}"] = float(value)
    return out


# ---------------------------------------------------------------- output


def write_report(report: EvalReport, path: str | Path) -> None:
    """The report as JSON, published whole (artifacts/atomic.py): an earlier report survives a failed write."""
    from finetune.artifacts import write_text_atomic

    write_text_atomic(Path(path), json.dumps(report.to_json(), indent=2) + "\n")


def write_samples(report: EvalReport, path: str | Path) -> None:
    """One JSON line per (model, example): prompt, reference, prediction, extracted answer, correct."""
    from finetune.artifacts import atomic_file

    with atomic_file(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for s in report.samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")


def write_outputs(report: EvalReport, console: Console, json_path: Path | None, samples_path: Path | None) -> None:
    """`eval --json` and `--samples`: each file written whole, then named on the console."""
    if json_path:
        write_report(report, json_path)
        console.print(f"wrote {json_path}")
    if samples_path:
        write_samples(report, samples_path)
        console.print(f"wrote {len(report.samples)} samples to {samples_path}")
