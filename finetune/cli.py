"""Command-line verbs. Each parses its arguments, calls one function and prints.

This is the one place that turns errors into exit codes: a `FinetuneError` is
printed as its message (exit 2 for bad input), with no traceback unless --debug.
Heavy libraries are imported inside the commands, so recipe errors answer fast.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from pathlib import Path
from typing import Callable, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape

from finetune.errors import FinetuneError
from finetune.progress import quiet_libraries

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Fine-tune causal language models with QLoRA from YAML recipes.",
)
console = Console()
err_console = Console(stderr=True)
_debug = {"on": bool(os.environ.get("FINETUNE_DEBUG"))}

RecipeArg = typer.Argument(..., help="Recipe YAML file.", show_default=False)
# The choices of options (shown in --help; anything else is refused with exit 2).
BaseWeights = Literal["auto", "dequantized", "original"]
SaveDtype = Literal["auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]
Combination = Literal["linear", "cat", "ties"]
Quantize = Literal["auto", "4bit", "none"]
GgufType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_1"]
NUMBER = re.compile(r"[-+]?((\d+\.?\d*|\.\d+)(e[-+]?\d+)?|nan|inf(inity)?)", re.I)  # --weights (nan: refused by merge)
OverridesArg = typer.Argument(None, help="Recipe overrides, e.g. training.max_steps=10 data.max_length=256.")


def main() -> None:
    """The console command (and `python -m finetune`); on CPU, allocator.VERBS re-execute under tcmalloc."""
    from finetune.model import maybe_reexec

    try:
        maybe_reexec()
    except FinetuneError as e:
        _print_error(e)
        raise SystemExit(e.exit_code) from None
    app(prog_name="finetune")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full Python tracebacks on errors.")) -> None:
    _debug["on"] = _debug["on"] or debug


def _run(fn: Callable):
    """Call fn; print a FinetuneError as one paragraph and exit with its code."""
    try:
        return fn()
    except FinetuneError as e:
        if _debug["on"]:
            raise
        _print_error(e)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        if _debug["on"]:
            raise
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None
    except OSError as e:  # a path typed on the command line that the file system refuses outright
        if _debug["on"] or e.errno != errno.ENAMETOOLONG:
            raise
        _print_error(FinetuneError(f"{e.filename}: {e.strerror}; file names take at most 255 bytes."))
        raise typer.Exit(2) from None


def _print_error(e: FinetuneError) -> None:
    """One paragraph; "[x]" in it is text, not markup, and a lone surrogate (undecodable argv bytes) is escaped."""
    text = str(e).encode("utf-8", "backslashreplace").decode("utf-8")
    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _holding(paths: list, what: str):
    """Hold the locks of the outputs a command writes (lock.py) for the whole command; refused: exit 2."""
    from finetune.artifacts import hold_all

    with contextlib.ExitStack() as stack:
        _run(lambda: stack.enter_context(hold_all(paths, what)))
        yield


def _pairs(items: Optional[list[str]], option: str, expected: str) -> dict[str, str]:
    """Repeated KEY=VALUE options as a dict; anything else is a usage error (exit 2)."""
    if bad := [i for i in items or [] if "=" not in i]:
        raise typer.BadParameter(f"expected {expected}, got '{bad[0]}'", param_hint=option)
    return dict(i.split("=", 1) for i in items or [])


def _load(recipe: Path, overrides: Optional[list[str]]):
    from finetune.recipe import load_recipe
    return load_recipe(recipe, overrides or [])


@app.command()
def validate(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Check a recipe (schema, values, files, the model's architecture) without loading any model."""
    from finetune.export import check_architecture
    from finetune.recipe import remote_code_warning

    r = _run(lambda: _load(recipe, overrides))
    _run(lambda: check_architecture(r.model.name_or_path))
    if warning := remote_code_warning(r):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    console.print(f"[green]ok[/]: {escape(ascii(str(recipe))[1:-1])} is a valid recipe (run directory "
                  f"{escape(str(r.run_dir))}).")


@app.command()
def plan(
    recipe: Path = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    device_memory: Optional[str] = typer.Option(
        None, "--device-memory", help="Memory to plan against, e.g. 24GiB (default: the GPU's, else available RAM)."
    ),
) -> None:
    """Predict peak training memory term by term (model built on the meta device, no weights loaded)."""
    r = _run(lambda: _load(recipe, overrides))
    quiet_libraries()
    from finetune.plan import parse_size, plan as make_plan, print_plan

    limit = _run(lambda: parse_size(device_memory)) if device_memory else None
    print_plan(_run(lambda: make_plan(r, device_memory=limit)), console)


@app.command()
def prepare(
    recipe: Path = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    show: int = typer.Option(0, "--show", min=0, help="Print N rendered training examples, trained tokens marked."),
) -> None:
    """Tokenize the recipe's data (cached for training) and summarise it, without loading the model weights."""
    r = _run(lambda: _load(recipe, overrides))
    quiet_libraries()
    from finetune.plan import prepare as run_prepare, print_examples, print_summary

    report = _run(lambda: run_prepare(r))
    print_summary(report, console)
    if show:
        print_examples(report, console, show)


@app.command()
def train(
    recipe: Path = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in the same directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the run directory."),
    resume_from: Optional[Path] = typer.Option(None, help="Continue from this checkpoint directory."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train on N processes (one per GPU; gloo on CPU) "
                              "through accelerate's launcher. Under accelerate launch / torchrun, leave it at 1."),
) -> None:
    """Fine-tune the recipe's model with LoRA adapters; writes checkpoints under the run directory."""
    r = _run(lambda: _load(recipe, overrides))
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        from finetune.train import launch

        argv = ["train", str(recipe), *(overrides or []), *(["--overwrite"] if overwrite else []),
                *(["--resume"] if resume else []), *(["--resume-from", str(resume_from)] if resume_from else [])]
        raise typer.Exit(launch(nproc, (["--debug"] if _debug["on"] else []) + argv))
    quiet_libraries()
    from finetune.train import train as run_training
    start = str(resume_from) if resume_from else ("latest" if resume else None)
    _run(lambda: run_training(r, overwrite=overwrite, resume=start, console=err_console))


def _split_weights(adapters: list[str], weights: Optional[list[str]]) -> tuple[list[str], Optional[list[float]]]:
    """Accept `--weights 0.7 0.3` (the values after the first land among the positional arguments),
    `--weights 0.7,0.3` and `--weights 0.7 --weights 0.3`. A number that names an existing path stays an adapter."""
    if weights is None:
        return adapters, None
    number = lambda s: NUMBER.fullmatch(s) and not Path(s).exists()  # noqa: E731
    values = [w for item in weights for w in item.split(",") if w.strip()] + [a for a in adapters if number(a)]
    try:
        return [a for a in adapters if not number(a)], [float(w) for w in values]
    except ValueError:
        raise typer.BadParameter(f"takes numbers, got {' '.join(weights)}", param_hint="--weights") from None


@app.command()
def merge(
    adapters: list[str] = typer.Argument(..., help="Adapter checkpoint directory (e.g. runs/x/checkpoint-final); "
                                                  "several are combined with --weights."),
    out: Path = typer.Option(..., "--out", help="Directory for the merged model."),
    base: Optional[str] = typer.Option(None, help="Base model (default: the one the adapter was trained on)."),
    base_weights: BaseWeights = typer.Option(
        "auto", help="dequantized: merge into the NF4-dequantized weights the adapter was trained on; "
        "original: into the full-precision weights. auto: dequantized for 4-bit adapters."
    ),
    dtype: SaveDtype = typer.Option("auto", help="Saved dtype: auto (the base's), bf16, fp16, fp32."),
    weights: Optional[list[str]] = typer.Option(None, "--weights", help="One weight per adapter: --weights 0.7 0.3."),
    combination: Combination = typer.Option(
        "linear", help="How PEFT combines several adapters: linear (equal ranks), cat (exact, rank = sum), "
        "ties (equal ranks, uses --density)."
    ),
    density: float = typer.Option(0.5, min=0.0, max=1.0, help="ties: share of each adapter's delta kept."),
    max_shard_size: str = typer.Option("5GB", help="Split the safetensors weights into shards of at most this size."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Also upload to this Hub repo (org/name)."),
) -> None:
    """Fold adapters into their base model and save a standalone model (safetensors) with a fidelity report."""
    adapter_dirs, weight_values = _run(lambda: _split_weights(adapters, weights))
    quiet_libraries()
    from finetune.merge import merge as run_merge, print_merge_report

    with _holding([out], "finetune merge --out"):
        rep = _run(lambda: run_merge(adapter_dirs, out, base=base, base_weights=base_weights, dtype=dtype,
                                     weights=weight_values, combination=combination, density=density,
                                     max_shard_size=max_shard_size, overwrite=overwrite, push_to_hub=push_to_hub))
    print_merge_report(rep, console)


@app.command("eval")
def eval_(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (its model and eval data); optional with "
                                                       "--model and --data.", show_default=False),
    overrides: Optional[list[str]] = OverridesArg,
    model: Optional[str] = typer.Option(None, help="Model to evaluate: hub id, directory (e.g. a merge) or .gguf "
                                                  "file. Default: the recipe's."),
    adapter: Optional[list[Path]] = typer.Option(None, "--adapter", help="Adapter on top of the model; repeat "
                                                 "to compare several."),
    compare: bool = typer.Option(False, "--compare", help="Also evaluate the base model, side by side."),
    data: Optional[str] = typer.Option(None, help="Evaluate on this file instead of the recipe's eval data."),
    data_format: Optional[str] = typer.Option(None, "--format", help="Format of --data (default: the recipe's, or "
                                              "guessed from the first record)."),
    field: Optional[list[str]] = typer.Option(None, "--field", help="Map a format field to a column of --data, "
                                              "e.g. --field prompt=question --field completion=answer."),
    quantize: Quantize = typer.Option("auto", help="auto: 4-bit as the adapter/recipe was trained (never "
                                      "for --model or GGUF); 4bit; none."),
    limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N eval examples."),
    generate: int = typer.Option(0, "--generate", min=-1, help="Generate for the first N examples and score "
                                 "exact_match/contains (-1: all)."),
    extract: str = typer.Option("none", help="Answer extractor for exact_match: none, last_number, regex:PATTERN."),
    max_new_tokens: int = typer.Option(128, min=1, help="Length limit for generated completions."),
    temperature: float = typer.Option(0.0, min=0.0, help="0: greedy; above 0: sampling at this temperature."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling (with --temperature > 0)."),
    batch_size: int = typer.Option(8, min=1, help="Prompts generated together (left-padded)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the numbers to this file (schema "
                                            "finetune.eval/1)."),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Write every generation to this JSONL file."),
    harness: Optional[list[str]] = typer.Option(None, "--harness", help="lm-eval tasks (comma-separated) on the "
                                                "in-memory model; needs finetune[harness]."),
    harness_include: Optional[Path] = typer.Option(None, help="Directory of custom lm-eval task YAML files."),
) -> None:
    """Loss, perplexity and generation metrics (exact match, contains, chrF/BLEU) for models and adapters."""
    r = _run(lambda: _load(recipe, overrides)) if recipe else None
    quiet_libraries()
    from finetune.evaluate import evaluate, print_report, write_outputs
    from finetune.generate import GenerationOptions

    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                batch_size=batch_size, seed=seed, extractor=extract)
    tasks = [t for item in harness or [] for t in item.split(",") if t.strip()]
    fields = _pairs(field, "--field", "FIELD=COLUMN") or None
    with _holding([json_out, samples], "finetune eval"):  # from the start: a refusal costs no evaluation
        rep = _run(lambda: evaluate(
            r, model=model, adapters=[str(a) for a in adapter or []], compare=compare, data=data,
            data_format=data_format, fields=fields,
            quantize=quantize, limit=limit, generate_n=generate, options=options, harness=tasks or None,
            harness_include=harness_include and str(harness_include),
        ))
        print_report(rep, console)
        write_outputs(rep, console, json_path=json_out, samples_path=samples)


@app.command()
def verify(path: Path = typer.Argument(..., help="A checkpoint directory, or a run directory (all its checkpoints).",
                                       show_default=False)) -> None:
    """Check checkpoints against their manifests (size, sha256 of every file): which are intact, which damaged."""
    from finetune.artifacts import check_report, print_verdicts, verify as run_verify

    report = _run(lambda: run_verify(path))
    print_verdicts(report, console)
    _run(lambda: check_report(report))


@app.command()
def export(
    source: Path = typer.Argument(..., help="A merged model directory or an adapter checkpoint (merged first).",
                                  show_default=False),
    out: Path = typer.Option(..., "--out", help="The GGUF file to write, e.g. merged/quickstart-q8_0.gguf."),
    type_: GgufType = typer.Option("f16", "--type", help="Tensor type of the weights (norms stay f32)."),
    base: Optional[str] = typer.Option(None, help="Adapter source: base model (default: the one it was trained on)."),
    base_weights: BaseWeights = typer.Option("auto", help="Adapter source: as for `finetune merge`."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="Write only the checkpoint's LoRA matrices, "
                                      "as a GGUF adapter for llama.cpp's --lora over an exported base."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Write a model as one GGUF file for llama.cpp / Ollama, with a logit check against the source."""
    quiet_libraries()
    from finetune.export import export as run_export, print_export_report
    with _holding([out], "finetune export"):
        rep = _run(lambda: run_export(source, out, type=type_, base=base, base_weights=base_weights,
                                      overwrite=overwrite, adapter_only=adapter_only, console=err_console))
    print_export_report(rep, console, adapter_only=adapter_only)


@app.command()
def chat(
    target: Optional[str] = typer.Argument(None, help="A recipe, an adapter checkpoint (e.g. "
                                           "runs/x/checkpoint-final), a model directory or a .gguf file.",
                                           show_default=False),
    overrides: Optional[list[str]] = OverridesArg,
    model: Optional[str] = typer.Option(None, help="Base model: hub id, directory or .gguf file (default: the "
                                        "recipe's or checkpoint's)."),
    adapter: Optional[list[Path]] = typer.Option(None, "--adapter", help="Adapter on top; repeat to load several "
                                                 "(switch with /adapter NAME)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Print one reply to this and exit (also: text on "
                                         "stdin when it is not a terminal)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(256, min=1, help="Length limit of a reply."),
    temperature: float = typer.Option(0.0, min=0.0, help="0: greedy (deterministic); above 0: sampling."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling (with --temperature > 0)."),
    seed: int = typer.Option(0, help="Sampling seed."),
) -> None:
    """Chat with a model, adapter checkpoint or GGUF file: interactive, or one reply with --prompt."""
    quiet_libraries()
    from finetune.generate import ChatOptions, chat as run_chat

    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
    options = ChatOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          system=system)
    answer = _run(lambda: run_chat(target, model=model, adapters=[str(a) for a in adapter or []],
                                   overrides=overrides, prompt=prompt, options=options, console=err_console))
    if answer is not None:
        sys.stdout.write(answer + "\n")


@app.command()
def sweep(
    recipe: Path = RecipeArg,
    items: Optional[list[str]] = typer.Argument(None, help="key=v1,v2 (an axis), key=value (every point), "
                                                "key=low:high[:int][:log] (a --search range)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="YAML file: keys to value lists, ranges or values."),
    search: Optional[int] = typer.Option(None, "--search", min=1, help="Sample N points with Optuna's TPE over "
                                         "the ranges and values, pruning hopeless ones (Optuna: the sweep extra)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an earlier sweep in the same directory."),
) -> None:
    """Train every point of a grid of overrides (or --search N), one run each, resumable; one table of results."""
    from finetune.sweep import check_sweep, print_sweep, sweep as run_sweep

    say = lambda message: err_console.print(f"[bold]sweep[/] {escape(message)}", highlight=False, soft_wrap=True)  # noqa: E731
    result = _run(lambda: run_sweep(recipe, items or [], grid_file=grid, search=search, overwrite=overwrite, say=say))
    print_sweep(result, console)
    _run(lambda: check_sweep(result))


@app.command()
def serve(
    model: str = typer.Argument(..., help="Base model directory or hub id, .gguf file, merged directory, recipe, or "
                                "adapter checkpoint (served as an adapter named after its run).", show_default=False),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="NAME=PATH: serve this adapter checkpoint "
                                                "as model NAME; repeat for more."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (anything but loopback exposes the server)."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: a free one, printed)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="FINETUNE_API_KEY", help="Require "
                                          "'Authorization: Bearer KEY' on every endpoint but /health."),
    quantize: Quantize = typer.Option("auto", help="auto: 4-bit as the adapters were trained; 4bit; none."),
    max_batch: int = typer.Option(16, min=1, help="Sequences decoded together in one forward pass."),
    max_queue: int = typer.Option(64, min=1, help="Requests waiting for the batch; more are answered 429."),
    max_tokens: int = typer.Option(1024, min=1, help="The largest max_tokens a request may ask for."),
) -> None:
    """Serve a base model and its adapters behind an OpenAI-compatible API (FastAPI + uvicorn: the serve extra)."""
    adapters = _pairs(adapter, "--adapter", "NAME=PATH")
    quiet_libraries()
    from finetune.serve import ServeOptions, serve as run_serve
    _run(lambda: run_serve(model, adapters=adapters, quantize=quantize, console=err_console, options=ServeOptions(
        host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue, max_tokens=max_tokens)))


@app.command()
def board(
    runs_dir: Path = typer.Argument(Path("runs"), help="The runs directory to show."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (the page can start processes: keep it local)."),
    port: int = typer.Option(7860, min=0, max=65535, help="Port to listen on."),
    recipes: Path = typer.Option(Path("recipes"), help="Directory of recipes the launch form offers."),
    no_token: bool = typer.Option(False, "--no-token", help="Ask no token (loopback hosts only)."),
) -> None:
    """A local web page: runs table, live curves, recipe diff, launch/stop/resume, chat with checkpoints."""
    from finetune.board import serve_board

    _run(lambda: serve_board(runs_dir, host=host, port=port, no_token=no_token, recipes_dir=recipes,
                             announce=lambda url: console.print(f"finetune board on {url}", soft_wrap=True)))
