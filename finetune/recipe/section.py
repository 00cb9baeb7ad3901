"""The base of every recipe section: unknown keys are errors (a misspelt key must not be silently ignored)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyedError(ValueError):
    """A rule across sections that one key breaks: the error is reported at that key's file:line."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
