"""The recipe's PEFT method: `adapter.method` and one section per method besides `lora` (ia3, adalora,
prompt_tuning, prefix_tuning, p_tuning), with `check_method`, which refuses what the chosen method cannot honour.
Like schema.py, this imports neither torch nor transformers.

What each method trains (the frozen base W is never changed):
- lora:          y = W x + s B A x (recipe/lora.py)
- ia3:           y = l * (W x) for the attention keys/values, y = W (l * x) for the feed-forward output: one
                 learned vector l per adapted layer (T-Few, arXiv 2205.05638)
- adalora:       y = W x + (alpha / r) P diag(E) Q x, an SVD-shaped LoRA whose least important singular values
                 E are zeroed during training until the average rank is target_r (arXiv 2303.10512)
- prompt_tuning: n trainable embeddings prepended to every input (arXiv 2104.08691)
- prefix_tuning: n trainable key/value vectors prepended in every layer's attention (arXiv 2101.00190)
- p_tuning:      n prepended embeddings produced by a small MLP or LSTM encoder (arXiv 2103.10385)
- adamix:        M LoRA modules per layer (the lora section's shape), one A and one B drawn at random per forward
                 in training, averaged into one LoRA for evaluation and checkpoints (arXiv 2205.12410)
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from finetune.recipe.section import KeyedError, Section

METHODS = ("lora", "ia3", "adalora", "prompt_tuning", "prefix_tuning", "p_tuning", "adamix")
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")  # the adapter is extra input
MERGEABLE_METHODS = ("lora", "ia3", "adalora", "adamix")  # the adapter is a weight change
LORA_SECTION_METHODS = ("lora", "adamix")  # the methods whose layers the lora section shapes
Method = Literal[METHODS]  # type: ignore[valid-type]


class AdapterSection(Section):
    method: Method = Field(
        "lora", description="PEFT method: lora (the lora section), ia3, adalora, prompt_tuning, prefix_tuning or "
        "p_tuning (each its own section of the same name), or adamix (a mixture of LoRA modules shaped by the lora "
        "section, its adamix section). ia3/adalora/adamix merge into the base like LoRA; the virtual-token "
        "methods (prompt, prefix, p-tuning) are extra input, run unmerged by chat and eval.",
    )


class IA3Section(Section):
    target_modules: list[str] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
        description="Layers whose activations get a learned scale: outputs of attention layers, inputs of "
        "feedforward_modules.",
    )
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"], description="Which target_modules are feed-forward layers (their "
        "input is scaled, y = W (l * x), instead of their output); a subset of target_modules.",
    )

    @model_validator(mode="after")
    def _subset(self) -> "IA3Section":
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if extra:
            raise ValueError(f"feedforward_modules {extra} are not in target_modules {self.target_modules}; "
                             "a feed-forward module must also be a target")
        return self


ScheduleSteps = Union[int, float]


class AdaLoraSection(Section):
    init_r: int = Field(12, ge=1, description="Rank every adapted layer starts with.")
    target_r: int = Field(8, ge=1, description="Average rank left after the budget schedule (the total budget is "
                          "target_r x adapted layers, re-allocated by importance).")
    alpha: float = Field(32, gt=0, description="Scale numerator: the update is (alpha / init_r) P diag(E) Q.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Union[str, list[str]] = Field(
        "all-linear", description="`all-linear`, or a list of module names such as [q_proj, v_proj].")
    tinit: ScheduleSteps = Field(0.1, ge=0, description="Warm-up before any rank is pruned: steps (an integer) "
                                 "or a share of the run's total optimizer steps (a number below 1).")
    tfinal: ScheduleSteps = Field(0.2, ge=0, description="Final steps trained with the ranks fixed (steps, or a "
                                  "share of the total).")
    deltaT: int = Field(1, ge=1, description="Steps between two re-allocations during the budget schedule.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance (sensitivity) scores.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of their uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality penalty ||P^T P - I|| + "
                                   "||Q Q^T - I|| added to the loss that trains.")

    @model_validator(mode="after")
    def _ranks(self) -> "AdaLoraSection":
        if self.target_r > self.init_r:
            raise ValueError(f"target_r {self.target_r} is above init_r {self.init_r}: AdaLoRA only prunes ranks")
        for key in ("tinit", "tfinal"):
            value = getattr(self, key)
            if isinstance(value, float) and not value.is_integer() and value >= 1:
                raise ValueError(f"{key} {value}: write whole steps or a share below 1")
        return self

    def schedule(self, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) in optimizer steps for a run of `total_steps`."""
        def steps(v: ScheduleSteps) -> int:
            return round(v * total_steps) if isinstance(v, float) and v < 1 else int(v)
        return steps(self.tinit), steps(self.tfinal)


class PromptTuningSection(Section):
    num_virtual_tokens: int = Field(20, ge=1, description="Trainable embeddings prepended to every input.")
    init: Literal["random", "text"] = Field("random", description="random, or text: start from the embeddings "
                                            "of init_text's tokens (repeated or cut to num_virtual_tokens).")
    init_text: Optional[str] = Field(None, description="With init text: e.g. 'Extract the name, age and city'.")

    @model_validator(mode="after")
    def _text(self) -> "PromptTuningSection":
        if (self.init == "text") != bool(self.init_text):
            raise ValueError("init text needs init_text (the words the soft prompt starts from), and init_text "
                             "needs init text")
        return self


class PrefixTuningSection(Section):
    num_virtual_tokens: int = Field(20, ge=1, description="Trainable key/value positions prepended in every layer.")
    projection: bool = Field(False, description="Produce the prefixes with a two-layer MLP from n embeddings "
                             "(trains more parameters, often more stably) instead of training them directly.")
    encoder_hidden_size: int = Field(256, ge=1, description="Hidden width of that MLP (with projection).")


class PTuningSection(Section):
    num_virtual_tokens: int = Field(20, ge=1, description="Prepended embeddings produced by the encoder.")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="The prompt encoder: an MLP, or a bidirectional "
                                            "LSTM followed by an MLP.")
    encoder_hidden_size: int = Field(256, ge=1, description="Hidden width of the encoder.")


# --- AdaMix (model/adamix.py; its checks across sections: recipe/qmethods.py)
class AdaMixSection(Section):
    num_adapters: int = Field(4, ge=2, le=32, description="LoRA modules (experts) per adapted layer, each of the lora "
                              "section's rank: training draws one A and one B per forward, checkpoints average them.")
    consistency_weight: float = Field(
        1.0, ge=0, le=100, description="Weight of AdaMix's consistency term (training.objective sft): each micro "
        "batch runs a second forward with other random routes and adds this times the symmetric KL divergence "
        "of the two next-token distributions, per labelled token. 0 turns it off (and the second forward).",
    )
# --- end AdaMix


METHOD_SECTIONS = {"lora": None, "ia3": IA3Section, "adalora": AdaLoraSection, "prompt_tuning": PromptTuningSection,
                   "prefix_tuning": PrefixTuningSection, "p_tuning": PTuningSection, "adamix": AdaMixSection}
LORA_ONLY = {  # lora keys with no meaning for the other methods, and why
    "use_dora": "DoRA rescales the rows of W + s B A, a LoRA update",
    "use_rslora": "rsLoRA rescales a LoRA update by alpha / sqrt(r)",
    "init": "PiSSA/OLoRA/gaussian initialise LoRA's B and A",
    "rank_pattern": "per-module ranks are LoRA's", "alpha_pattern": "per-module alphas are LoRA's",
    "layers": "per-layer targeting is set in the method's own target_modules",
    "use_iec": "IEC connects LoRA's A and B", "loftq_iter": "LoftQ initialises LoRA's B and A",
}


def check_method(recipe) -> None:
    """Refuse (naming the key) a section written for another method than `adapter.method`, and the settings the
    chosen method cannot honour. A section of another method left at its defaults (e.g. the quickstart's `lora`,
    or a saved recipe.yaml) is not an error: it changes nothing."""
    method = recipe.adapter.method
    for other, cls in METHOD_SECTIONS.items():
        if other == method or (other == "lora" and method in LORA_SECTION_METHODS):
            continue
        section = getattr(recipe, other)
        default = section.__class__()
        changed = [k for k in type(section).model_fields if getattr(section, k) != getattr(default, k)]
        if changed:
            why = f" ({LORA_ONLY[changed[0]]})" if other == "lora" and changed[0] in LORA_ONLY else ""
            raise KeyedError(f"{other}.{changed[0]}", f"{other}.{changed[0]} is a setting of adapter.method {other}"
                             f"{why}, but adapter.method is {method}; remove the {other} section or set "
                             f"adapter.method {other}")
    if method != "lora" and recipe.training.objective == "reward":
        raise KeyedError("adapter.method", f"adapter.method {method} cannot train a reward model: its score head is "
                         "trained and saved beside LoRA adapters only (PEFT's sequence-classification wiring); use "
                         "adapter.method lora with training.objective reward")
    if method == "adalora" and recipe.training.max_steps and (why := check_adalora_schedule(
            recipe.adalora, recipe.training.max_steps)):
        raise KeyedError("adalora.tinit", why)
    if method not in VIRTUAL_TOKEN_METHODS:
        return
    t, data = recipe.training, recipe.data
    if data.packing or t.padding_free:
        key = "data.packing" if data.packing else "training.padding_free"
        raise KeyedError(key, f"{key} cannot be combined with adapter.method {method}: the virtual tokens are "
                         "prepended once per row, not per example, so the examples sharing a row would not each "
                         "get them (and PEFT drops the position ids that keep them apart); use padded batches "
                         "(the default)")
    if method == "prefix_tuning" and t.gradient_checkpointing:
        raise KeyedError("training.gradient_checkpointing", "training.gradient_checkpointing cannot be combined "
                         "with adapter.method prefix_tuning: the prefixes live in the attention cache, which "
                         "recomputing a layer would extend a second time (PEFT refuses it); set "
                         "training.gradient_checkpointing false")


def check_adalora_schedule(section: AdaLoraSection, total_steps: int) -> str | None:
    """Why AdaLoRA's budget schedule does not fit a run of `total_steps` (None: it fits)."""
    tinit, tfinal = section.schedule(total_steps)
    if tinit < total_steps - tfinal:
        return None
    return (f"adalora.tinit ({tinit} steps) + adalora.tfinal ({tfinal} steps) leave no budget phase in a run of "
            f"{total_steps} optimizer steps (AdaLoRA prunes ranks between step tinit and total - tfinal); lower "
            "them or train longer")
