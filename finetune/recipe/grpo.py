"""The recipe's GRPO settings and rewards (training.objective grpo): the `grpo` section and the `rewards` list.

Part of the schema (recipe.py imports it): like it, this imports neither torch nor transformers. What the
rewards compute is rewards.py; the objective is grpo.py.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal, Optional

from pydantic import ConfigDict, Field, model_validator

from finetune.recipe.section import Section

PROMPT_FORMATS = ("alpaca", "chat", "sharegpt", "completion")  # what GRPO can take prompts (and references) from


def check_extractor(v: str) -> str:
    """An answer extractor: none, last_number or regex:PATTERN (the pattern must compile)."""
    if v in ("none", "last_number"):
        return v
    if v.startswith("regex:"):
        try:
            re.compile(v.removeprefix("regex:"))
        except re.error as e:
            raise ValueError(f"not a valid regular expression ({e})") from None
        return v
    raise ValueError("expected none, last_number or regex:PATTERN")


class GRPOSection(Section):
    group_size: int = Field(8, ge=2, description="G: answers sampled per prompt; each is scored against the others "
                            "of its group (DeepSeekMath, arXiv 2402.03300). A step trains on micro_batch_size x "
                            "gradient_accumulation_steps x processes prompts, G answers each.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the answers.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens whose "
                         "probability reaches top_p.")
    max_new_tokens: int = Field(256, ge=1, description="Length limit of a sampled answer, in tokens.")
    beta: float = Field(0.04, ge=0, description="KL weight: the per-token KL to the reference (the base model, "
                        "adapter off) is added to the loss times beta; 0 = no KL term and no reference forward.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clip range of the probability ratio to the sampling "
                           "policy: [1 - epsilon, 1 + epsilon] (PPO).")
    loss: Literal["grpo", "dr_grpo", "token"] = Field(
        "grpo", description="Loss aggregation: grpo = mean over tokens per answer, then over answers, advantages "
        "divided by the group's std; dr_grpo = sum over tokens / (answers x max_new_tokens), no std division "
        "(Dr. GRPO, arXiv 2503.20783); token = mean over all answer tokens of the step, std division (DAPO, "
        "arXiv 2503.14476).",
    )
    updates_per_generation: int = Field(
        1, ge=1, description="mu: optimizer steps trained on each batch of sampled answers (the ratio is clipped "
        "from the second on). The prompts the loader serves on the reuse steps are not sampled for.",
    )
    generation_batch_size: int = Field(64, ge=1, description="Sequences per generate call (per process), "
                                       "independent of the training micro batch.")
    samples_steps: Optional[int] = Field(10, ge=1, description="Steps between writing every prompt, answer and "
                                         "reward of a step to runs/<name>/samples.jsonl (main process); null = never.")


BUILTIN_REWARDS: dict[str, dict[str, Any]] = {  # name -> its options and their defaults (rewards.py)
    "exact_match": {"extract": "none"},
    "contains": {"extract": "none", "text": None},
    "format": {"pattern": None},
    "length": {"limit": 200},
    "reward_model": {"path": None, "batch_size": 16},
}


class RewardSpec(Section):
    """One reward: a built-in or `module:function`; extra keys are its options."""

    model_config = ConfigDict(extra="allow")
    function: str = Field(description="exact_match (options: extract none / last_number / regex:P), contains (text; "
                          "default the reference), format (pattern: 1 if the whole answer matches the regex), length "
                          "(limit: -(characters over limit) / limit, at most -1), reward_model (path: a reward-model checkpoint; "
                          "its score of prompt + answer), or module:function (your Python, "
                          "imported from the current directory or sys.path, or path/file.py:function; called as "
                          "f(prompts, completions, references, **options) -> one number per completion).")
    weight: float = Field(1.0, description="Multiplier of this reward in the sum.")

    @model_validator(mode="after")
    def _options(self) -> "RewardSpec":
        options = dict(self.model_extra or {})
        name = self.function
        if name in BUILTIN_REWARDS:
            known = BUILTIN_REWARDS[name]
            for key in options:
                if key not in known:
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f" Did you mean '{close[0]}'?" if close else ""
                    raise ValueError(f"reward {name} has no option '{key}'.{hint} Its options: "
                                     f"{', '.join(known) or 'none'}")
            if "extract" in options:
                check_extractor(str(options["extract"]))
            if name == "format":
                if not isinstance(options.get("pattern"), str):
                    raise ValueError("reward format needs pattern: a regular expression the whole answer must match")
                try:
                    re.compile(options["pattern"].removeprefix("regex:"))
                except re.error as e:
                    raise ValueError(f"pattern is not a valid regular expression ({e})") from None
            if name == "reward_model" and not isinstance(options.get("path"), str):
                raise ValueError("reward reward_model needs path: a reward-model checkpoint (training.objective reward)")
            if name == "length" and not (isinstance(options.get("limit", 1), int) and options.get("limit", 1) > 0):
                raise ValueError("reward length: limit must be a positive number of characters")
        elif not re.fullmatch(r"[^:\s]+:[A-Za-z_]\w*", name):
            close = difflib.get_close_matches(name, BUILTIN_REWARDS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown reward function '{name}'.{hint} Use a built-in ({', '.join(BUILTIN_REWARDS)}) "
                             "or module:function for your own")
        return self

    @property
    def options(self) -> dict[str, Any]:
        defaults = BUILTIN_REWARDS.get(self.function, {})
        return {**defaults, **(self.model_extra or {})}


def check_grpo(recipe, formats: set[str]) -> None:
    """GRPO needs prompts with reference answers, rewards, and no eval loss (there is no target to score)."""
    t, data = recipe.training, recipe.data
    if t.objective != "grpo":
        raise ValueError(f"rewards are what training.objective grpo learns from; training.objective is {t.objective}. "
                         "Set training.objective to grpo, or remove the rewards section")
    if not recipe.rewards:
        raise ValueError("training.objective grpo learns from rewards, and the recipe has none: add a rewards "
                         "section, e.g. rewards: [{function: exact_match, extract: last_number}]")
    bad = sorted(formats - set(PROMPT_FORMATS))
    if bad:
        raise ValueError(f"training.objective grpo samples answers to prompts, but data.format {bad[0]} has no "
                         f"prompt/answer split; use one of {', '.join(PROMPT_FORMATS)} (the answer is the reference "
                         "the rewards compare with)")
    if data.packing or data.train_on != "completion":
        raise ValueError("training.objective grpo reads each example's prompt and reference answer: set "
                         "data.packing false and data.train_on completion")
    if t.eval_steps:
        raise ValueError("training.objective grpo has no eval loss (no target to score); drop training.eval_steps "
                         "and use training.eval_generate_steps (exact_match on the eval prompts)")
