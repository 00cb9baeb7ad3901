"""The training loss, computed without wasted logits.

A causal LM projects every position onto the vocabulary, but only positions whose
next token carries a label contribute to the loss: prompt tokens and padding do
not. For SmolLM2-135M (hidden 576, vocabulary 49,152) that head is 57 MFLOP per
position, about a fifth of the forward pass, and the float32 logits of one
8 x 512 micro batch take 800 MB, plus as much again for the softmax kept for
backward.

So the loss takes the final hidden states from the model's own forward (a hook
on the output layer hands it an empty slice instead), keeps only the labelled
positions, and computes head, cross-entropy and the gradient with respect to the
hidden states a chunk of rows at a time. Under LoRA the head is frozen, so that
gradient is all backward needs: nothing vocabulary-sized outlives a chunk.

The transforms transformers' forwards apply after the head are applied here too
(`_transform`: Gemma 2/3's soft-capping cap * tanh(z / cap), Granite's division by
`logits_scaling`, Cohere's `logit_scale`), so those families keep this path: for
Gemma's 256k vocabulary the full float32 logits of one 4 x 512 micro batch are 2 GB.
Anything this does not cover exactly (a trainable or adapted head, a transform of
another kind, a forward that never calls its output layer) takes the plain path
over the model's full logits, so the loss is always the same number. Whether a
model's logits are what `_transform` says is checked on its first call (its own
head on one position against ours, op for op as it computes them) and remembered
for the model: later calls hand its head no position at all (two vocabulary-sized
products a micro batch saved), and a model that fails the check goes straight to
the plain path instead of running its forward twice.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F

from finetune.data import IGNORE
CHUNK_BYTES = 64 * 2**20  # float32 logits per chunk: bounds the head's working memory
# model -> (its head, whether its logits are `_transform` of that head's projection), from its first call
_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose label is not -100."""
    return token_losses(model, batch)[0].sum()


def token_losses(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy at each labelled position as a float32 vector, the boolean mask of those positions
    over labels[:, 1:]): the vector follows the mask's row-major order. With a `temperature`, of the
    distribution softmax(logits / temperature) (what sampling at that temperature draws from)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    labels = batch["labels"]
    head = _frozen_linear_head(model)
    verdict = _VERDICTS.get(model, (None, None))
    plain = verdict[1] if verdict[0] is head else None  # None: not checked with this head yet
    if head is None or plain is False:
        return _full_logits_losses(model(**inputs, use_cache=False).logits / temperature, labels)

    captured = {}

    def keep_hidden(module, args):
        # Checked: the model's head gets no position. Not yet: the first position only, a cheap check that the
        # model's logits are the projection computed below, transformed as `_transform` says.
        # A fresh [B, 1, H] tensor: a slice keeps the row stride T*H (`.contiguous()` leaves a size-1 dimension's
        # stride alone), and with it torch's matmul copies the whole transposed head weight for a bf16 batched
        # product (70-80 ms per SmolLM2 micro batch). Detached: the check needs no graph.
        captured["hidden"] = args[0]
        return (args[0][:, :0] if plain else args[0][:, :1].detach().clone(memory_format=torch.contiguous_format),)

    handle = head.register_forward_pre_hook(keep_hidden)
    try:
        out = model(**inputs, use_cache=False)
    finally:
        handle.remove()
    hidden = captured.get("hidden")
    if hidden is None or hidden.dim() != 3 or out.logits.shape[:2] != (hidden.shape[0], 1 if plain is None else 0):
        return _full_logits_losses(out.logits, labels)  # the output layer was not used as expected
    # The head multiplies in its weight's dtype, as autocast has it do inside the forward: a float32 adapter
    # (IA3's scaling vectors) can leave the residual stream in float32 beside a bf16 head.
    hidden = hidden.to(head.weight.dtype)
    if plain is None:
        ours = _as_the_model_does(head(hidden[:, 0].detach()), model)
        plain = torch.allclose(out.logits[:, 0].float(), ours.float(), rtol=1e-3, atol=1e-3)
        _VERDICTS[model] = (head, plain)
        if not plain:
            warnings.warn(f"{type(model).__name__} transforms its logits; computing the loss over all positions.")
            return _full_logits_losses(model(**inputs, use_cache=False).logits / temperature, labels)

    labels = labels.to(hidden.device)
    keep = labels[:, 1:] != IGNORE
    rows = hidden[:, -labels.shape[1]:-1][keep]  # prompt/P-tuning prepend virtual tokens: the last positions are ours
    (scale, cap), bias, post = _transform(model), head.bias, 1.0 / temperature
    if cap is None:  # s (h W^T + b) / T = (s h / T) W^T + s b / T: the rescaling folds into the rows
        scale, post = scale * post, 1.0
    if scale != 1.0:
        rows, bias = rows * scale, (bias * scale if bias is not None else None)
    chunk = max(1, CHUNK_BYTES // (4 * head.weight.shape[0]))
    return LabelledCrossEntropy.apply(rows, head.weight, bias, labels[:, 1:][keep], chunk, cap, post), keep


# config attribute -> the op transformers' forward applies to the head's logits (checked on each model's first call)
_TRANSFORMS = {
    "final_logit_softcapping": lambda z, cap: torch.tanh(z / cap) * cap,  # Gemma 2, Gemma 3
    "logits_scaling": lambda z, s: z / s,  # Granite, GraniteMoE
    "logit_scale": lambda z, s: z * s,  # Cohere, Cohere 2
}


def _transform_values(model) -> dict:
    config = getattr(model, "module", model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    values = {k: getattr(config, k, None) for k in _TRANSFORMS}  # (a scale of 1 or a cap of None/0: none)
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and v and (k == "final_logit_softcapping"
                                                                                       or v != 1)}


def _transform(model) -> tuple[float, float | None]:
    """(scale, cap): the model's logits are cap * tanh(scale * z / cap), or scale * z without a cap, for the head's z."""
    values = _transform_values(model)
    scale = values.get("logit_scale", 1.0) / values.get("logits_scaling", 1.0)
    return float(scale), values.get("final_logit_softcapping")


def _as_the_model_does(z: torch.Tensor, model) -> torch.Tensor:
    """The head's logits z transformed op for op as `_TRANSFORMS` says the model's forward does (the same rounding)."""
    for key, value in _transform_values(model).items():
        z = _TRANSFORMS[key](z, value)
    return z


def sequence_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's labelled tokens, their count), one entry per sequence.

    A sequence is a row of a padded batch, or an example of a padding-free row (its positions restart
    at 0). Computed like the training loss: the head only at labelled positions.
    """
    logps, index = token_logprobs(model, batch)
    n = num_sequences(batch)
    counts = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, index, torch.ones_like(logps))
    return torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, index, logps), counts


def token_logprobs(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(token) of every labelled token, the index of its sequence), in row-major order of labels[:, 1:].

    The per-token form of `sequence_logprobs` (GRPO's ratios and KL are per token): the head only at
    labelled positions, differentiable in the model's trainable parameters; pi = softmax(logits / temperature).
    """
    ce, keep = token_losses(model, batch, temperature)
    return -ce, token_sequence_index(batch, keep)


def token_sequence_index(batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """For each labelled position of `keep` (the mask over labels[:, 1:]), the index of its sequence."""
    if "attention_mask" in batch or "position_ids" not in batch:
        segment = torch.arange(keep.shape[0], device=keep.device)[:, None].expand(-1, keep.shape[1] + 1)
    elif keep.shape[0] == 1:
        segment = torch.cumsum(batch["position_ids"].to(keep.device) == 0, dim=1) - 1
    else:
        raise ValueError("per-sequence log-probabilities need padded rows or one padding-free row, not packed rows")
    return segment[:, 1:][keep]  # the label at position t is the token t+1, of t+1's sequence


def num_sequences(batch: dict) -> int:
    """Sequences in a collated batch (see `sequence_logprobs`), counted without a forward pass."""
    if "attention_mask" in batch or "position_ids" not in batch:
        return batch["input_ids"].shape[0]
    return int((batch["position_ids"] == 0).sum())


def _frozen_linear_head(model) -> torch.nn.Linear | None:
    """The output layer when it is a plain, frozen nn.Linear (the QLoRA case); None otherwise."""
    head = getattr(model, "module", model).get_output_embeddings()  # through a DDP wrapper and PeftModel
    if type(head) is not torch.nn.Linear or head.weight.requires_grad or _sharded(model, head.weight):
        return None
    if head.bias is not None and head.bias.requires_grad:
        return None
    return head


def _sharded(model, weight: torch.Tensor) -> bool:
    """FSDP / ZeRO-3 hold the head's weight in pieces outside the forward pass: use the model's own logits."""
    if hasattr(weight, "ds_id"):  # DeepSpeed ZeRO-3
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return False
    return isinstance(model, FullyShardedDataParallel) or isinstance(weight, DTensor)


def _full_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _full_logits_losses(logits, labels)[0].sum()


def _full_logits_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    targets = labels[:, 1:].to(logits.device)
    keep = targets != IGNORE
    return F.cross_entropy(logits[:, -labels.shape[1]:-1][keep].float(), targets[keep], reduction="none"), keep


class LabelledCrossEntropy(torch.autograd.Function):
    """CE(rows_i @ weight.T + bias, targets_i) for each row i, in chunks of rows; differentiable in `rows` only.
    With a `cap`, of the soft-capped logits post * cap * tanh(z / cap) (Gemma's; `post`: 1 / temperature).

    The forward pass already computes d loss / d rows (softmax minus one-hot, times the
    weight), chunk by chunk, so backward is one multiplication by the incoming scale and
    the logits never need to be stored or recomputed.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk, cap=None, post=1.0):
        losses = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        grad = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        for start in range(0, rows.shape[0], chunk):
            h, t = rows[start : start + chunk], targets[start : start + chunk]
            z = (h @ weight.t()).float()
            if bias is not None:
                z += bias.float()
            if cap is not None:  # logits post * cap * tanh(z / cap): d/dz = post * (1 - tanh^2)
                z = z.div_(cap).tanh_()
                slope = z.square().neg_().add_(1).mul_(post)
                z.mul_(cap * post)
            z -= z.amax(dim=1, keepdim=True)
            target_z = z.gather(1, t[:, None]).squeeze(1)
            z.exp_()
            sum_exp = z.sum(dim=1)
            losses[start : start + chunk] = sum_exp.log() - target_z
            if grad is not None:
                z /= sum_exp[:, None]  # softmax
                z[torch.arange(len(t), device=z.device), t] -= 1
                if cap is not None:
                    z.mul_(slope)
                grad[start : start + chunk] = z.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return grad * grad_losses.to(grad.dtype)[:, None], None, None, None, None, None, None
