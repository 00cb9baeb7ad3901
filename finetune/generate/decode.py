"""Generation and its scores: batched greedy or sampled completions, answer extraction, exact_match / contains.

Used by `finetune eval`, by training's periodic generation metrics and by `finetune chat`, so the
same prompt gives the same completion everywhere.

- exact_match: the answer extracted from the completion equals the one extracted
  from the reference. Extractors: `none` (the whole stripped text), `last_number`
  (GSM8K style: the number after `####`, else the last number; `1,234.50` -> `1234.5`)
  or `regex:PATTERN` (its first group, else the whole match).
- contains: the (extracted) reference occurs in the completion (with `last_number`:
  as one of its numbers; otherwise as a case-insensitive substring).
- chrf / bleu: corpus scores from sacrebleu, when it is installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

import torch

from finetune.data import prompt_and_reference
from finetune.errors import DataError


# ------------------------------------------------------------- extraction

NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """`1,234.50` -> `1234.5`, `-3.0` -> `-3`, `007` -> `7`: one spelling per value."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return text
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def last_number(text: str) -> str | None:
    """GSM8K-style answer: the first number after the last `####`, else the last number in the text."""
    if "####" in text:
        after = NUMBER.search(text.rsplit("####", 1)[1])
        if after:
            return normalize_number(after.group())
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def make_extractor(spec: str | None) -> Callable[[str], str | None]:
    """`none`/None: stripped text; `last_number`; `regex:PATTERN`: first group (else whole match) of the first match."""
    if spec in (None, "", "none"):
        return lambda text: text.strip()
    if spec == "last_number":
        return last_number
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec.removeprefix("regex:"), re.DOTALL)
        except re.error as e:
            raise DataError(f"Bad answer extractor '{spec}': {e}.") from None

        def extract(text: str) -> str | None:
            m = pattern.search(text)
            if not m:
                return None
            return (m.group(1) if pattern.groups else m.group()).strip()

        return extract
    raise DataError(f"Unknown answer extractor '{spec}': use none, last_number or regex:PATTERN.")


def score_example(prediction: str, reference: str, extractor: str | None) -> dict:
    """Per-example scores: the extracted answers, exact match and contains."""
    extract = make_extractor(extractor)
    predicted = extract(prediction)
    expected = extract(reference)
    if expected is None:  # a reference the pattern does not fit: compare with all of it
        expected = reference.strip()
    if extractor == "last_number":
        contains = expected in {normalize_number(n) for n in NUMBER.findall(prediction)}
    else:
        contains = expected.lower() in prediction.lower()
    return {"extracted": predicted, "expected": expected, "correct": predicted == expected, "contains": contains}


def corpus_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """chrF and BLEU (0-100) via sacrebleu when it is installed; nothing otherwise."""
    try:
        import sacrebleu
    except ImportError:
        return {}
    return {
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
    }


# ------------------------------------------------------------- generation


@dataclass
class GenerationOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0
    extractor: str | None = None  # none, last_number or regex:PATTERN


def generation_kwargs(model, tok, options: GenerationOptions) -> dict:
    """`model.generate` arguments for these options: length, pad/eos ids, greedy or sampling (also `finetune chat`)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tok.eos_token_id} - {None})
    sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p} \
        if options.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"max_new_tokens": options.max_new_tokens, "pad_token_id": pad, "eos_token_id": eos, "use_cache": True,
            **sampling}


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], options: GenerationOptions = GenerationOptions(),
             on_chunk=None) -> list[str]:
    """Completions of token-id prompts, batched with left padding (greedy unless temperature > 0).
    `on_chunk(examples, tokens=generated)` is called after each batch (progress.py's `Task.advance`)."""
    return [tok.decode(ids, skip_special_tokens=True).strip() for ids in generate_ids(model, tok, prompts, options,
                                                                                       on_chunk)]


@torch.no_grad()
def generate_ids(model, tok, prompts: list[list[int]], options: GenerationOptions = GenerationOptions(),
                 on_chunk=None, top_k: int | None = None, stream: Callable[[int], None] | None = None) -> list[list[int]]:
    """The completion token ids of each prompt, up to and including the first end-of-sequence token (all
    `max_new_tokens` of them when there is none), as the model in eval mode (no dropout) gives them.
    `top_k` overrides the model's generation config when sampling (0: no top-k cut; None: its default, often 50).
    `stream(token)` sees each generated token as it comes (one prompt: `finetune chat`).

    Decodes through the lean decode step (decoder.py) with up to `options.batch_size` sequences in flight, a
    finished one's row taken by the next prompt at once; consecutive equal prompts (GRPO's G answers to one prompt)
    share one prefill, its KV cache copied to each; sampled prompt i draws from its own generator seeded by
    (options.seed, i), so completions do not depend on the batch size. Models the lean step does not model go
    through `model.generate` as before (left-padded batches; sampling seeds the global RNG with options.seed:
    callers fork it, torch.random.fork_rng, to keep theirs)."""
    from finetune.generate.decoder import Sequence, lean_decoder

    kwargs = generation_kwargs(model, tok, options)
    if kwargs["do_sample"] and top_k is not None:
        kwargs["top_k"] = top_k
    decoder = lean_decoder(model)
    if decoder is None:
        return _generate_with_model(model, prompts, options, kwargs, on_chunk, stream)
    eos, top_k = frozenset(kwargs["eos_token_id"]), kwargs.get("top_k") or 0
    outputs: list[list[int] | None] = [None] * len(prompts)
    waiting = list(enumerate(prompts))[::-1]
    while waiting or decoder.rows:
        groups, room = [], options.batch_size - len(decoder.rows)
        while waiting and room > 0:
            i, prompt = waiting.pop()
            generator = None
            if options.temperature > 0:
                generator = torch.Generator().manual_seed((options.seed * 1_000_003 + i) % 2**63)
            sequence = Sequence(list(prompt), options.max_new_tokens, eos, decoder.adapter,
                                temperature=options.temperature, top_p=options.top_p, top_k=top_k,
                                generator=generator, index=i, emit=None if stream is None else _streaming(stream))
            if groups and groups[-1][0].prompt == sequence.prompt:
                groups[-1].append(sequence)  # the same prompt again (GRPO's group): one prefill, its cache forked
            else:
                groups.append([sequence])
            room -= 1
        finished = decoder.admit(groups) + decoder.step()
        for s in finished:
            outputs[s.index] = s.tokens
        if on_chunk is not None and finished:
            on_chunk(len(finished), tokens=sum(len(s.tokens) for s in finished))
    return outputs


def _generate_with_model(model, prompts, options: GenerationOptions, kwargs: dict, on_chunk, stream) -> list[list[int]]:
    """`model.generate` on left-padded batches of `options.batch_size` (what the lean step does not model)."""
    device = next(model.parameters()).device
    pad, eos = kwargs["pad_token_id"], set(kwargs["eos_token_id"])
    torch.manual_seed(options.seed)
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(prompts), options.batch_size):
        chunk = prompts[start : start + options.batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        streamer = None if stream is None else _TokenStreamer(stream)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), streamer=streamer, **kwargs)
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            outputs.append(row[:end])
        if on_chunk is not None:
            on_chunk(len(chunk), tokens=int((out[:, width:] != pad).sum()))
    model.train(was_training)
    return outputs


def _streaming(stream):
    def emit(token: int) -> bool:  # a stream only watches: it never ends a sequence
        stream(token)
        return False

    return emit


class _TokenStreamer:
    """A transformers streamer passing each generated token id (not the prompt) to `stream`."""

    def __init__(self, stream):
        self.stream, self.prompt_seen = stream, False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.stream(token)

    def end(self) -> None:
        pass


def generation_metrics(model, tok, records: list, options: GenerationOptions, on_chunk=None) -> tuple[dict, list[dict]]:
    """Generate for each record's prompt and score against its reference: (metrics, per-example samples).

    `records` are data.py Records (raw-text ones, with no prompt/response split, are left out). This is
    what `finetune eval` runs per model; training can call it every `eval_generate_steps` on a small
    subset (on the main process, with the unwrapped model).
    """
    pairs = [prompt_and_reference(r, r.fmt, tok) for r in records if r.fmt != "text"]
    predictions = generate(model, tok, [p for p, _ in pairs], options, **({"on_chunk": on_chunk} if on_chunk else {}))
    samples = [
        {"prompt": tok.decode(p), "reference": ref, "prediction": pred, **score_example(pred, ref, options.extractor)}
        for (p, ref), pred in zip(pairs, predictions)
    ]
    n = max(len(samples), 1)
    metrics = {
        "exact_match": sum(s["correct"] for s in samples) / n,
        "contains": sum(s["contains"] for s in samples) / n,
        **corpus_scores(predictions, [ref for _, ref in pairs]),
    }
    return metrics, samples
