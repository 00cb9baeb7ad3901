"""The checks across sections for LoftQ on 4-bit bases, IR-QLoRA's IEC and AdaMix (`lora.init: loftq`,
`lora.loftq_iter`, `lora.use_iec`, `adapter.method: adamix`), each naming the key that breaks it. Layer sizes
against the rank (IEC) are checked when the model is built (finetune/model/iec.py). Like schema.py, torch-free."""

from __future__ import annotations

from finetune.recipe.section import KeyedError


def check_qmethods(recipe) -> None:
    _check_loftq(recipe)
    _check_iec(recipe)
    if recipe.adapter.method == "adamix":
        _check_adamix(recipe)


def _check_loftq(recipe) -> None:
    lora, q = recipe.lora, recipe.quantization
    if lora.init != "loftq":
        if lora.loftq_iter != 1:
            raise KeyedError("lora.loftq_iter", f"lora.loftq_iter is LoftQ's number of alternating steps, and lora.init "
                             f"is {lora.init}, not loftq; remove it or set lora.init loftq")
        return
    if q.load_in_4bit and q.quant_type == "gguf":
        raise KeyedError("lora.init", "lora.init loftq cannot be combined with quantization.quant_type gguf: a .gguf "
                         "file holds only its quantized weights, so there is no full-precision W whose quantization "
                         "error W - Q(W) LoftQ could fit; start from the float model with quant_type nf4 or icq_nf4")
    if lora.use_dora:
        raise KeyedError("lora.use_dora", "lora.use_dora cannot be combined with lora.init loftq: DoRA's magnitude is "
                         "taken from the weight before LoftQ sets B A, so the first model would not be LoftQ's")


def _check_iec(recipe) -> None:
    lora = recipe.lora
    if not lora.use_iec:
        return
    if recipe.adapter.method != "lora":
        raise KeyedError("lora.use_iec", f"lora.use_iec connects a plain LoRA's A and B; adapter.method is "
                         f"{recipe.adapter.method}: use adapter.method lora with it")
    for on, key, why in ((lora.use_dora, "lora.use_dora", "DoRA's row rescaling is another variant of the same layer"),
                         (lora.use_qalora, "lora.use_qalora", "QA-LoRA pools A's input itself"),
                         (lora.init.startswith(("pissa", "olora")), "lora.init",
                          f"{lora.init} checkpoints are converted against the adapter as initialised, which IEC's "
                          "folded checkpoint is not")):
        if on:
            raise KeyedError(key, f"lora.use_iec cannot be combined with {key} {getattr(lora, key.split('.')[1])}: "
                             f"{why}")


def _check_adamix(recipe) -> None:
    lora, s = recipe.lora, recipe.adamix
    for on, key, value in ((lora.use_dora, "lora.use_dora", "true"), (lora.use_qalora, "lora.use_qalora", "true"),
                           (lora.init not in ("default", "gaussian"), "lora.init", lora.init)):
        if on:
            raise KeyedError(key, f"adapter.method adamix averages plain LoRA modules (lora.r, alpha, dropout, targets); "
                             f"{key} {value} is another kind of layer or initialisation: remove it, or use adapter."
                             "method lora")
    if s.consistency_weight and recipe.training.objective != "sft":
        raise KeyedError("adamix.consistency_weight", f"adamix.consistency_weight compares next-token distributions of "
                         f"two routes, an SFT loss term; training.objective is {recipe.training.objective}: set "
                         "adamix.consistency_weight 0")
