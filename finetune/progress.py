"""Progress for every command that takes time: one helper, on stderr, so results on stdout stay clean.

    with track("generate", total=len(prompts), unit="examples") as task:
        for chunk in chunks:
            ...
            task.advance(len(chunk), tokens=generated)   # extra counters are shown as rates

On a terminal it is a rich progress bar (done/total, rate, extra rates, elapsed, ETA). Without one (CI,
`| tee`, a log file) it prints a plain line when the task starts, then every FINETUNE_PROGRESS_INTERVAL
seconds (default 5) from a background thread, so even one long step shows it is alive, and a last line
at the end. Only one live rich display may exist at a time: a task started while another is shown
(e.g. inside training's progress bar) prints nothing. Under torchrun only rank 0 reports.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_active = threading.local()


def _interval() -> float:
    try:
        return max(float(os.environ.get("FINETUNE_PROGRESS_INTERVAL", "5")), 0.05)
    except ValueError:
        return 5.0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _amount(name: str, value: float) -> str:
    if name == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    return f"{value:,.0f} {name}"


class Task:
    """Counts of one task; `advance` is all callers use. Thread-safe enough for a reader thread."""

    def __init__(self, description: str, total: int | None, unit: str):
        self.description, self.total, self.unit = description, total, unit
        self.done = 0
        self.counts: dict[str, float] = {}
        self.started = time.perf_counter()
        self._bar: tuple[Progress, int] | None = None

    def advance(self, n: int = 1, **counts: float) -> None:
        self.done += n
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        if self._bar:
            bar, task_id = self._bar
            bar.update(task_id, advance=n, rates=self.rates())

    def set_total(self, total: int) -> None:
        """For work whose size is known only once it starts (e.g. records read before tokenizing)."""
        self.total = total
        if self._bar:
            bar, task_id = self._bar
            bar.update(task_id, total=total)

    def rates(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done / elapsed
        parts = [f"{rate:,.2f} {self.unit}/s" if rate < 10 else f"{rate:,.0f} {self.unit}/s"] if self.done else []
        for k, v in self.counts.items():
            parts.append(f"{_amount(k, v)}, {_amount(k, v / elapsed)}/s")
        return ", ".join(parts)

    def line(self, final: bool = False) -> str:
        """The plain-text report: `generate: 12/40 examples (30%), 1.20 examples/s, ..., elapsed, eta`."""
        elapsed = time.perf_counter() - self.started
        done = f"{self.done:,}/{self.total:,}" if self.total is not None else f"{self.done:,}"
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        eta = ""
        if self.total and self.done and not final:
            eta = f", eta {_clock(elapsed / self.done * (self.total - self.done))}"
        parts = [f"{done} {self.unit}{pct}"] if self.unit else []  # no unit: elapsed time only
        parts += [self.rates()] if self.rates() else []
        parts.append(f"elapsed {_clock(elapsed)}{eta}{' (done)' if final else ''}")
        return f"{self.description}: {', '.join(parts)}"


@contextlib.contextmanager
def track(description: str, total: int | None = None, unit: str = "", console: Console | None = None) -> Iterator[Task]:
    """Report a task's progress on stderr while the block runs (see the module docstring)."""
    task = Task(description, total, unit)
    console = console or Console(stderr=True)
    if getattr(_active, "on", False) or os.environ.get("RANK", "0") != "0" or console.is_jupyter:
        yield task  # nested in another display, or not the main process: count silently
        return
    _active.on = True
    try:
        if console.is_terminal:
            with _bar(task, console):
                yield task
        else:
            with _lines(task, console.file):
                yield task
    finally:
        _active.on = False


@contextlib.contextmanager
def _bar(task: Task, console: Console) -> Iterator[None]:
    counts = [MofNCompleteColumn(), TextColumn(task.unit)] if task.unit else []
    columns = [TextColumn(f"[bold]{task.description}"), BarColumn(), *counts, TextColumn("{task.fields[rates]}"),
               TimeElapsedColumn(), *([TextColumn("eta"), TimeRemainingColumn()] if task.total else [])]
    with Progress(*columns, console=console, transient=False) as bar:
        task._bar = (bar, bar.add_task(task.description, total=task.total, rates=""))
        yield


@contextlib.contextmanager
def _lines(task: Task, stream) -> Iterator[None]:
    stop = threading.Event()

    def report(final: bool = False) -> None:
        try:
            print(task.line(final), file=stream or sys.stderr, flush=True)
        except (OSError, ValueError):  # a closed pipe must not break the command
            pass

    def ticker() -> None:
        while not stop.wait(_interval()):
            report()

    report()
    thread = threading.Thread(target=ticker, daemon=True, name=f"progress-{task.description}")
    thread.start()
    try:
        yield
        stop.set()
        thread.join()
        report(final=True)
    finally:
        stop.set()


def quiet_libraries() -> None:
    """Silence what libraries print besides our own output (progress bars, warnings that add nothing here)."""
    import logging
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader draws a bar of its own (not via logging)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # e.g. optional CPU kernels it cannot fetch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    # bitsandbytes falls back to plain AdamW on CPU; training states the device, the warning adds nothing.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
