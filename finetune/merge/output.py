"""Writing a merged model out: safetensors streamed tensor by tensor, read back with pread, pushed to the Hub.

Used by model.py (and export reads through `open_safetensors`); `save_companions` writes config, generation
config and tokenizer beside the weights.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from finetune.errors import CheckpointError, ModelError, first_line

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in the order of `plan` (name -> meta tensor).

    safetensors' own writers take every tensor at once, i.e. a whole shard in memory. The format is
    an 8-byte header length, a JSON header (dtype, shape, byte offsets per tensor) and the raw bytes;
    the plan gives the header up front, so each tensor is written as soon as it is computed.
    A None path writes nothing (and accepts nothing).
    """

    def __init__(self, path: Path | None, plan: dict[str, torch.Tensor]):
        self.path, self.plan, self.order = path, plan, iter(plan)
        self.file = None

    def __enter__(self) -> "SafetensorsWriter":
        if self.path is None:
            return self
        header, offset = {}, 0
        for name, t in self.plan.items():
            size = t.numel() * t.element_size()
            header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.plan[next(self.order)]
        if name not in self.plan or expected.shape != tensor.shape or expected.dtype != tensor.dtype:
            raise ModelError(f"Internal error writing {self.path}: {name} {tuple(tensor.shape)} {tensor.dtype} does "
                             f"not match the planned {tuple(expected.shape)} {expected.dtype}.")
        self.file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
        if exc[0] is None and next(self.order, None) is not None:
            raise ModelError(f"Internal error writing {self.path}: not every planned tensor was written.")


def open_safetensors(path: Path):
    """Read tensors with pread where safetensors offers it: mmap would count the whole file as resident."""
    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # safetensors before 0.8
        return safe_open(str(path), framework="pt")


def check_hub_access(repo: str) -> None:
    """Fail fast (before merging) when the Hub cannot be reached or no token is configured."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"Cannot push to the Hub repo '{repo}': HF_HUB_OFFLINE is set. "
                              "Merge without --push-to-hub and upload later with `hf upload`.")
    try:
        HfApi().whoami()
    except Exception as e:  # no token, no network, bad token: the message says which
        raise CheckpointError(
            f"Cannot push to the Hub repo '{repo}': {first_line(e)}. Nothing was merged. Log in with "
            "`hf auth login` (or set HF_TOKEN) and check the network, or merge without --push-to-hub."
        ) from None


def push(out: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, folder_path=str(out), commit_message="Upload model merged by finetune")
    except Exception as e:
        raise CheckpointError(f"Merged into {out}, but pushing to '{repo}' failed: {first_line(e)}. "
                              f"Upload it later with `hf upload {repo} {out}`.") from None


def save_companions(section, tok, out_dir: Path, dtype: torch.dtype) -> None:
    """config.json (with the saved dtype, no quantization), generation config, tokenizer and chat template."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(section.name_or_path, revision=section.revision,
                                        trust_remote_code=section.trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(out_dir)
    try:
        GenerationConfig.from_pretrained(section.name_or_path, revision=section.revision).save_pretrained(out_dir)
    except OSError:
        pass  # the base ships none; transformers derives one from config.json
    tok.save_pretrained(out_dir)  # the tokenizer the adapter was trained with, chat template included
