"""The base of every recipe section: unknown keys are errors (a misspelt key must not be silently ignored)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
