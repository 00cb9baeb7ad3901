"""Tiny, network-free tokenizers and models, built once per test session."""

import json
import socket
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TOY_WORDS = ["cat", "dog", "sun", "tree", "blue", "red", "fish", "book",
             "milk", "rain", "star", "bird", "moon", "king", "door", "cake"]
TOY_COUNTS = {"once": 1, "twice": 2, "three times": 3, "four times": 4}

# The BPE merges are learned from this small corpus; being byte-level, the tokenizer still
# round-trips any other text exactly.
CORPUS = [
    "You are a helpful assistant. You are terse.",
    "The user asks a question and the assistant answers it.",
    "Name a color. Blue. Another one? Green, of course.",
    "Red, green, blue, yellow, black and white are colors.",
    "Say hi. Hi there! Hello, how are you today?",
    "Repeat the word once. Repeat the word twice. Repeat the word three times. Repeat the word four times.",
    " ".join(TOY_WORDS) + ". " + ", ".join(f"{w} {w}" for w in TOY_WORDS) + ".",
    "A cat and a dog sat under the tree in the rain.",
    "The sun, the moon and a star shone over the king's door.",
    "A bird ate the cake; the fish read a book and drank milk.",
    "### Instruction:\nSay hi.\n\n### Response:\nhi there",
    "### Input:\nplain words\n\n### Response:\nan answer",
    "Extract the person's name, age and city as JSON.",
    '{"name": "Maria", "age": 34, "city": "Lisbon"}',
    '{"name": "Omar", "age": 27, "city": "Cairo"}',
    '{"answer": [1, 2, 3], "ok": true, "note": null}',
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 99 100 2024 3.14 -7",
    "Questions? Answers! (Maybe.) [Lists], {braces}: 'quotes' and \"double quotes\"; dashes - and slashes / \\.",
    "The quick brown fox jumps over the lazy dog.",
    "She lives in a small city by the sea and works as a nurse.",
    "He is forty years old, and he likes to read in the evening.",
    "We trained a small model on a few words and the loss went down.",
    "This is a longer instruction here, and this is a longer answer.",
    "Please give a short reply with only the final number.",
    "What is the capital of France? Paris is the capital.",
    "It was a bright cold day in April, and the clocks were striking.",
    "Tabs\tand newlines\nare text too.",
]


def _train_tokenizer(chat_template: str, bos_token: str, eos_token: str, extra_special_tokens: list[str],
                     pad_token: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer whose special tokens get ids 0, 1, 2, ...: bos, then the extras in order."""
    specials = [bos_token, *extra_special_tokens]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=chat_template, bos_token=bos_token, eos_token=eos_token,
        pad_token=pad_token, extra_special_tokens=extra_special_tokens,
        clean_up_tokenization_spaces=False,  # True would alter text like "a ." on decode
    )



@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """One training per process in real use; here many share a process, in float32 or bf16 (accelerate
    refuses a second mixed precision in one process), so each test starts from a clean AcceleratorState."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()

@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """ChatML tokenizer like SmolLM2's: ids 0-2 are <|endoftext|>, <|im_start|>, <|im_end|>; pad is eos."""
    tok = _train_tokenizer(CHATML_TEMPLATE, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                           extra_special_tokens=["<|im_start|>", "<|im_end|>"], pad_token="<|im_end|>")
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama3_tokenizer_dir(tmp_path_factory) -> Path:
    """Llama-3 style special tokens and chat template, with no pad token."""
    tok = _train_tokenizer(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                           extra_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    path = tmp_path_factory.mktemp("tiny_llama3_tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A randomly initialised 2-layer Llama (float32 safetensors) saved with the ChatML tokenizer."""
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        # LoRA leaves the final norm and lm_head frozen, so their scale caps how far logits can move: with the
        # default 0.02 they stay within about +-1.3 and the loss can barely fall below ln(vocab_size).
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)  # float32, the torch default
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path, rows) -> None:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (servers and torchrun rendezvous in tests take one each, never
    a fixed number: a process left over from an interrupted run would hold it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def toy_alpaca_rows() -> list[dict]:
    """64 alpaca records of a regular task: repeat a word 1-4 times. The first 16 cover 4 words x 4 counts."""
    return [
        {"instruction": f"Repeat the word {times}.", "input": word, "output": " ".join([word] * n)}
        for word in TOY_WORDS
        for times, n in TOY_COUNTS.items()
    ]


def training_model(recipe):
    """The model `finetune train` builds from a recipe, on CPU (placement resolved once, as set-up does)."""
    from finetune.model import attach_lora, load_base_model, resolve

    placement = resolve(recipe.quantization)
    return attach_lora(load_base_model(recipe.model, recipe.quantization, "cpu", placement), recipe, placement)


def load_base(model, quantization, device="cpu"):
    """`load_base_model` with the placement resolved from `quantization`."""
    from finetune.model import load_base_model, resolve

    return load_base_model(model, quantization, device, resolve(quantization))


# ------------------------------------------------------------------ the one recipe and data builder
# Every test that trains through the CLI builds its recipe here: the defaults below, then what the test changes.

FORMATS = {"sft": "alpaca", "grpo": "alpaca", "dpo": "preference", "orpo": "preference", "simpo": "preference",
           "reward": "preference", "kto": "feedback"}


def alpaca_rows(n: int) -> list[dict]:
    """Repeat-a-word instructions, 16 words x 4 counts (see toy_alpaca_rows)."""
    rows = [{"instruction": f"Repeat the word {times}.", "input": word, "output": " ".join([word] * k)}
            for word in TOY_WORDS for times, k in TOY_COUNTS.items()]
    return [rows[i % len(rows)] for i in range(n)]


def prompt_rows(n: int) -> list[dict]:
    """GRPO's prompts: say a word twice (the output is the reference the rewards compare with)."""
    return [{"instruction": "Say the word twice.", "input": TOY_WORDS[i % 16],
             "output": f"{TOY_WORDS[i % 16]} {TOY_WORDS[i % 16]}"} for i in range(n)]


def preference_rows(n: int) -> list[dict]:
    """Repeat-a-word pairs: chosen repeats it, rejected names another word. Three record shapes."""
    rows = []
    for i in range(n):
        word, other = TOY_WORDS[i % 16], TOY_WORDS[(i + 5) % 16]
        prompt, chosen, rejected = f"Repeat the word twice. {word}", f"{word} {word}", f"{other}"
        if i % 3 == 0:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif i % 3 == 1:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:  # full conversations sharing the prompt turn
            user = {"role": "user", "content": prompt}
            rows.append({"chosen": [user, {"role": "assistant", "content": chosen}],
                         "rejected": [user, {"role": "assistant", "content": rejected}]})
    return rows


def feedback_rows(n: int) -> list[dict]:
    """Repeat-a-word answers: the desirable one repeats the word, the undesirable one names another word."""
    rows = []
    for i in range(n):
        word, other = TOY_WORDS[i % 16], TOY_WORDS[(i + 5) % 16]
        good = i % 2 == 0
        prompt = f"Repeat the word twice. {word}"
        if i % 4 == 1:
            prompt = [{"role": "user", "content": prompt}]
        rows.append({"prompt": prompt, "completion": f"{word} {word}" if good else other, "label": good})
    return rows


ROWS = {"sft": alpaca_rows, "grpo": prompt_rows, "preference": preference_rows, "feedback": feedback_rows}


def task_data(directory, objective: str = "sft", train: int = 24, eval: int = 6) -> Path:
    """`directory` with train.jsonl and eval.jsonl of the data `objective` trains on."""
    rows = ROWS.get(objective) or ROWS[FORMATS.get(objective, "sft")]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(directory / "train.jsonl", rows(train))
    write_jsonl(directory / "eval.jsonl", rows(eval))
    return directory


GRPO_DEFAULTS = {"group_size": 4, "max_new_tokens": 8, "generation_batch_size": 3, "samples_steps": 2}
GRPO_REWARDS = [{"function": "contains", "weight": 1.0}, {"function": "format", "pattern": r"regex:\w+ \w+",
                                                        "weight": 0.5}]


def recipe_file(directory, model_dir, data_dir, name: str = "run", objective: str = "sft", *, method: str = "lora",
                quantization: dict | None = None, lora: dict | None = None, data: dict | None = None,
                sections: dict | None = None, **training) -> Path:
    """A recipe (JSON is YAML) for a few-step run of `objective` with adapter `method` on `model_dir`, written to
    `directory/<name>.yaml`, output in `directory/runs/<name>`. Defaults: a float base (compute dtype auto: the
    dtype leg decides), LoRA r 4 on q/v with dropout, 32-token alpaca rows or 48-token pairs, 6 steps of 4 x 2
    (2 x 2 for pairs), lr 1e-2, AdamW. `quantization`, `lora`, `data` update their sections, `sections` adds
    others (kto, simpo, grpo, rewards, a method's own section), keyword arguments update `training`."""
    directory = Path(directory)
    fmt = FORMATS.get(objective, "alpaca")  # (a toy objective of test_objectives trains on alpaca rows)
    pairs = fmt != "alpaca"
    run = {"objective": objective, "max_steps": 6, "micro_batch_size": 2 if pairs else 4,
           "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "warmup_steps": 1, "logging_steps": 1,
           "optimizer": "adamw_torch", "gradient_checkpointing": False, "seed": 7}
    if objective == "grpo":  # a step is one generation batch of prompts x group_size answers
        run.update(micro_batch_size=2, gradient_accumulation_steps=1, max_steps=4)
    body = {
        "name": name,
        "output_dir": str(directory / "runs" / name),
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"load_in_4bit": False, **(quantization or {})},
        "data": {"train": str(Path(data_dir) / "train.jsonl"), "eval": str(Path(data_dir) / "eval.jsonl"),
                 "format": fmt, "max_length": 48 if pairs else 32, **(data or {})},
        "training": {**run, **training},
    }
    if method == "lora":
        body["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], **(lora or {})}
    else:
        body["adapter"] = {"method": method}
    if objective == "grpo":
        body["grpo"], body["rewards"] = dict(GRPO_DEFAULTS), GRPO_REWARDS
    for key, value in (sections or {}).items():
        body[key] = {**body[key], **value} if isinstance(body.get(key), dict) else value
    path = directory / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))
    return path
