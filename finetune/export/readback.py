"""The export's own proof: the GGUF file read back, its tokenizer and logits compared with the source model.

Families transformers reads from GGUF (Family.readback) are loaded by transformers (`gguf_file=`), an independent
reader with its own inverse of the Llama q/k permutation, Gemma's norm offset and the expert stacking, and its own
reading of the metadata (completed, as for GGUF in, with what it leaves at class defaults: model/gguf_in.py
`llama_cpp_config`). For the others (OLMo 2, Granite, GPT-NeoX, Mixtral, OLMoE: transformers 5 has no GGUF mapping for them)
the file is read with the gguf package's own reader, every transform undone (families_tensors.rebuild_checkpoint)
and the rebuilt checkpoint loaded by transformers; its token list is compared with the source tokenizer's. That
proves the weights and their layout; the family's metadata is proven by llama.cpp itself (tests/test_llamacpp.py).
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch

from finetune.errors import first_line

# Strings whose token ids must survive the trip: specials, non-ASCII, digits, whitespace runs.
TOKENIZER_PROBES = [
    "Hello world", "  two  spaces\tand a tab\n\nnewlines", "12345 + 678 = 13023", "Ünïcödé: naïve café, 東京, 🙂",
    "<|im_start|>user\nhi<|im_end|>\n", '{"name": "Ada", "age": 36, "city": "Lisbon"}',
]


def prove(report, model_dir: Path, gguf_path: Path) -> None:
    """Fill `report.fidelity` (max/mean |logit diff|, top-1 agreement on the probe batch), the tokenizer agreement
    and `report.readback` (transformers or gguf-reader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.export.families import family_for, read_config
    from finetune.merge import probe_batch

    config = read_config(model_dir)
    family = family_for(config)
    tok = AutoTokenizer.from_pretrained(model_dir)
    probe = probe_batch(tok)
    report.probe_tokens = int(probe["attention_mask"].sum())
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = source(**probe).logits.float()
    del source
    gc.collect()
    if family.readback:
        _tokenizer_by_transformers(report, tok, gguf_path)
        try:  # transformers' own reader (its inverse permutation and norm offset, its config mapping)
            exported = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                            config=_gguf_config(gguf_path), dtype=torch.float32).eval()
            _compare(report, exported, probe, reference)
            return
        except Exception as e:  # e.g. a tensor type transformers cannot dequantize, a name it maps to nothing
            report.notes.append(f"transformers cannot load this {report.type} GGUF ({first_line(e)[:160]}); "
                                "read back with the gguf package's reader instead")
    from finetune.export.families_tensors import rebuild_checkpoint

    report.readback = "gguf-reader"
    if not family.readback:
        report.notes.append(f"transformers cannot read {family.name} GGUF files: read back with the gguf package's "
                            "reader, every transform undone, and loaded as a transformers checkpoint")
    _tokenizer_by_reader(report, tok, gguf_path)
    with tempfile.TemporaryDirectory(prefix=".readback-", dir=gguf_path.parent) as scratch:
        rebuild_checkpoint(gguf_path, model_dir, Path(scratch), family, config)
        exported = AutoModelForCausalLM.from_pretrained(scratch, dtype=torch.float32).eval()
        _compare(report, exported, probe, reference)


def _gguf_config(gguf_path: Path):
    """The config transformers reads from the file, with what its reader leaves at class defaults taken from the
    file as llama.cpp reads it (model/gguf_in.py: head width, expert width, Gemma's soft-capping and scale)."""
    from transformers import AutoConfig

    from finetune.model import llama_cpp_config

    return llama_cpp_config(gguf_path, AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name))


def _compare(report, exported, probe, reference) -> None:
    with torch.no_grad():
        logits = exported(**probe).logits.float()
    keep = probe["attention_mask"].bool()
    d = (logits - reference).abs()[keep]
    report.fidelity = {"max_abs_logit_diff": d.max().item(), "mean_abs_logit_diff": d.mean().item(),
                       "top1_agreement": (logits.argmax(-1) == reference.argmax(-1))[keep].float().mean().item()}


def _tokenizer_by_transformers(report, tok, gguf_path: Path) -> None:
    from transformers import AutoTokenizer

    try:
        gguf_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        report.tokenizer_agreement = {
            s: tok(s, add_special_tokens=False)["input_ids"] == gguf_tok(s, add_special_tokens=False)["input_ids"]
            for s in TOKENIZER_PROBES
        }
    except Exception as e:  # transformers' GGUF reader: a limitation to report, not a failed export
        report.notes.append(f"tokenizer not compared: transformers cannot read it back ({first_line(e)})")


def _tokenizer_by_reader(report, tok, gguf_path: Path) -> None:
    """The file's token list against the source tokenizer's: each probe string's ids must name the same tokens."""
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.tokens")
    if field is None:
        report.notes.append("tokenizer not compared: the file has no token list")
        return
    tokens = field.contents()
    report.tokenizer_agreement = {
        s: all(i < len(tokens) and tokens[i] == tok.convert_ids_to_tokens(i)
               for i in tok(s, add_special_tokens=False)["input_ids"])
        for s in TOKENIZER_PROBES
    }
