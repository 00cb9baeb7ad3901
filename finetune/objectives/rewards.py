"""GRPO's rewards: the recipe's `rewards:` list, each a built-in or your own `module:function`, summed with weights.

Every reward is called once per step with the step's texts and returns one number per completion:

    f(prompts: list[str], completions: list[str], references: list[str], **options) -> list[float]

where `prompts[i]` is the prompt as the model saw it (chat template and special tokens included), `completions[i]`
the sampled answer (special tokens removed, stripped) and `references[i]` the answer the data holds for that
prompt (the completion of a completion record, the output of an alpaca record, the last assistant turn of a chat).
The total reward of a completion is sum_k weight_k * f_k(...)[i].

Built-ins (options in the recipe next to `function`):
- exact_match: 1 if the answer extracted from the completion equals the one extracted from the reference,
  with `extract` none (the stripped text), last_number or regex:PATTERN, exactly as `finetune eval` scores.
- contains: 1 if the completion contains `text` (default: the extracted reference; case-insensitive, with
  last_number: as one of its numbers).
- format: 1 if the whole stripped completion matches `pattern` (a regular expression, `regex:` optional).
- length: -(characters beyond `limit`) / limit, at least -1: a penalty for rambling.
- reward_model: the score of a reward model trained by finetune (`path`: its checkpoint; training.objective reward)
  for prompt + completion, `batch_size` sequences at a time, no gradients (reward.py).

A `module:function` (or `path/to/file.py:function`) reward runs your own Python code in the training
process: it is imported from the current directory or sys.path when training starts. A reward that raises,
or returns anything but one finite number per completion, stops training with an error naming the reward
and the example.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from finetune.errors import FinetuneError, RecipeError
from finetune.generate import NUMBER, normalize_number, score_example
from finetune.model import check_reward_checkpoint
from finetune.objectives.reward import reward_model
from finetune.recipe import RewardSpec


class RewardError(FinetuneError):
    """A reward function raised or returned something other than one number per completion."""

    exit_code = 2


# ------------------------------------------------------------------------------------------ built-ins


def exact_match(prompts, completions, references, extract="none"):
    return [float(score_example(c, r, extract)["correct"]) for c, r in zip(completions, references)]


def contains(prompts, completions, references, extract="none", text=None):
    if text is None:
        return [float(score_example(c, r, extract)["contains"]) for c, r in zip(completions, references)]
    if extract == "last_number":
        wanted = normalize_number(str(text))
        return [float(wanted in {normalize_number(n) for n in NUMBER.findall(c)}) for c in completions]
    return [float(str(text).lower() in c.lower()) for c in completions]


def format_match(prompts, completions, references, pattern):
    regex = re.compile(pattern.removeprefix("regex:"), re.DOTALL)
    return [float(regex.fullmatch(c.strip()) is not None) for c in completions]


def length(prompts, completions, references, limit=200):
    return [-min(1.0, max(0, len(c) - limit) / limit) for c in completions]


BUILTINS: dict[str, Callable] = {"exact_match": exact_match, "contains": contains, "format": format_match,
                                 "length": length, "reward_model": reward_model}


# ------------------------------------------------------------------------------------------ the set


@dataclass
class Reward:
    name: str  # the metric name: the function, with _2, _3 ... for repeats
    spec: RewardSpec
    index: int  # position in the recipe's rewards list
    fn: Callable


def load_rewards(specs: list[RewardSpec]) -> list[Reward]:
    """The recipe's rewards as callables; a user function that cannot be imported is a RecipeError."""
    out, seen = [], {}
    for i, spec in enumerate(specs):
        fn = BUILTINS.get(spec.function) or _import(spec.function, i)
        if spec.function == "reward_model":  # a path that is no reward model is refused before anything loads
            check_reward_checkpoint(spec.options["path"])
        base = spec.function.rsplit(":", 1)[-1] if spec.function not in BUILTINS else spec.function
        seen[base] = seen.get(base, 0) + 1
        out.append(Reward(base if seen[base] == 1 else f"{base}_{seen[base]}", spec, i, fn))
    return out


def _import(target: str, index: int) -> Callable:
    """`module:function` from sys.path or the current directory, or `path/file.py:function`."""
    module_name, func = target.rsplit(":", 1)
    where = f"rewards[{index}].function '{target}'"
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            spec = importlib.util.spec_from_file_location(f"finetune_reward_{path.stem}", path)
            if spec is None or not path.is_file():
                raise RecipeError(f"{where}: no such file {path}.")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except RecipeError:
        raise
    except Exception as e:  # the user's module failed to import (missing, or raised while importing)
        raise RecipeError(f"{where}: cannot import {module_name} ({type(e).__name__}: {e}). A module is looked "
                          f"up in the current directory ({Path.cwd()}) and on sys.path.") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise RecipeError(f"{where}: module {module_name} has no function '{func}'.")
    return fn


def score(rewards: list[Reward], prompts: list[str], completions: list[str], references: list[str]
          ) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted total per completion, each reward's own values per completion)."""
    each = {r.name: _call(r, prompts, completions, references) for r in rewards}
    totals = [sum(r.spec.weight * each[r.name][i] for r in rewards) for i in range(len(completions))]
    return totals, each


def _call(reward: Reward, prompts, completions, references) -> list[float]:
    options = {k: v for k, v in reward.spec.options.items()}
    try:
        values = reward.fn(prompts=prompts, completions=completions, references=references, **options)
    except Exception as e:
        i = _first_failing(reward, prompts, completions, references, options)
        raise RewardError(f"Reward '{reward.spec.function}' (rewards[{reward.index}]) raised "
                          f"{type(e).__name__}: {e}{_example(i, prompts, completions)}.") from e
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"Reward '{reward.spec.function}' (rewards[{reward.index}]) returned "
                          f"{type(values).__name__}, not a list of numbers (one per completion).") from None
    if len(values) != len(completions):
        raise RewardError(f"Reward '{reward.spec.function}' (rewards[{reward.index}]) returned {len(values)} values "
                          f"for {len(completions)} completions; it must return one number per completion.")
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise RewardError(f"Reward '{reward.spec.function}' (rewards[{reward.index}]) returned {v!r}, not a "
                              f"finite number{_example(i, prompts, completions)}.")
    return [float(v) for v in values]


def _first_failing(reward: Reward, prompts, completions, references, options) -> int | None:
    """The first completion the reward raises on when called on it alone (None if it only fails in bulk)."""
    for i in range(len(completions)):
        try:
            reward.fn(prompts=prompts[i : i + 1], completions=completions[i : i + 1],
                      references=references[i : i + 1], **options)
        except Exception:
            return i
    return None


def _example(i: int | None, prompts, completions) -> str:
    if i is None:
        return ""
    short = lambda s: s if len(s) <= 200 else s[:200] + "..."  # noqa: E731
    return f" on example {i} of the step (prompt: {short(prompts[i])!r}; completion: {short(completions[i])!r})"
