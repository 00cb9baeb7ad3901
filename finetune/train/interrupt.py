"""Stopping on SIGINT/SIGTERM: after the current step, on every process, with a checkpoint (train.py).

The first signal is remembered and the loop stops after the step it interrupted, on all
processes at once (`agreed_signal`); the second stops at once, leaving the last complete
checkpoint intact (checkpoints are written atomically).
"""

from __future__ import annotations

import signal

import torch
from accelerate import Accelerator


def agreed_signal(accelerator: Accelerator, signum: int) -> int:
    """The signal any process received, so that all stop after the same step (a launcher may signal only some;
    a process that stopped alone would leave the others waiting in the next collective forever)."""
    if accelerator.num_processes == 1:
        return signum
    return int(accelerator.reduce(torch.tensor(signum, device=accelerator.device), "max"))


class StopOnSignal:
    """First SIGINT/SIGTERM: remember it (the loop checkpoints and stops after the current step).
    Second: stop at once; checkpoints are written atomically, so the last complete one stays intact."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
