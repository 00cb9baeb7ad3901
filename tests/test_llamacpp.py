"""llama.cpp runs what `finetune export` writes (slow: needs llama-cpp-python, `pip install -e '.[llamacpp]'`, which
builds llama.cpp from source; the SmolLM2 tests also the real model). Run with `make test-slow`.

Every family (tests/family_models.py): a tiny random model trained (QLoRA, experts and routers too for a mixture
of experts) to answer the toy task deterministically, exported as f16 from its checkpoint: llama.cpp's greedy reply
to a chat prompt equals `finetune chat`'s, token for token.

On the demo model (runs/quickstart/checkpoint-final merged, or the base SmolLM2 when there is no demo run):
llama.cpp tokenizes like the original tokenizer, and its greedy continuation of a chat prompt equals
transformers' greedy continuation of the merged model for 32 tokens at f16, and agrees on >= 90% of them at q8_0.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "models" / "SmolLM2-135M-Instruct"
DEMO = ROOT / "runs" / "quickstart" / "checkpoint-final"
STRINGS = ["Hello world", "Lena, 29, teacher, Oslo.", "12345 + 678 = 13023", "naïve café, 東京 🙂",
           "<|im_start|>user\nhi<|im_end|>\n", "  two  spaces\tand a tab\n\nnewlines", '{"name": "Ada", "age": 36}']
PROMPT = "Extract the person's name, age and city as JSON.\n\nLena, 29, teacher, Oslo."
STEPS = 32


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    if not (BASE / "config.json").is_file():
        pytest.skip("needs models/SmolLM2-135M-Instruct (make fetch)")
    if not (DEMO / "adapter_config.json").is_file():
        return BASE
    from finetune.merge.model import merge

    out = tmp_path_factory.mktemp("demo") / "merged"
    merge(DEMO, out, dtype="fp32")
    return out


@pytest.fixture(scope="module")
def exported(merged, tmp_path_factory):
    from finetune.export.gguf import export

    root = tmp_path_factory.mktemp("gguf")
    files = {}
    for t in ("f16", "q8_0"):
        (root / t).mkdir()
        files[t] = export(merged, root / t / f"demo-{t}.gguf", type=t).out
    return files


def greedy_hf(model, ids: list[int]) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(STEPS):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def greedy_llama(llm, ids: list[int]) -> list[int]:
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(t)
        if len(out) == STEPS:
            break
    return out


def test_llama_cpp_tokenizes_and_continues_like_transformers(merged, exported):
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    expected = greedy_hf(model, ids)
    agreement = {}
    for t, path in exported.items():
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
        for s in STRINGS:
            assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok(s, add_special_tokens=False)[
                "input_ids"], (t, s)
        got = greedy_llama(llm, ids)
        agreement[t] = sum(a == b for a, b in zip(got, expected)) / STEPS
        if t == "f16":
            assert got == expected, (tok.decode(got), tok.decode(expected))
    assert agreement["q8_0"] >= 0.9, agreement


def test_llama_cpp_applies_the_exported_adapter_like_the_merge(tmp_path):
    """Base GGUF + `--adapter-only` GGUF in llama.cpp continues like the merge into the original weights."""
    if not (DEMO / "adapter_config.json").is_file():
        pytest.skip("needs the demo run (make demo)")
    from finetune.export.gguf import export
    from finetune.merge.model import merge

    merge(DEMO, tmp_path / "merged", base_weights="original", dtype="fp32")
    for name, source, only in (("base", BASE, False), ("lora", DEMO, True)):
        (tmp_path / name).mkdir()
        export(source, tmp_path / name / f"{name}.gguf", type="f16", adapter_only=only)
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    expected = greedy_hf(model, ids)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "base" / "base.gguf"),
                          lora_path=str(tmp_path / "lora" / "lora.gguf"), n_ctx=512, n_threads=2, verbose=False)
    got = greedy_llama(llm, ids)
    assert sum(a == b for a, b in zip(got, expected)) / STEPS >= 0.9, (tok.decode(got), tok.decode(expected))


# ------------------------------------------------------------------------ every family, trained

FAMILY_PROMPTS = ["Repeat the word twice.\n\ncat", "Repeat the word once.\n\nsun", "Repeat the word three times.\n\nfish"]
# 24 steps at lr 1e-2 leave OLMo 2 and GPT-NeoX at loss 4.4 and 5.2, where each prompt's greedy reply is an immediate
# end-of-turn (equal in both tools, but empty); 96 at 2e-2 bring them to 0.6 and 2.0, replying with words
# (OLMo 2 "cat cat", "sun", "fish fish fish", the task itself).
LONGER = {"max_steps": 96, "learning_rate": 2e-2}
FAMILY_TRAINING = {"olmo2": LONGER, "gpt_neox": LONGER}


@pytest.fixture(scope="module")
def family_data(tmp_path_factory, toy_alpaca_rows):
    from conftest import write_jsonl

    root = tmp_path_factory.mktemp("llamacpp_families")
    write_jsonl(root / "train.jsonl", toy_alpaca_rows)
    write_jsonl(root / "eval.jsonl", toy_alpaca_rows[:8])
    return root


@pytest.mark.parametrize("family", list(__import__("family_models").FAMILIES))
def test_llama_cpp_replies_like_finetune_chat(family, family_data, tiny_tokenizer_dir, tmp_path):
    import json

    from family_models import build_family_model
    from test_families import cli, family_recipe, run_dir

    model_dir = build_family_model(family, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), tmp_path / "base")
    recipe = json.loads(family_recipe(tmp_path, family, model_dir, family_data).read_text())
    recipe["lora"]["r"] = 8
    recipe["training"].update({"max_steps": 24, "learning_rate": 1e-2, **FAMILY_TRAINING.get(family, {}),
                               "eval_steps": None, "save_steps": None, "logging_steps": 10})
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    cli("train", path)
    ckpt = run_dir(tmp_path, family) / "checkpoint-final"
    gguf = tmp_path / "gguf" / f"{family}-f16.gguf"
    gguf.parent.mkdir()
    cli("export", ckpt, "--out", gguf, "--type", "f16")
    tok = AutoTokenizer.from_pretrained(ckpt)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=2, verbose=False)
    answered = []
    for prompt in FAMILY_PROMPTS:
        expected = cli("chat", ckpt, "--prompt", prompt, "--max-new-tokens", 8).removesuffix("\n")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        got = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if t == tok.eos_token_id or len(got) == 8:
                break
            got.append(t)
        assert tok.decode(got, skip_special_tokens=True).strip() == expected, (family, prompt)  # chat strips
        answered.append(expected.strip())
    assert any(answered), family  # not only end-of-turn: some reply has text, so the comparison is not vacuous

