"""The recipe sections of the preference objectives beyond DPO/ORPO: `kto`, `simpo` and `reward`, and the check
that each objective gets the data it learns from.

Part of the schema (schema.py imports it): like it, this imports neither torch nor transformers. The losses are
finetune/objectives/kto.py, simpo.py and reward.py.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from finetune.recipe.section import Section

PAIR_OBJECTIVES = ("dpo", "orpo", "simpo", "reward")  # read data.format preference (prompt/chosen/rejected)
FEEDBACK_OBJECTIVES = ("kto",)  # read data.format feedback (prompt/completion/label)


class KTOSection(Section):
    beta: float = Field(0.1, gt=0, description="KTO (arXiv 2402.01306): scale of the implicit reward "
                        "beta * (log pi(y|x) - log pi_ref(y|x)) inside the sigmoid of the value function.")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D: weight of the loss of desirable (label true) "
                                    "answers.")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of the loss of undesirable (label "
                                      "false) answers; the paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3].")
    precompute_reference: bool = Field(
        False, description="Compute the reference log-probabilities (of the answers and of the KL pairs) once "
        "before training instead of one adapter-disabled forward per step.",
    )


class SimPOSection(Section):
    beta: float = Field(2.0, gt=0, description="SimPO (arXiv 2405.14734): scale of the reward beta * (mean "
                        "log-probability per answer token); no reference model.")
    gamma: Optional[float] = Field(None, ge=0, description="Target reward margin gamma: the loss is "
                                   "-log sigmoid(r_chosen - r_rejected - gamma). Default: gamma_beta_ratio x beta.")
    gamma_beta_ratio: Optional[float] = Field(None, ge=0, description="gamma / beta (TRL's simpo_gamma); default "
                                              "0.5 when gamma is not given.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Share of preference labels assumed flipped "
                                   "(as dpo.label_smoothing).")

    @model_validator(mode="after")
    def _one_gamma(self) -> "SimPOSection":
        if self.gamma is not None and self.gamma_beta_ratio is not None:
            raise ValueError("give either gamma or gamma_beta_ratio, not both")
        return self

    @property
    def margin(self) -> float:
        """gamma, the target margin between the chosen and the rejected reward."""
        return self.gamma if self.gamma is not None else self.beta * (
            0.5 if self.gamma_beta_ratio is None else self.gamma_beta_ratio)


class RewardSection(Section):
    margin: float = Field(0.0, description="Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin): how "
                          "far the chosen score should exceed the rejected one (0 = the plain Bradley-Terry loss).")


def check_preference(recipe, formats: set[str]) -> None:
    """Pair objectives read preference data, KTO reads feedback data, and nothing else reads either."""
    objective, data = recipe.training.objective, recipe.data
    kinds = (("preference", PAIR_OBJECTIVES, "prompt/chosen/rejected pairs"),
             ("feedback", FEEDBACK_OBJECTIVES, "prompt/completion/label answers"))
    for wanted, objectives, shape in kinds:
        if objective in objectives and formats != {wanted}:
            raise ValueError(f"training.objective {objective} learns from {shape}, but data.format is "
                             f"{', '.join(sorted(formats))}; set data.format to {wanted} ({shape.split()[0]})")
    for wanted, objectives, shape in kinds:
        if objective not in objectives and wanted in formats:
            raise ValueError(f"data.format {wanted} holds {shape}, which training.objective {objective} cannot "
                             f"learn from; set training.objective to one of {', '.join(objectives)}")
    if objective in PAIR_OBJECTIVES + FEEDBACK_OBJECTIVES and data.packing:
        raise ValueError(f"data.packing would merge the answers training.objective {objective} scores one by one; "
                         "use training.padding_free instead")
