"""`finetune prepare`: tokenize a recipe's data (into the cache training reuses) and show what it became.

Only the tokenizer is loaded, never the model weights, so this answers in seconds
and is the place to check a recipe's data before paying for training: how long
the examples are (to choose max_length), how many were truncated, dropped or
skipped as bad records, how much compute padding would waste and how well
packing fills its rows. `--show N` prints rendered examples with the tokens
the loss is computed on highlighted and special tokens visible.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from finetune.data import IGNORE, DataStats, PreparedData, cache_dir, pack, padding_efficiency, prepare_data
from finetune.progress import track
from finetune.recipe import Recipe

TRAINED = "bold black on green"
SPECIAL = "bold magenta"


@dataclass
class PrepareReport:
    recipe: Recipe
    data: PreparedData
    packed_rows: int  # train rows when packed into max_length
    packing_efficiency: float  # real tokens / (packed rows x max_length)
    padding_unpacked: float  # real / computed tokens in random batches of micro_batch_size, unpacked
    padding_packed: float  # the same for packed rows
    seconds: float
    tokenizer: object


def prepare(recipe: Recipe) -> PrepareReport:
    """Tokenize (or load from the cache) the recipe's train and eval data, and measure padding and packing."""
    from finetune.model import load_tokenizer

    started = time.perf_counter()
    tok = load_tokenizer(recipe.model, recipe.data.chat_template)
    with track("read + tokenize data"):  # elapsed time only, for now: data/ has no per-record hook yet
        data = prepare_data(recipe.data, tok, recipe.training.seed, cache_dir(recipe.run_dir))
    rows = [len(r["input_ids"]) for r in pack(data.train, recipe.data.max_length)]
    lengths = [len(ex["input_ids"]) for ex in data.train]
    mbs, seed = recipe.training.micro_batch_size, recipe.training.seed
    return PrepareReport(
        recipe=recipe, data=data, packed_rows=len(rows),
        packing_efficiency=sum(rows) / max(len(rows) * recipe.data.max_length, 1),
        padding_unpacked=padding_efficiency(lengths, mbs, seed), padding_packed=padding_efficiency(rows, mbs, seed),
        seconds=time.perf_counter() - started, tokenizer=tok,
    )


def print_summary(report: PrepareReport, console: Console) -> None:
    d, data = report.recipe.data, report.data
    if len(data.stats.sources) > 1 or data.stats.skipped:
        sources = Table(title="sources")
        for c in ("source", "format", "records", "bad (skipped)", "train", "eval"):
            sources.add_column(c, justify="left" if c in ("source", "format") else "right")
        for s in data.stats.sources:
            sources.add_row(s["source"], s["format"], *(f"{s[k]:,}" for k in ("records", "skipped", "train", "eval")))
        console.print(sources)
    table = Table(title=f"data of {report.recipe.name} (max_length {d.max_length}, train_on {d.train_on})")
    table.add_column("", no_wrap=True)
    table.add_column("train", justify="right", no_wrap=True)
    table.add_column("eval", justify="right", no_wrap=True)
    for label, fn in _ROWS:
        table.add_row(label, fn(data.stats, d), fn(data.eval_stats, d) if data.eval else "-")
    mbs = report.recipe.training.micro_batch_size
    table.add_row(f"padding efficiency unpacked (mbs {mbs})", f"{report.padding_unpacked:.1%}", "")
    table.add_row(f"packed rows (<= {d.max_length} tokens)", f"{report.packed_rows:,}", "")
    table.add_row("packing efficiency (row fill)", f"{report.packing_efficiency:.1%}", "")
    table.add_row(f"padding efficiency packed (mbs {mbs})", f"{report.padding_packed:.1%}", "")
    console.print(table)
    if data.stats.bad:
        console.print(f"[yellow]skipped {data.stats.skipped} bad record(s)[/], the first of them:", highlight=False)
        for line in data.stats.bad:
            console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    cache = "reused" if data.cache_hit else "written to"
    console.print(
        f"packing is [bold]{'on' if d.packing else 'off'}[/]; tokenized data {cache} {data.cache_path} "
        f"({report.seconds:.1f}s)", highlight=False, soft_wrap=True,
    )


def _length(q: float | None):
    """Token length percentile q of the examples before truncation (None: the longest)."""

    def cell(s: DataStats, _) -> str:
        if not s.lengths:
            return "-"
        return f"{max(s.lengths):,}" if q is None else f"{np.percentile(s.lengths, q):,.0f}"

    return cell


_ROWS = [
    ("examples", lambda s, d: f"{s.examples:,}"),
    ("tokens", lambda s, d: f"{s.tokens:,}"),
    ("trained tokens (loss)", lambda s, d: f"{s.label_tokens:,}"),
    ("length p50", _length(50)),
    ("length p90", _length(90)),
    ("length p99", _length(99)),
    ("length max", _length(None)),
    ("truncated to max_length", lambda s, d: f"{s.truncated:,}"),
    ("dropped (too long / no response)", lambda s, d: f"{s.dropped:,}"),
    ("bad records skipped", lambda s, d: f"{s.skipped:,}"),
]


def render_example(example: dict, tok, marks: bool = False) -> Text:
    """The example's text with trained tokens highlighted and special tokens in their own colour.

    With `marks` (for output without colour), trained spans are also wrapped in ⟦ ⟧.
    """
    special = set(tok.all_special_ids)
    out = Text()
    tokens = zip(example["input_ids"], example["labels"])
    for trained, span in itertools.groupby(tokens, key=lambda t: t[1] != IGNORE):
        out.append("⟦" if trained and marks else "")
        for is_special, run in itertools.groupby((i for i, _ in span), key=lambda i: i in special):
            piece = tok.decode(list(run), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            style = " ".join(s for s, on in ((TRAINED, trained), (SPECIAL, is_special)) if on)
            out.append(piece, style=style or None)
        out.append("⟧" if trained and marks else "")
    return out


def print_examples(report: PrepareReport, console: Console, n: int) -> None:
    marks = console.color_system is None
    legend = Text.assemble(("trained tokens", TRAINED), "  ", ("special tokens", SPECIAL),
                           "  (trained spans marked ⟦ ⟧)" if marks else "")
    console.print(legend)
    for i, ex in enumerate(report.data.train[:n]):
        trained = sum(lab != IGNORE for lab in ex["labels"])
        console.rule(f"example {i + 1}: {ex.get('source', '')} ({len(ex['input_ids'])} tokens, {trained} trained)")
        console.print(render_example(ex, report.tokenizer, marks), highlight=False, markup=False)
