"""Rewards for recipes/grpo_quickstart.yaml: your own reward functions are plain Python like these.

A reward is called with the step's prompts, completions and references (lists of strings, one entry per
sampled answer) and any options given next to it in the recipe, and returns one number per completion.
"""

import json


def _first_object(text: str):
    """The first JSON object in the text (after any ```json fence or words before it), or None."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def json_exact(prompts, completions, references):
    """1 if the whole answer is JSON equal to the reference object (any spacing), else 0."""
    out = []
    for completion, reference in zip(completions, references):
        try:
            out.append(float(json.loads(completion) == json.loads(reference)))
        except json.JSONDecodeError:
            out.append(0.0)
    return out


def json_fields(prompts, completions, references, keys=("name", "age", "city")):
    """The share of the reference's fields that the first JSON object in the answer gets right."""
    out = []
    for completion, reference in zip(completions, references):
        found, wanted = _first_object(completion), json.loads(reference)
        out.append(0.0 if found is None else sum(found.get(k) == wanted.get(k) for k in keys) / len(keys))
    return out
