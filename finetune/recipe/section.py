"""The base of every recipe section: unknown keys are errors (a misspelt key must not be silently ignored);
and `PathText`, the type of every recipe value that becomes a file name."""

import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

# Linux allows 255 bytes per name (NAME_MAX) and 4096 per path (PATH_MAX); finetune adds prefixes and suffixes of
# its own (.tmp-, .old-, .lock), so a name of up to 240 bytes always leaves room for them.
NAME_BYTES = 240
PATH_BYTES = 4000


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _path_text(v: str) -> str:
    """A path the operating system can take: no NUL byte, each name at most NAME_BYTES, the whole at most
    PATH_BYTES (otherwise os.stat raises, deep inside whatever first touches it)."""
    if "\0" in v:
        raise ValueError("a path cannot contain a NUL character")
    size = len(os.fsencode(v))
    if size > PATH_BYTES:
        raise ValueError(f"a path of {size:,} bytes is longer than the {PATH_BYTES} the file system takes")
    longest = max(v.split("/"), key=lambda part: len(os.fsencode(part)))
    if len(os.fsencode(longest)) > NAME_BYTES:
        raise ValueError(f"the name '{longest[:40]}...' has {len(os.fsencode(longest))} bytes; file names take at most "
                         f"{NAME_BYTES}")
    return v


PathText = Annotated[str, AfterValidator(_path_text)]
class KeyedError(ValueError):
    """A rule across sections that one key breaks: the error is reported at that key's file:line."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
