"""What `finetune eval` prints above each sample: the end of a long prompt behind a marker saying how much is left
out, cut at a boundary (never inside a chat-template token such as <|im_start|>), and any text printed as text."""

from __future__ import annotations

import io
import json

from rich.console import Console

from finetune.evaluate import print_report
from finetune.evaluate.measure import EvalReport

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
INSTRUCTION = "Extract the person's name, age and city as JSON."


def chatml(user: str, system: str = SYSTEM) -> str:
    """A prompt as SmolLM2's chat template renders it for generation (what `tok.decode` gives eval's samples)."""
    return f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def printed(prompt: str, prediction: str = '{"name": "Oliver"}', reference: str = '{"name": "Oliver"}') -> str:
    sample = {"model": "adapter", "index": 0, "prompt": prompt, "reference": reference, "prediction": prediction,
              "correct": prediction == reference}
    report = EvalReport(data="eval.jsonl", examples=1, generated=1, generation={},
                        models={"adapter": {"metrics": {"exact_match": 1.0}}}, samples=[sample])
    out = io.StringIO()
    print_report(report, Console(file=out, width=1000, color_system=None))
    return out.getvalue()


def shown_prompt(text: str) -> str:
    """The prompt lines between the sample rule and the reference line."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if "sample 1" in line) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("reference:"))
    return "\n".join(lines[start:end])


def test_the_demos_third_sample_shows_its_system_turn_whole():
    """The demo's sample 3 (data/quickstart/eval.jsonl line 3) is 305 characters: the old view showed its last 300,
    starting `start|>system`. A cut that would land inside a special token moves to the token's start; here that is
    the very beginning, so the whole prompt is shown and nothing is marked as left out."""
    with open("data/quickstart/eval.jsonl", encoding="utf-8") as f:
        record = json.loads(f.readlines()[2])
    prompt = chatml(f"{record['instruction']}\n\n{record['input']}")
    assert 300 < len(prompt) < 300 + len("<|im_start|>")  # the old cut fell inside the first <|im_start|>
    assert shown_prompt(printed(prompt)) == prompt


def test_a_long_prompt_shows_its_end_after_a_marker_and_never_a_cut_token():
    """A long system turn: the last 300 characters would start inside its <|im_end|>; the view starts at that token
    and says exactly how many characters come before it."""
    system = "<|im_start|>system\n" + "Answer briefly. " * 30 + "<|im_end|>\n"
    after_user = len(chatml("", system="")) - len("<|im_start|>user\n")  # the template's characters after the user text
    user = f"{INSTRUCTION}\n\n" + "Lena, 29, teacher, Oslo. " * 10
    user = user[: 300 - len("<|im_end|>\n<|im_start|>user\n") - after_user + 4]  # the cut: 4 characters into <|im_end|>
    prompt = chatml(user, system=system)
    cut = len(prompt) - 300
    end_of_system = prompt.index("<|im_end|>")
    assert end_of_system < cut < end_of_system + len("<|im_end|>")
    assert shown_prompt(printed(prompt)) == f"[… {end_of_system} characters before] {prompt[end_of_system:]}"


def test_a_long_prompt_without_lines_or_tokens_is_cut_at_a_space():
    words = " ".join(f"word{i:03d}" for i in range(80))  # 639 characters, no newline, no special token
    shown = shown_prompt(printed(words))
    cut = len(words) - 300
    assert words[cut - 1] != " "  # the last 300 characters would start inside a word
    first = words.index(" ", cut) + 1  # the view starts at the next word
    assert shown == f"[… {first} characters before] {words[first:]}"


def test_text_that_looks_like_rich_markup_is_printed_as_it_is():
    """Mistral's and Llama 2's templates put [/INST] in every prompt; rich read it as a closing tag and raised
    MarkupError after the whole evaluation (and before --json was written)."""
    prompt = "<s>[INST] " + "Lena, 29, teacher, Oslo. " * 20 + "[/INST]"
    text = printed(prompt, prediction="[/bold] [red]x", reference="[b]")
    assert shown_prompt(text).endswith("Oslo. [/INST]")
    assert "reference: [b]" in text and "adapter: ✗ [/bold] [red]x" in text
