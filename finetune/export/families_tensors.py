"""How a family's transformers tensors become GGUF tensors, and back (for the proof of families transformers cannot
read from GGUF).

- Names: the gguf package's TensorNameMap of the family's architecture (`tensor_name`).
- Layout, the same for every family: per-expert weights on disk (`...experts.{e}.w1.weight`,
  `...experts.{e}.gate_proj.weight`) are stacked, expert by expert, into the (experts, rows, cols) tensor
  llama.cpp's `ffn_{gate,up,down}_exps` hold; a fused (experts, 2 x ff, hidden) `gate_up_proj` stored by newer
  checkpoints is split into its gate and up halves (`sources`).
- Rows (`rows`, also applied to a LoRA B matrix by the adapter export): Llama-style q/k permuted to llama.cpp's
  interleaved RoPE pairs (`rope_permute`); GPT-NeoX's per-head [q_h; k_h; v_h] qkv rows regrouped as
  [all q; all k; all v]. Values (`convert`): Gemma's RMSNorm weights + 1. Each has its inverse (`undo`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.errors import ModelError
from finetune.export.families import Family

_EXPERT = re.compile(r"^(?P<pre>.+\.experts)\.(?P<e>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.weight$")
_FUSED = re.compile(r"^(?P<pre>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)(\.weight)?$")


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' rotate-half rows of q/k -> llama.cpp's interleaved pairs: per head, row i of the first
    half and row i of the second half become rows 2i and 2i+1 (weights, biases and LoRA B matrices alike)."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `rope_permute`."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _heads(config) -> tuple[int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads


def rows(family: Family, name: str, w: torch.Tensor, config, inverse: bool = False) -> torch.Tensor:
    """The row order llama.cpp's graph expects for the GGUF tensor `name` (inverse: back to transformers')."""
    if family.rope_permute and re.search(r"\.attn_[qk]\.(weight|bias)(\.lora_b)?$", name):
        n_head = _heads(config)[0 if ".attn_q." in name else 1]
        return rope_unpermute(w, n_head) if inverse else rope_permute(w, n_head)
    if family.neox_qkv and re.search(r"\.attn_qkv\.(weight|bias)(\.lora_b)?$", name):
        n_head = _heads(config)[0]
        if inverse:  # [3, heads, head_dim, ...] -> [heads, 3, head_dim, ...]
            return w.reshape(3, n_head, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
        return w.reshape(n_head, 3, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
    return w


def convert(family: Family, name: str, w: torch.Tensor, config) -> torch.Tensor:
    """A transformers tensor (float32) as the GGUF tensor `name` holds it."""
    w = rows(family, name, w, config)
    return w + family.norm_offset if family.norm_offset and name.endswith("norm.weight") else w


def undo(family: Family, name: str, w: torch.Tensor, config) -> torch.Tensor:
    """The inverse of `convert`."""
    if family.norm_offset and name.endswith("norm.weight"):
        w = w - family.norm_offset
    return rows(family, name, w, config, inverse=True)


def tensor_name(name_map, hf_name: str) -> str | None:
    """The GGUF name of a transformers tensor, or None for ones llama.cpp does not use (rotary caches)."""
    if re.search(r"rotary_emb\.inv_freq$", hf_name):
        return None
    mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ModelError(f"Cannot map the tensor '{hf_name}' to a GGUF name for this architecture.")
    return mapped


@dataclass
class Source:
    """One GGUF tensor and where its values come from: one safetensors key, or one key per expert (stacked along
    a new first dimension), optionally a row range of the key's second-to-last dimension (a fused gate_up half)."""
    name: str
    parts: list  # [(safetensors handle, key)]
    shape: tuple[int, ...]
    stacked: bool = False
    rows: tuple[int, int] | None = None

    def load(self) -> torch.Tensor:
        tensors = [h.get_tensor(k).float() for h, k in self.parts]
        w = torch.stack(tensors) if self.stacked else tensors[0]
        return w[..., self.rows[0]:self.rows[1], :] if self.rows else w

    @property
    def keys(self) -> list[str]:
        return [k for _, k in self.parts]


def sources(handles, name_map, tied: bool) -> list[Source]:
    """Every GGUF tensor of a checkpoint, in file order (stacked experts where their last expert's key is)."""
    out, experts = [], {}
    keys = [(h, k) for h in handles for k in h.keys()]
    for h, k in keys:
        if m := _EXPERT.match(k):
            experts.setdefault((m["pre"], m["proj"]), []).append((int(m["e"]), h, k))
    seen = set()
    for h, k in keys:
        if tied and k == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when the file has no output.weight
        shape = tuple(h.get_slice(k).get_shape())
        if m := _EXPERT.match(k):
            group = (m["pre"], m["proj"])
            if group in seen:
                continue
            seen.add(group)
            parts = sorted(experts[group], key=lambda x: x[0])
            if [e for e, _, _ in parts] != list(range(len(parts))):
                raise ModelError(f"The experts of {m['pre']} are not numbered 0..{len(parts) - 1} in the checkpoint.")
            name = tensor_name(name_map, f"{m['pre']}.{m['proj']}.weight")
            out.append(Source(name, [(ph, pk) for _, ph, pk in parts], (len(parts), *shape), stacked=True))
        elif (m := _FUSED.match(k)) and len(shape) == 3:
            if m["proj"] == "down_proj":
                out.append(Source(tensor_name(name_map, f"{m['pre']}.down_proj.weight"), [(h, k)], shape))
                continue
            half = shape[1] // 2
            for proj, span in (("gate_proj", (0, half)), ("up_proj", (half, shape[1]))):
                out.append(Source(tensor_name(name_map, f"{m['pre']}.{proj}.weight"), [(h, k)],
                                  (shape[0], half, shape[2]), rows=span))
        elif (name := tensor_name(name_map, k)) is not None:
            out.append(Source(name, [(h, k)], shape))
    return out


def rebuild_checkpoint(gguf_path: Path, model_dir: Path, out_dir: Path, family: Family, config) -> dict:
    """Read the GGUF file with the gguf package's reader, undo every transform and layout change and write the
    transformers checkpoint it stands for into `out_dir` (model.safetensors beside a copy of model_dir's config):
    the read-back for families transformers cannot load from GGUF. Returns the GGUF header's core numbers."""
    import shutil

    import gguf
    from safetensors.torch import save_file

    from finetune.merge import base_weight_files, open_safetensors
    from finetune.recipe import ModelSection

    reader = gguf.GGUFReader(str(gguf_path))
    read = {t.name: t for t in reader.tensors}
    handles = [open_safetensors(f) for f in base_weight_files(ModelSection(name_or_path=str(model_dir)))]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    state = {}
    for src in sources(handles, family.name_map(text.num_hidden_layers), bool(getattr(text, "tie_word_embeddings",
                                                                                       False))):
        t = read[src.name]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        w = undo(family, src.name, torch.from_numpy(data.copy()).float().reshape(src.shape), config)
        if src.rows:  # one half of a fused gate_up: joined again when both are read
            key = src.keys[0]
            state[key] = torch.cat([state[key], w], dim=-2) if key in state else w
        else:
            state.update(zip(src.keys, w.unbind(0) if src.stacked else [w]))
    if getattr(text, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(model_dir / "config.json", out_dir / "config.json")
    arch = family.arch_name
    fields = {k: reader.fields[f"{arch}.{k}"].contents() for k in ("block_count", "embedding_length",
                                                                  "attention.head_count") if f"{arch}.{k}" in reader.fields}
    return fields
