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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_readable(path)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        config = llama_cpp_config(path, AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                      dtype=torch.float32, use_kernels=False)  # as load.py
    except (OSError, ValueError, KeyError, RuntimeError) as e:
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


def _fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}


def check_readable(path: Path) -> None:
    """Refuse, naming the family, a GGUF file transformers cannot turn into a model: an architecture it has no
    mapping for (OLMo 2, Granite, GPT-NeoX, OLMoE, ...), a Llama-architecture file with experts (Mixtral: read as a
    dense Llama), or one whose general.name is exactly `mistral` (transformers 5 then asks the gguf package for a
    `mistral` architecture, which llama.cpp writes as `llama`)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    fields = _fields(path)
    arch, name = str(fields.get("general.architecture", "?")), str(fields.get("general.name", ""))
    why = None
    if arch == "llama" and fields.get("llama.expert_count"):
        why = "it is a Mixtral (a Llama-architecture mixture of experts), which transformers reads as a dense Llama"
    elif arch == "llama" and name == "mistral":
        why = ("its general.name is 'mistral', and transformers 5 then looks for a `mistral` architecture the gguf "
               "package does not have (rename the file's model: `finetune export` writes the model's name)")
    elif arch not in GGUF_SUPPORTED_ARCHITECTURES and arch.replace("moe", "_moe") not in GGUF_SUPPORTED_ARCHITECTURES:
        why = f"transformers has no GGUF mapping for the {arch} architecture"
    if why:
        readable = ", ".join(a for a in ("llama", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3")
                             if a in GGUF_SUPPORTED_ARCHITECTURES)
        raise ModelError(f"Cannot start from the GGUF file {path}: {why}. finetune reads GGUF files of the families "
                         f"transformers reads ({readable}); use the model's safetensors directory instead.")


def llama_cpp_config(path: Path, config):
    """transformers' config of a GGUF file, with what its GGUF reader leaves at the class defaults set from the
    file as llama.cpp reads it: the head width (attention.key_length), a mixture of experts' expert width
    (expert_feed_forward_length), Gemma's logit soft-capping and the attention scale llama.cpp derives from the
    head width (its query_pre_attn_scalar)."""
    fields = _fields(path)
    arch = str(fields.get("general.architecture"))
    value = lambda key: fields.get(f"{arch}.{key}")  # noqa: E731
    if value("attention.key_length") and hasattr(config, "head_dim"):
        config.head_dim = int(value("attention.key_length"))
    if value("expert_feed_forward_length") and hasattr(config, "moe_intermediate_size"):
        config.moe_intermediate_size = int(value("expert_feed_forward_length"))
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hasattr(config, key):
            setattr(config, key, float(value(key)) if value(key) is not None else None)
    if hasattr(config, "query_pre_attn_scalar"):  # llama.cpp: 1/sqrt(head_dim), hidden/heads for the 27Bs
        big = {"gemma2": 46, "gemma3": 62}.get(arch)
        config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads \
            if config.num_hidden_layers == big else config.head_dim
    swa_theta = value("rope.freq_base_swa")
    rope = getattr(config, "rope_parameters", None)
    if swa_theta and isinstance(rope, dict) and isinstance(rope.get("sliding_attention"), dict):
        rope["sliding_attention"]["rope_theta"] = float(swa_theta)
    return config

