"""The models a server answers to: the base and adapters by name, added and removed while serving.

An adapter is checked before it touches the model: an adapter directory (adapter_config.json), intact against its
manifest (`verify_adapter`, as `finetune verify` and `finetune chat` check it), a LoRA (LoRA, rsLoRA, DoRA, ...:
what PEFT's LoRA layers load), and trained on this server's base: the same base path, or a base whose config
has the same architecture and shapes (a copy, a merged or GGUF form of it). Each adapter keeps the tokenizer saved
with it (its chat template), as `finetune chat` uses it. The PEFT name is internal (a0, a1, ...), never reused, so a
name removed and added again while old requests still run cannot mix the two.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError, first_line
from finetune.serve.engine import BASE, Engine
from finetune.serve.protocol import APIError, now

SHAPE = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
         "num_key_value_heads", "vocab_size")


@dataclass
class Served:
    """One model id: the base (adapter BASE) or an adapter."""

    name: str
    adapter: str
    tok: object
    eos: frozenset[int]
    path: str | None
    created: int


class Registry:
    def __init__(self, engine: Engine, base_name: str, source: str, tok):
        model = engine.model
        self.engine, self.source = engine, source
        self.config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        self.models: dict[str, Served] = {base_name: Served(base_name, BASE, tok, self._eos(tok), None, now())}
        self.base_name = base_name
        self.ids = itertools.count()
        self.changing = threading.Lock()  # one add or remove at a time

    def get(self, name: str) -> Served:
        served = self.models.get(name)
        if served is None:
            raise APIError(404, f"The model '{name}' does not exist; this server has: {', '.join(self.models)}.",
                           param="model", code="model_not_found")
        return served

    def add(self, name: str, path: str) -> Served:
        """Verify and load the adapter at `path` as model `name`; APIError(400) names what is wrong."""
        from finetune.model import check_adapter_dir, load_adapter_tokenizer

        with self.changing:
            if name in self.models:
                raise APIError(409, f"A model named '{name}' is already served; remove it first.", param="name",
                               code="model_exists")
            adapter_dir = Path(path).expanduser()
            try:
                check_adapter_dir(adapter_dir)
                config = self._check(adapter_dir)
                tok, _ = load_adapter_tokenizer(adapter_dir, self.source)
            except FinetuneError as e:
                raise APIError(400, str(e), param="path", code="invalid_adapter") from None
            peft_name = f"a{next(self.ids)}"
            self._load(adapter_dir, peft_name)
            if config.get("use_dora") or config.get("modules_to_save"):  # PEFT's per-row split cannot serve them
                self.engine.solo.add(peft_name)
            if config.get("target_parameters"):  # MoE experts: PEFT's expert wrapper serves no mixed batch
                self.engine.unmixed.add(peft_name)
            served = Served(name, peft_name, tok, self._eos(tok), str(adapter_dir), now())
            self.models[name] = served
            return served

    def remove(self, name: str) -> None:
        with self.changing:
            served = self.get(name)
            if served.adapter == BASE:
                raise APIError(400, f"'{name}' is the base model; only adapters can be removed.", param="name",
                               code="invalid_adapter")
            del self.models[name]  # new requests: 404; running ones finish, then the weights go
            self.engine.retire_adapter(served.adapter)

    def _check(self, adapter_dir: Path) -> dict:
        """The adapter's config, after refusing another method than LoRA or another base than this one."""
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        if config.get("peft_type") != "LORA":
            raise APIError(400, f"{adapter_dir} is a {config.get('peft_type')} adapter; finetune serve answers "
                           "with LoRA adapters (and their variants).", param="path", code="invalid_adapter")
        base = str(config.get("base_model_name_or_path") or "")
        if _same_path(base, self.source):
            return config
        theirs, mine = _shape(base), _shape_of(self.config)
        if theirs is None:
            raise APIError(400, f"{adapter_dir} was trained on '{base}', not on this server's base '{self.source}', "
                           "and that model's config cannot be read to compare them.", param="path",
                           code="foreign_adapter")
        if theirs != mine:
            differ = ", ".join(f"{k} {a} vs {b}" for k, a, b in zip(SHAPE, theirs, mine) if a != b)
            raise APIError(400, f"{adapter_dir} belongs to another base model: it was trained on '{base}', this "
                           f"server serves '{self.source}' ({differ}).", param="path", code="foreign_adapter")
        return config

    def _load(self, adapter_dir: Path, peft_name: str) -> None:
        """Attach the adapter under the engine's lock (between two decoding steps)."""
        from finetune.model import attach_saved_adapter

        engine = self.engine
        with engine.lock:
            try:
                engine.model = attach_saved_adapter(engine.model, adapter_dir, peft_name)
            except Exception as e:  # a shape mismatch, a missing tensor: the reason, and serving goes on
                if peft_name in (getattr(engine.model, "peft_config", None) or {}):
                    engine.model.delete_adapter(peft_name)
                raise APIError(400, f"Cannot load the adapter {adapter_dir}: {first_line(e)}", param="path",
                               code="invalid_adapter") from None
            finally:
                engine.adapters_changed()
            engine.model.eval()

    def _eos(self, tok) -> frozenset[int]:
        """The ids that end a reply: the model's generation config and the tokenizer's (as `finetune chat`)."""
        from finetune.generate import GenerationOptions, generation_kwargs

        return frozenset(generation_kwargs(self.engine.model, tok, GenerationOptions())["eos_token_id"])


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _shape(base: str) -> tuple | None:
    """The architecture and shapes of model `base`, read from disk only (a local directory or the hub cache)."""
    from transformers import AutoConfig

    if not base:
        return None
    try:
        return _shape_of(AutoConfig.from_pretrained(base, local_files_only=True))
    except (OSError, ValueError):
        return None


def _shape_of(config) -> tuple:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return tuple(getattr(text, k, None) for k in SHAPE)
