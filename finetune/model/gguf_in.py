"""A `.gguf` file as the base model of `train`, `merge`, `plan` and `chat`.

transformers reads GGUF files but only dequantized, and refuses to `save_pretrained` such a model; NF4
quantization and `merge`'s tensor streaming both need safetensors. So the first use of a GGUF file converts it
once into a plain transformers directory (float32 safetensors, config without GGUF quantization, tokenizer
with its chat template) in a cache keyed by the file's path, size and modification time; every verb then
loads that directory the usual way. Converting costs one dequantized copy of the model in memory, once (for
SmolLM2-135M: ~540 MB on disk, a few seconds); loading the cached directory with a BitsAndBytesConfig
quantizes to NF4 as for any other base.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from finetune.errors import ModelError, first_line

INFO_FILE = "gguf_source.json"


def is_gguf(name: str | os.PathLike) -> bool:
    return str(name).endswith(".gguf")


def check_gguf(path: str | os.PathLike) -> None:
    """Parse the GGUF header with the gguf package's own reader (memory-mapped: a length field that lies reads
    past nothing and allocates nothing) before transformers' reader, which fails on a truncated or lying header
    with bare struct/index errors; ModelError naming the file otherwise."""
    import gguf

    try:
        gguf.GGUFReader(str(path))
    except Exception as e:  # ValueError (magic, truncation), IndexError (counts past the end), OSError
        raise ModelError(f"{path} is not a readable GGUF file ({type(e).__name__}: {first_line(e)[:200]}); it is "
                         "truncated, damaged or not GGUF.") from None


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_GGUF_CACHE", Path.home() / ".cache" / "finetune" / "gguf"))


def as_transformers_dir(path: str | os.PathLike) -> Path:
    """The cached transformers directory of the GGUF file `path` (converted on first use, atomically)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"The GGUF file '{path}' does not exist.")
    check_gguf(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / f"{path.stem}-{key}"
    if (out / INFO_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        _convert(path, staging)
        os.replace(staging, out)
    except OSError:
        if not (out / INFO_FILE).is_file():  # another process may have won the race; otherwise it is an error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def weight_type(path: str | os.PathLike) -> str:
    """The GGUF file's main weight type, e.g. Q4_1 (the most common type among its 2-D tensors)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return max(counts, key=counts.get) if counts else "unknown"


def source_note(model_dir: str | os.PathLike) -> str | None:
    """'base weights dequantized from a Q4_1 GGUF (file)' for a converted directory, else None."""
    info = Path(model_dir) / INFO_FILE
    if not info.is_file():
        return None
    data = json.loads(info.read_text())
    return f"the base weights were dequantized from a {data['weight_type']} GGUF ({data['gguf']})"


def source_file(model_dir: str | os.PathLike) -> str | None:
    """The GGUF file a converted directory came from (None for any other directory)."""
    info = Path(model_dir) / INFO_FILE
    return json.loads(info.read_text())["gguf"] if info.is_file() else None


def _convert(path: Path, staging: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"Cannot read the GGUF file '{path}': {first_line(e)}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):  # its random init must not move the seeded RNG of the run converting it
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    (staging / INFO_FILE).write_text(json.dumps({"gguf": str(path), "weight_type": weight_type(path)}) + "\n")
