"""What `finetune eval` prints: a few samples (the end of each prompt, the reference, every model's answer side by
side), then the models x metrics table.

Prompts, references and answers are printed as plain text, never as rich markup: a Llama 2 / Mistral prompt holds
`[/INST]`, which rich would read as a closing tag and fail on after the whole evaluation had run.
"""

from __future__ import annotations

import re

from rich.console import Console
from rich.table import Table
from rich.text import Text

_ORDER = ["loss", "perplexity", "exact_match", "contains", "chrf", "bleu"]
PROMPT_CHARS = 300  # the end of a prompt shown above each sample: the turn the answer follows
# Chat-template markers a cut must not split: <|im_start|>, <|eot_id|>, <s>, </s>, <end_of_turn>, [INST], <<SYS>>.
SPECIAL = re.compile(r"<\|[^<>|\s]{1,48}\|>|<</?SYS>>|</?[A-Za-z][\w.-]{0,31}>|\[/?[A-Z]{2,12}\]")


def prompt_tail(text: str, limit: int = PROMPT_CHARS) -> str:
    """The last ~`limit` characters of a prompt, starting at a boundary, after a marker saying how much is left out.

    The cut is never inside a special token (it moves back to the token's start, showing it whole); within the first
    quarter of the window it moves forward to the first line start or special token, else to the first space."""
    if len(text) <= limit:
        return text
    start = len(text) - limit
    tokens = [(m.start(), m.end()) for m in SPECIAL.finditer(text)]
    start = next((a for a, b in tokens if a < start < b), start)
    inside = {i for a, b in tokens for i in range(a + 1, b)}
    window = range(start, min(len(text), start + limit // 4))
    token_starts = {a for a, _ in tokens}
    better = next((i for i in window if text[i - 1] == "\n" or i in token_starts), None)
    if better is None:
        better = next((i for i in window if text[i - 1].isspace() and i not in inside), start)
    return text if better == 0 else f"[… {better} characters before] {text[better:]}"


def print_report(report, console: Console, show_samples: int = 3) -> None:
    """A few samples (every model's answer side by side), then the models x metrics table (`EvalReport`)."""
    by_index: dict[int, list[dict]] = {}
    for s in report.samples:
        by_index.setdefault(s["index"], []).append(s)
    for i in sorted(by_index)[:show_samples]:
        first = by_index[i][0]
        console.rule(f"sample {i + 1}")
        console.print(Text(prompt_tail(first["prompt"]), style="dim"))
        console.print(Text.assemble(("reference:", "bold"), " ", first["reference"]))
        for s in by_index[i]:
            mark = ("✓", "green") if s["correct"] else ("✗", "red")
            console.print(Text.assemble((f"{s['model']}:", "bold"), " ", mark, " ", s["prediction"]))
    generated = f", {report.generated} generated" if report.generated else ""
    table = Table(title=Text(f"eval on {report.data} ({report.examples} examples{generated})"))
    table.add_column("model")
    names = {k for m in report.models.values() for k in m["metrics"]}
    columns = sorted(names, key=lambda c: (_ORDER.index(c) if c in _ORDER else len(_ORDER), c))
    for c in columns:
        table.add_column(c, justify="right")
    for label, entry in report.models.items():
        m = entry["metrics"]
        table.add_row(Text(label), *(f"{m[c]:.4f}" if c in m else "-" for c in columns))
    console.print(table)
