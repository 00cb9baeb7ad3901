"""Packing keeps examples apart (same per-token loss as alone), the collator's packed batches, and the
`finetune prepare` verb (summary, --show, bad records) plus a short packed training run."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data import batch as data_module
from finetune.data import IGNORE, Collator, flatten, normalize, pack, padding_efficiency, real_tokens, tokenize_all
from finetune.objectives.loss import token_loss_sum
from finetune.model.load import load_tokenizer
from finetune.plan.data_summary import render_example
from finetune.recipe.schema import DataSection

from conftest import recipe_file, write_jsonl

runner = CliRunner()


def examples(tok, n=5, train_on="completion"):
    rows = [{"instruction": f"Repeat the word {'twice' if i % 2 else 'once'}.", "input": w,
             "output": " ".join([w] * (1 + i % 2))} for i, w in enumerate(["cat", "dog", "sun", "tree", "bird"][:n])]
    section = DataSection(train=["x.jsonl"], train_on=train_on)
    return tokenize_all([normalize(r, "alpaca", {}) for r in rows], section, tok)[0]


def test_pack_fills_rows_and_restarts_positions(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    exs = examples(tok)
    lengths = [len(e["input_ids"]) for e in exs]
    max_length = sum(sorted(lengths)[:3]) + 1  # room for about three per row
    rows = pack(exs, max_length)
    assert 1 < len(rows) < len(exs) and all(len(r["input_ids"]) <= max_length for r in rows)
    segments = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        ends = starts[1:] + [len(row["input_ids"])]
        for s, e in zip(starts, ends):
            assert row["position_ids"][s:e] == list(range(e - s))
            assert row["labels"][s] == IGNORE  # nothing is predicted across a boundary
            segments.append((tuple(row["input_ids"][s:e]), tuple(row["labels"][s + 1 : e])))
    # every example exactly once, whole, with its own labels
    assert sorted(segments) == sorted((tuple(e["input_ids"]), tuple(e["labels"][1:])) for e in exs)
    assert padding_efficiency([10, 10, 10, 10], 2) == 1.0 and padding_efficiency([10, 5], 2) == 0.75


def test_collator_packed_batch_has_no_attention_mask(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    rows = pack(examples(tok), 60)
    batch = Collator(tok.pad_token_id)(rows[:2])
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_tokens"}
    n = len(rows[1]["input_ids"])
    width = batch["input_ids"].shape[1]
    assert batch["position_ids"][1, :n].tolist() == rows[1]["position_ids"]
    assert batch["position_ids"][1, n:].tolist() == list(range(width - n))  # padding is a sequence of its own
    assert real_tokens(batch) == sum(len(r["input_ids"]) for r in rows[:2])
    plain = Collator(tok.pad_token_id)(examples(tok)[:2])
    assert real_tokens(plain) == int(plain["attention_mask"].sum()) < plain["input_ids"].numel()


def per_token_loss(model, batch) -> torch.Tensor:
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}
        logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE, reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_loss_equals_each_example_alone(tiny_model_dir, attn):
    tok = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    exs = examples(tok, 3, train_on="all")
    row = pack(exs, 1000)[0]
    collate = Collator(tok.pad_token_id)
    packed = per_token_loss(model, collate([row]))
    alone = [per_token_loss(model, collate([ex])) for ex in pack(exs, 1)]  # one example per row
    # In the packed row, each example's first token is no target (it would be predicted from the previous
    # example: loss 0 there); every other target must have exactly the loss it has alone.
    expected = torch.cat([torch.cat([torch.zeros(1), a]) if i else a for i, a in enumerate(alone)])
    lengths = [len(e["input_ids"]) for e in pack(exs, 1)]
    boundaries = [sum(lengths[:i]) - 1 for i in range(1, len(lengths))]
    assert packed.shape == expected.shape and all(packed[b] == 0 for b in boundaries)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)
    # The same row with an attention mask is one long sequence: later examples see earlier ones.
    leaky = per_token_loss(model, {**collate([row]), "attention_mask": torch.ones(1, len(row["input_ids"]))})
    assert (leaky - expected).abs().max() > 1e-3
    # ... and so is a forward pass with a KV cache (transformers only separates packed examples without one).
    batch = {k: v for k, v in collate([row]).items() if k != "num_tokens"}
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=True).logits
    cached = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE, reduction="none")
    assert (cached - expected).abs().max() > 1e-3


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packed", [False, True])
def test_padding_free_batch_has_the_padded_batchs_loss_and_gradients(tiny_model_dir, attn, packed):
    """training.padding_free: one row without padding must be the same work as the padded batch."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    exs = examples(tok, 5, train_on="all")  # every first label is a real token: boundaries must drop it
    batch = pack(exs, 40) if packed else exs
    padded, flat = Collator(tok.pad_token_id)(batch), Collator(tok.pad_token_id, padding_free=True)(batch)
    total = sum(len(ex["input_ids"]) for ex in batch)
    assert flat["input_ids"].shape == (1, total) and real_tokens(flat) == real_tokens(padded) == total
    targets = lambda b: int((b["labels"][:, 1:] != IGNORE).sum())  # noqa: E731 - what the loss counts
    assert "attention_mask" not in flat and targets(flat) == targets(padded)
    model.eval()  # no dropout: the two passes must be the same function
    loss, grads = _loss_and_grads(model, padded)
    flat_loss, flat_grads = _loss_and_grads(model, flat)
    assert flat_loss == pytest.approx(loss, rel=1e-5)
    assert flat_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(flat_grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())
    # Without restarting positions the examples would see each other: the test can tell.
    leaky = {**flat, "position_ids": torch.arange(total)[None]}
    with torch.no_grad():
        assert abs(token_loss_sum(model, leaky).item() - loss) > 1e-3 * abs(loss)


def make_recipe(tmp_path, model_dir, rows, **data):
    write_jsonl(tmp_path / "train.jsonl", rows)
    return recipe_file(tmp_path, model_dir, tmp_path, "packed", quantization={"compute_dtype": "float32"},  # exact
                       lora={"dropout": 0.0, "target_modules": "all-linear"},
                       data={"eval": None, "max_length": 64, "packing": True, **data}, max_steps=2,
                       micro_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3)


def test_prepare_prints_summary_and_examples_without_model_weights(tmp_path, tiny_tokenizer_dir, toy_alpaca_rows):
    """The tokenizer directory has no weights at all: prepare must not need them."""
    assert not list(tiny_tokenizer_dir.glob("*.safetensors"))
    rows = toy_alpaca_rows[:20] + [{"instruction": "x"}, {"instruction": "y", "output": ""}]
    recipe = make_recipe(tmp_path, tiny_tokenizer_dir, rows, on_bad_record="skip", eval_fraction=0.2)
    result = runner.invoke(app, ["prepare", str(recipe), "--show", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    for label in ("examples", "length p50", "length p99", "length max", "truncated", "dropped",
                  "bad records skipped", "padding efficiency unpacked", "packing efficiency"):
        assert label in out
    assert f"{tmp_path}/train.jsonl:21: missing field 'output'" in out and "written to" in out
    assert "⟦" in out and "<|im_end|>⟧" in out and "<|im_start|>user" in out  # trained span, visible specials
    again = runner.invoke(app, ["prepare", str(recipe)])
    assert again.exit_code == 0 and "reused" in again.output


def test_render_example_highlights_exactly_the_trained_tokens(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    ex = examples(tok, 2)[1]
    text = render_example(ex, tok)
    trained = "".join(text.plain[s.start:s.end] for s in text.spans if "green" in str(s.style))
    assert trained == "dog dog<|im_end|>" and text.plain == tok.decode(ex["input_ids"])


def test_prepare_stops_on_bad_records(tmp_path, tiny_tokenizer_dir):
    recipe = make_recipe(tmp_path, tiny_tokenizer_dir, [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    result = runner.invoke(app, ["prepare", str(recipe)])
    assert result.exit_code == 2 and f"{tmp_path}/train.jsonl:2: missing field 'output'" in result.output
    assert "Traceback" not in result.output


def test_packed_training_runs(tmp_path, tiny_model_dir, toy_alpaca_rows):
    recipe = make_recipe(tmp_path, tiny_model_dir, toy_alpaca_rows[:24])
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "packed" / "metrics.jsonl").read_text().splitlines()]
    losses = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in losses] == [1, 2] and all(m["loss"] > 0 and m["tokens_per_s"] > 0 for m in losses)
    assert (tmp_path / "runs" / ".cache" / "tokenized").is_dir()  # tokenized once, next to the runs


def test_padding_free_training_logs_the_padded_runs_losses(tmp_path, tiny_model_dir, toy_alpaca_rows, monkeypatch):
    """The recipe key reaches the collator, and end to end it changes the compute, not the numbers."""
    flattened = []
    monkeypatch.setattr(data_module, "flatten", lambda batch: flattened.append(len(batch)) or flatten(batch))
    losses = {}
    for padding_free in (False, True):
        recipe = make_recipe(tmp_path, tiny_model_dir, toy_alpaca_rows[:24], packing=False)
        body = json.loads(recipe.read_text())
        body["training"]["padding_free"] = padding_free
        body["output_dir"] = str(tmp_path / "runs" / f"pf-{padding_free}")
        recipe.write_text(json.dumps(body))
        result = runner.invoke(app, ["train", str(recipe)])
        assert result.exit_code == 0, result.output
        metrics = (tmp_path / "runs" / f"pf-{padding_free}" / "metrics.jsonl").read_text().splitlines()
        losses[padding_free] = [m["loss"] for m in map(json.loads, metrics) if "loss" in m]
        assert bool(flattened) == padding_free  # only the padding-free run flattens its batches
    assert len(losses[True]) == 2 and flattened.count(2) >= 2  # micro batches of 2 examples
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_segmented_attention_is_the_masked_attention(tiny_model_dir, packed):
    """finetune.model.attention: per-example causal SDPA must give the block-diagonal mask's loss and gradients."""
    from finetune.model import attention as attention

    tok = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    exs = examples(tok, 5, train_on="all")
    rows = pack(exs, 40) if packed else exs
    batch = Collator(tok.pad_token_id)(rows) if packed else Collator(tok.pad_token_id, padding_free=True)(rows)
    loss, grads = _loss_and_grads(model, batch)
    assert attention.use_segmented_attention(model) and model.config._attn_implementation == attention.NAME
    seg_loss, seg_grads = _loss_and_grads(model, batch)
    # the segmented path ran, and cut the rows where the examples (and a packed row's padding) begin
    starts = [[t for t, p in enumerate(row) if p == 0] for row in batch["position_ids"].tolist()]
    assert [[s for s, _ in row] for row in attention._last[1]] == starts and max(map(len, starts)) > 1
    assert seg_loss == pytest.approx(loss, rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(seg_grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())


def test_segmented_attention_keeps_left_padded_generation_masked(tiny_model_dir):
    """A model switched for training may generate during it (eval_generate_steps): same tokens as plain SDPA."""
    from finetune.model import attention as attention

    tok = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts = [tok("cat dog sun tree bird cat dog")["input_ids"], tok("sun")["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    attention.use_segmented_attention(model)
    assert model.generate(input_ids=ids, attention_mask=mask, **kwargs).tolist() == plain.tolist()


@pytest.mark.parametrize("width", [64, 48])  # a power-of-two scale (1/8) and one that is not
def test_the_bf16_attention_products_are_causal_attention(width):
    """finetune.model.attention.causal_attention_math (short bf16 examples: one baddbmm with the causal mask added,
    grouped-query heads stacked): float32 SDPA's output and gradients to bf16's rounding, and no query sees a later
    position: changing the last key and value leaves every earlier output as it was, to the bit."""
    from finetune.model.attention import causal_attention_math

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 37, width, generator=g) for h in (6, 2, 2))  # 3 query heads per key/value head
    grad = torch.randn(1, 6, 37, width, generator=g)

    def run(fn, *tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = fn(*leaves)
        out.backward(grad.to(out.dtype))
        return out.float(), [t.grad.float() for t in leaves]

    ref, ref_grads = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True),
                         q, k, v)
    bf16 = [t.bfloat16() for t in (q, k, v)]
    got, grads = run(lambda a, b, c: causal_attention_math(a, b, c, width**-0.5), *bf16)
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)
    for g_got, g_ref in zip(grads, ref_grads):
        assert (g_got - g_ref).norm() <= 0.03 * g_ref.norm()
    later = [bf16[0], bf16[1].clone(), bf16[2].clone()]
    later[1][:, :, -1] += 1
    later[2][:, :, -1] -= 1
    with torch.no_grad():
        moved = causal_attention_math(*later, width**-0.5).float()
    assert torch.equal(moved[:, :, :-1], got[:, :, :-1].detach()) and not torch.equal(moved[:, :, -1], got[:, :, -1])
