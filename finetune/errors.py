"""Errors the user must read. Each carries a one-paragraph message and an exit code.

The CLI prints the message and exits with the code; anything that is not a
`FinetuneError` is a bug and keeps its traceback.
"""


class FinetuneError(Exception):
    """Base class: `str(err)` is the whole message shown to the user."""

    exit_code = 1


class RecipeError(FinetuneError):
    """The recipe (file or command-line override) is invalid."""

    exit_code = 2


class DataError(FinetuneError):
    """A data file is missing, unreadable or holds bad records."""

    exit_code = 2


class ModelError(FinetuneError):
    """The base model or adapter cannot be found or loaded."""

    exit_code = 2


class CheckpointError(FinetuneError):
    """A checkpoint or output directory cannot be read, resumed or written."""

    exit_code = 2


class NonFiniteLossError(FinetuneError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""

    exit_code = 3


class OutOfMemory(FinetuneError):
    """A training step ran out of device or host memory; the checkpoints already written are intact."""

    exit_code = 4


class SweepPointsFailed(FinetuneError):
    """Some points of `finetune sweep` failed (the others finished); the table says why each failed."""

    exit_code = 5


class TrainingInterrupted(FinetuneError):
    """SIGINT/SIGTERM stopped training after a checkpoint was written."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(e: Exception) -> str:
    """The first line of a library's exception message (or its type): enough to say what went wrong."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
