"""The recipe: one YAML file that says what to fine-tune, on what, and how.

This module is the schema: every section, key, type, default and description (the README's
recipe table is generated from it). Unknown keys are errors, never silently ignored: a typo in
a hyper-parameter must not train the wrong thing. Reading a file, overrides and the errors that
name file:line:key are in recipe_file.py (`load_recipe`).

This module imports neither torch nor transformers, so `finetune validate` and
the error paths of every verb answer in well under a second.
"""

from __future__ import annotations

import difflib
import glob
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import ConfigDict, Field, field_validator, model_validator

from finetune.recipe.grpo import GRPOSection, RewardSpec, check_extractor, check_grpo
from finetune.recipe.lora import LoraSection, check_lora_init
from finetune.recipe.quantized import check_quantized
from finetune.recipe.section import PathText, Section
from finetune.recipe.methods import (
    METHOD_SECTIONS, AdaLoraSection, AdapterSection, IA3Section, PrefixTuningSection, PromptTuningSection,
    PTuningSection, check_method,
)
from finetune.recipe.preference import (
    FEEDBACK_OBJECTIVES, PAIR_OBJECTIVES, KTOSection, RewardSection, SimPOSection, check_preference,
)


class ModelSection(Section):
    name_or_path: PathText = Field(description="Hub id or local directory of the base model.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model.")


DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


class QuantizationSection(Section):
    load_in_4bit: bool = Field(True, description="Quantize the frozen base to 4 bit (QLoRA); false = plain LoRA.")
    quant_type: Literal["nf4", "fp4", "gguf"] = Field(
        "nf4", description="4-bit data type; gguf (a .gguf model only): keep the file's own quantized tensors "
        "(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) as the frozen base, dequantized per forward "
        "(docs/quantized.md).")
    double_quant: bool = Field(True, description="Also quantize the quantization constants (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Matmul dtype: auto = bf16 on capable CUDA, fp16 on older CUDA; on CPU bf16 where it has AVX512_BF16/AMX, else fp32."
    )
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype the packed 4-bit codes are stored in: auto = the compute dtype under FSDP or "
        "DeepSpeed ZeRO-3 (so quantized weights shard), uint8 otherwise."
    )

    # --- GGUF base (quant_type gguf; finetune/model/gguf_base.py, docs/quantized.md)
    cache_dequantized: Union[bool, Literal["auto"]] = Field(
        "auto", description="quant_type gguf: keep each layer's dequantized weight between forwards (faster, the "
        "memory of a float model); auto = where `finetune plan` predicts the run still fits with it (same numbers "
        "either way).")
    # --- end GGUF base

    @field_validator("compute_dtype", "quant_storage", mode="before")
    @classmethod
    def _alias(cls, v: Any) -> Any:
        return DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v


DATA_FORMATS = ("alpaca", "chat", "sharegpt", "completion", "text", "preference", "feedback")
# The field names each format reads; `fields` in the recipe maps these to the data's own column names.
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "role", "content"),
    "sharegpt": ("conversations", "from", "value"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "feedback": ("prompt", "completion", "label"),
}
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
TEMPLATE_NAMES = ("chatml", "llama-3", "alpaca", "none")
DataFormat = Literal[DATA_FORMATS]  # type: ignore[valid-type]


class DatasetSpec(Section):
    path: PathText = Field(
        description="A .jsonl/.json/.csv/.parquet file, a directory of them, a glob pattern, or a hub dataset id."
    )
    format: Optional[DataFormat] = Field(None, description="Record shape; defaults to data.format.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Format field -> column in this data, e.g. {prompt: question, completion: answer}.",
    )
    name: Optional[str] = Field(None, description="Hub dataset configuration (subset) name.")
    split: str = Field("train", description="Hub split, slicing allowed (e.g. train[:1000]); ignored for local files.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    weight: Optional[float] = Field(
        None, gt=0, description="Mixing weight: use round(weight x records) examples (repeated or subsampled)."
    )
    num_samples: Optional[int] = Field(None, ge=1, description="Use exactly this many examples (repeated or subsampled).")

    @model_validator(mode="after")
    def _one_size(self) -> "DatasetSpec":
        if self.weight is not None and self.num_samples is not None:
            raise ValueError("give either weight or num_samples, not both")
        return self


class DataSection(Section):
    datasets: list[DatasetSpec] = Field(
        default_factory=list, description="Training datasets, concatenated; each may set its own format and fields."
    )
    train: list[PathText] = Field(
        default_factory=list, description="Shorthand for datasets: file(s), directories or globs read with data.format."
    )
    eval: Optional[Union[PathText, list[DatasetSpec]]] = Field(
        None, description="Held-out data: a path (read like the training data) or a list of datasets."
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Without `eval`: fraction of each training dataset held out (fixed seed)."
    )
    format: DataFormat = Field(
        "alpaca",
        description="alpaca: instruction/input/output; chat: messages (role/content); sharegpt: conversations "
        "(from/value); completion: prompt/completion; text: raw text; preference: prompt/chosen/rejected "
        "(for training.objective dpo, orpo, simpo or reward); feedback: prompt/completion/label, one answer "
        "marked good (true) or bad (false) (for training.objective kto).",
    )
    fields: dict[str, str] = Field(default_factory=dict, description="Field re-mapping for `train` and `eval` files.")
    template: Optional[str] = Field(
        None, description="chatml, llama-3, alpaca, a Jinja chat template, or none (plain prompt text, no chat "
        "template); default: the tokenizer's own chat template.",
    )
    train_on: Literal["completion", "all"] = Field(
        "completion", description="completion: loss on responses (every assistant turn) only; all: on every token."
    )
    max_length: int = Field(1024, ge=8, description="Tokens per example (and per packed row).")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="Examples over max_length: cut or skip.")
    packing: bool = Field(False, description="Concatenate examples into rows of max_length (attention kept apart).")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="A malformed record: stop before training (listing them), or skip it and count it."
    )

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _legacy_chat_template(cls, v: Any) -> Any:
        """`chat_template` (older recipes) is the same thing as `template`."""
        if isinstance(v, dict) and "chat_template" in v:
            v = dict(v)
            if v.get("template") is not None:
                raise ValueError("give either template or chat_template (its older name), not both")
            v["template"] = v.pop("chat_template")
        return v

    @field_validator("template")
    @classmethod
    def _template(cls, v: Optional[str]) -> Optional[str]:
        if v is None or v in TEMPLATE_NAMES or "{{" in v or "{%" in v:
            return v
        close = difflib.get_close_matches(v, TEMPLATE_NAMES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"must be one of {', '.join(TEMPLATE_NAMES)} or a Jinja template string.{hint}")

    @model_validator(mode="after")
    def _datasets(self) -> "DataSection":
        if not (self.train or self.datasets):
            raise ValueError("name the training data: `train` (files) or `datasets` (a list of sources)")
        specs = [("data", self.format, self.fields)] + [
            (f"datasets[{i}]", d.format or self.format, d.fields) for i, d in enumerate(self.datasets)
        ]
        if isinstance(self.eval, list):
            specs += [(f"eval[{i}]", d.format or self.format, d.fields) for i, d in enumerate(self.eval)]
        for where, fmt, fields in specs:
            unknown = sorted(set(fields) - set(FORMAT_FIELDS[fmt]))
            if unknown:
                raise ValueError(
                    f"{where}.fields: '{unknown[0]}' is not a field of format '{fmt}' (its fields: "
                    f"{', '.join(FORMAT_FIELDS[fmt])}); map those names to your columns, e.g. {{prompt: question}}"
                )
        return self

    @property
    def train_datasets(self) -> list[DatasetSpec]:
        """Every training source with its format and field mapping resolved."""
        return [DatasetSpec(path=f, format=self.format, fields=self.fields) for f in self.train] + [
            self._resolve(d) for d in self.datasets
        ]

    @property
    def eval_datasets(self) -> list[DatasetSpec]:
        """Held-out sources; an eval path is read like the training data when all of it has one shape."""
        if isinstance(self.eval, list):
            return [self._resolve(d) for d in self.eval]
        if not self.eval:
            return []
        shapes = {(d.format, tuple(sorted(d.fields.items()))) for d in self.train_datasets}
        fmt, fields = next(iter(shapes)) if len(shapes) == 1 else (self.format, tuple(self.fields.items()))
        return [DatasetSpec(path=self.eval, format=fmt, fields=dict(fields))]

    def _resolve(self, d: DatasetSpec) -> DatasetSpec:
        fields = d.fields if (d.fields or d.format) else self.fields
        return d.model_copy(update={"format": d.format or self.format, "fields": fields})

    @property
    def chat_template(self) -> Optional[str]:
        """The Jinja chat template to install on the tokenizer, or None to keep the tokenizer's own."""
        from finetune.recipe.templates import BUILTIN

        if self.template in (None, "none"):
            return None
        return BUILTIN.get(self.template, self.template)


def data_files(path: str) -> Optional[list[Path]]:
    """The local data files a dataset path names (possibly none), or None when it names a hub dataset.

    A directory means every data file under it; a pattern with * ? or [ is a glob. A path that
    does not exist is taken for a hub id (org/name) unless it looks like a file path.
    """
    p = Path(path).expanduser()
    if any(c in path for c in "*?["):
        hits = (Path(f) for f in glob.glob(str(p), recursive=True))
        return sorted(f for f in hits if f.is_file() and f.suffix.lower() in DATA_EXTENSIONS)
    if p.is_dir():
        return sorted(
            f for f in p.rglob("*")
            if f.is_file() and f.suffix.lower() in DATA_EXTENSIONS
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
    if p.is_file():
        return [p]
    if p.suffix.lower() in DATA_EXTENSIONS or path.startswith((".", "/", "~")) or path.count("/") > 1:
        return []
    return None


SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
# Training objectives: recipe name -> "module:class" of its implementation (finetune/objectives/base.py), so the
# schema stays torch-free. A new objective is one class there and one entry here.
OBJECTIVES = {"sft": "finetune.objectives.base:SFT", "dpo": "finetune.objectives.base:DPO", "orpo": "finetune.objectives.base:ORPO",
              "grpo": "finetune.objectives.grpo:GRPO", "kto": "finetune.objectives.kto:KTO",
              "simpo": "finetune.objectives.simpo:SimPO", "reward": "finetune.objectives.reward:RewardModel"}
PREFERENCE_OBJECTIVES = PAIR_OBJECTIVES + FEEDBACK_OBJECTIVES  # these read data.format preference / feedback only
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch")


class TrainingSection(Section):
    objective: str = Field(
        "sft", description="What the loss is: sft = next-token cross-entropy on the trained (response) tokens; "
        "dpo / orpo = preference losses on prompt/chosen/rejected pairs (settings in the dpo / orpo sections); "
        "grpo = reinforcement learning from the `rewards` of sampled answers to the data's prompts (the grpo "
        "section); kto = KTO on answers marked good or bad (data.format feedback; the kto section); simpo = "
        "SimPO, reference-free, on pairs (the simpo section); reward = a reward model (a scalar score head) "
        "trained on pairs with the Bradley-Terry loss (the reward section).",
    )
    epochs: int = Field(1, ge=1, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps to run; overrides epochs.")
    micro_batch_size: int = Field(4, ge=1, description="Examples per forward pass, per process.")
    gradient_accumulation_steps: int = Field(4, ge=1, description="Micro batches per optimizer step.")
    padding_free: bool = Field(
        False, description="Feed each micro batch as one row without padding (examples kept apart by position "
        "ids): the same loss, no compute spent on padding. With SDPA each example attends only over itself "
        "(finetune/model/attention.py), as with packing.",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming up linearly.")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warm-up steps; overrides warmup_ratio.")
    scheduler: Literal[SCHEDULERS] = Field("cosine", description="Decay after warm-up.")  # type: ignore[valid-type]
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    optimizer: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]
        "paged_adamw_32bit", description="paged_* come from bitsandbytes (paging needs CUDA)."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for initialisation, dropout and shuffling.")
    logging_steps: int = Field(10, ge=1, description="Optimizer steps between metric lines.")
    eval_steps: Optional[int] = Field(None, ge=1, description="Steps between eval-loss passes (always at the end).")
    eval_generate_steps: Optional[int] = Field(
        None, ge=1, description="Steps between generation metrics (exact_match, contains) on a few eval examples; "
        "off by default (generation is slow). Also at the end when set."
    )
    eval_generate_examples: int = Field(16, ge=1, description="Eval examples generated for those metrics.")
    eval_max_new_tokens: int = Field(128, ge=1, description="Length limit for those generations.")
    eval_extract: str = Field(
        "none", description="Answer extractor for exact_match: none, last_number (GSM8K '#### 42') or regex:PATTERN."
    )

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str) -> str:
        if v in OBJECTIVES:
            return v
        close = difflib.get_close_matches(v, OBJECTIVES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown objective; expected one of {', '.join(OBJECTIVES)}.{hint}")

    @field_validator("eval_extract")
    @classmethod
    def _extractor(cls, v: str) -> str:
        return check_extractor(v)
    save_steps: Optional[int] = Field(None, ge=1, description="Steps between checkpoints (always at the end).")
    save_total_limit: Optional[int] = Field(
        None, ge=1, description="Keep only the newest K step checkpoints (older ones deleted after a save)."
    )
    keep_best: bool = Field(False, description="With save_total_limit: also keep the checkpoint with the best eval loss.")
    nan_policy: Literal["stop", "skip_step"] = Field(
        "stop", description="On a NaN/inf loss or gradient: stop (last checkpoint intact) or skip that step."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers (via accelerate); each needs its package."
    )


class DPOSection(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference (the base model).")
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO (arXiv 2305.18290); ipo: IPO's squared loss on mean token "
        "log-probabilities (arXiv 2310.12036).",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Conservative DPO: the assumed share of flipped preference labels."
    )
    precompute_reference: bool = Field(
        False, description="Compute the reference log-probabilities once before training (cached) instead of "
        "one adapter-disabled forward per micro batch.",
    )


class ORPOSection(Section):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float = Field(
        0.1, alias="lambda", ge=0, description="Weight of the odds-ratio term added to the chosen answer's "
        "SFT loss (arXiv 2403.07691).",
    )


class Recipe(Section):
    name: Optional[PathText] = Field(None, description="Run name; defaults to the recipe file's name.")
    output_dir: Optional[PathText] = Field(None, description="Run directory; defaults to runs/<name>.")
    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    ia3: IA3Section = Field(default_factory=IA3Section)
    adalora: AdaLoraSection = Field(default_factory=AdaLoraSection)
    prompt_tuning: PromptTuningSection = Field(default_factory=PromptTuningSection)
    prefix_tuning: PrefixTuningSection = Field(default_factory=PrefixTuningSection)
    p_tuning: PTuningSection = Field(default_factory=PTuningSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    orpo: ORPOSection = Field(default_factory=ORPOSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    kto: KTOSection = Field(default_factory=KTOSection)
    simpo: SimPOSection = Field(default_factory=SimPOSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    rewards: list[RewardSpec] = Field(default_factory=list, description="GRPO's rewards, summed with their "
                                      "weights: a list of {function: NAME, weight: W, ...options}.")

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.data.eval and self.data.eval_fraction:
            raise ValueError("give either data.eval or data.eval_fraction, not both")
        formats = {d.format for d in self.data.train_datasets + self.data.eval_datasets}
        check_preference(self, formats)
        check_method(self)
        check_lora_init(self.lora, self.quantization.load_in_4bit)
        check_quantized(self)
        if self.training.objective == "grpo" or self.rewards:
            check_grpo(self, formats)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or Path("runs") / (self.name or "run"))

    def to_yaml(self) -> str:
        """The resolved recipe, with only the chosen method's section (a LoRA run's reads as before)."""
        unused = {m for m in METHOD_SECTIONS if m != self.adapter.method} | ({"adapter"} if self.adapter.method ==
                                                                             "lora" else set())
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True, exclude=unused), sort_keys=False)
