"""Command-line verbs. Each parses its arguments, calls one function and prints.

This is the one place that turns errors into exit codes: a `FinetuneError` is
printed as its message (exit 2 for bad input), with no traceback unless --debug.
Heavy libraries are imported inside the commands, so recipe errors answer fast.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from finetune.errors import FinetuneError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Fine-tune causal language models with QLoRA from YAML recipes.",
)
console = Console()
err_console = Console(stderr=True)
_debug = {"on": bool(os.environ.get("FINETUNE_DEBUG"))}

RecipeArg = typer.Argument(..., help="Recipe YAML file.", show_default=False)
OverridesArg = typer.Argument(None, help="Recipe overrides, e.g. training.max_steps=10 data.max_length=256.")


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
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        if _debug["on"]:
            raise
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None


def _quiet_libraries() -> None:
    import warnings

    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # e.g. optional CPU kernels it cannot fetch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")


def _load(recipe: Path, overrides: Optional[list[str]]):
    from finetune.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


@app.command()
def validate(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Check a recipe (schema, values, files) without loading any model."""
    r = _run(lambda: _load(recipe, overrides))
    console.print(f"[green]ok[/]: {recipe} is a valid recipe (run directory {r.run_dir}).")


@app.command()
def train(
    recipe: Path = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in the same directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the run directory."),
    resume_from: Optional[Path] = typer.Option(None, help="Continue from this checkpoint directory."),
) -> None:
    """Fine-tune the recipe's model with LoRA adapters; writes checkpoints under the run directory."""
    r = _run(lambda: _load(recipe, overrides))
    _quiet_libraries()
    from finetune.train import train as run_training

    start = str(resume_from) if resume_from else ("latest" if resume else None)
    _run(lambda: run_training(r, overwrite=overwrite, resume=start, console=err_console))


class BaseWeights(str, Enum):
    auto = "auto"
    dequantized = "dequantized"
    original = "original"


class SaveDtype(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


@app.command()
def merge(
    adapter: Path = typer.Argument(..., help="Adapter checkpoint directory (e.g. runs/x/checkpoint-final)."),
    out: Path = typer.Option(..., "--out", help="Directory for the merged model."),
    base: Optional[str] = typer.Option(None, help="Base model (default: the one named in the adapter)."),
    base_weights: BaseWeights = typer.Option(
        BaseWeights.auto, help="dequantized: merge into the NF4-dequantized weights the adapter was trained on; "
        "original: into the full-precision weights. auto: dequantized for 4-bit adapters."
    ),
    dtype: SaveDtype = typer.Option(SaveDtype.auto, help="Saved dtype: auto (the base's), bfloat16, float16, float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
) -> None:
    """Fold an adapter into its base model and save a standalone model (safetensors)."""
    _quiet_libraries()
    from finetune.merge import merge as run_merge

    rep = _run(lambda: run_merge(adapter, out, base=base, base_weights=base_weights.value, dtype=dtype.value, overwrite=overwrite))
    console.print(
        f"merged {adapter} into {rep.base} ({rep.base_weights} base weights), saved {rep.dtype} to [bold]{rep.out}[/]\n"
        f"merge fidelity vs base+adapter as trained: max |dlogit| {rep.max_abs_logit_diff:.3g}, "
        f"mean {rep.mean_abs_logit_diff:.3g}"
    )


@app.command("eval")
def eval_(
    recipe: Path = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    adapter: Optional[Path] = typer.Option(None, help="Adapter checkpoint to evaluate on top of the base."),
    model: Optional[str] = typer.Option(None, help="Evaluate this model (e.g. a merged directory) instead."),
    compare: bool = typer.Option(False, "--compare", help="Also evaluate the recipe's base model, side by side."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the numbers (and samples) to this file."),
    generate: int = typer.Option(0, "--generate", min=0, help="Generate this many sample completions."),
    max_new_tokens: int = typer.Option(128, min=1, help="Length limit for generated completions."),
) -> None:
    """Loss, perplexity (and exact match of generations) on the recipe's eval data."""
    r = _run(lambda: _load(recipe, overrides))
    _quiet_libraries()
    from finetune.evaluate import evaluate, print_report, write_report

    rep = _run(lambda: evaluate(r, adapter=adapter and str(adapter), model_path=model, compare=compare,
                                generate_n=generate, max_new_tokens=max_new_tokens))
    print_report(rep, console)
    if json_out:
        write_report(rep, json_out)
        console.print(f"wrote {json_out}")
