"""GRPO: Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300) on the loop of train.py.

Each optimizer step, `rollout` turns the step's prompt micro batches into training micro batches:

1. Sample G answers o_1..o_G per prompt q from the current policy pi (the training model in eval mode, no
   dropout, KV cache, `grpo.generation_batch_size` sequences per generate call). The global RNG is forked and
   reseeded from (training.seed, step, process), so sampling is reproducible and resume is exact without
   saving any state, and training's own RNG stream (dropout) is not touched.
2. Score each answer with the recipe's rewards (rewards.py): r_i = sum_k w_k f_k(q, o_i, reference).
3. Group-relative advantages: A_i = r_i - mean(r_group), divided by (std(r_group) + 1e-4) (Bessel's std, as
   TRL) for `loss: grpo` and `token`, not for `dr_grpo`. A group whose rewards are all equal has A = 0.
4. With beta > 0, the reference log-probabilities log pi_ref(o_i,t) from the same model with its adapter off
   (the 4-bit base: no extra memory); with updates_per_generation mu > 1, the sampling policy's log-probs
   log pi_old(o_i,t) (no grad, eval mode). With mu = 1 pi_old is pi itself, detached: the ratio is exactly 1.

The loss (`__call__`) is on answer tokens only, the LM head applied only there (loss.py). pi is the
distribution the answers were sampled from, softmax(logits / temperature), for the policy, pi_old and
pi_ref alike (as TRL does; top_p is not modelled):

    rho_t = exp(log pi(o_t) - log pi_old(o_t)),   D_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (k3 KL)
    l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta D_t
    grpo:    L = (1/N) sum_i (1/|o_i|) sum_t l_i,t      unit = answer
    token:   L = (1/sum_i |o_i|) sum_i,t l_i,t          unit = answer token (DAPO)
    dr_grpo: L = (1/(N max_new_tokens)) sum_i,t l_i,t   unit = answer x max_new_tokens (Dr. GRPO)

A micro batch returns its summed loss and its unit count; the loop divides by the step's units on all
processes, so accumulation and DDP give exactly those means. At mu = 1 the gradient is the policy gradient
-(1/units) sum A_i grad log pi(o_i,t) (plus the KL's, which is 0 while pi = pi_ref).
Metrics are per step over all processes: step-level values are emitted times the batch's units (the loop
divides by units), token means (kl, clip_fraction) times units/answer tokens.
"""

from __future__ import annotations

import json
import time

import torch

from finetune.data import IGNORE, Collator
from finetune.generate import GenerationOptions, generate_ids
from finetune.objectives.loss import token_logprobs
from finetune.objectives.base import LossSum, Objective
from finetune.recipe import Recipe
from finetune.objectives.rewards import load_rewards, score


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """A_i = r_i - mean of its group (consecutive runs of `group_size`), / (group std + 1e-4) when `scale`.
    A group with equal rewards gets exactly 0."""
    r = rewards.view(-1, group_size).double()
    a = r - r.mean(dim=1, keepdim=True)
    if scale:
        a = a / (r.std(dim=1, keepdim=True) + 1e-4)
    equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(equal, torch.zeros_like(a), a).flatten().float()


def sampling_seed(seed: int, step: int, process: int) -> int:
    """The seed of one step's sampling on one process: a function of the run, not of the RNG's history."""
    return (seed * 1_000_003 + step * 9_176 + process * 7_919) % 2**63


class GRPO(Objective):
    """See the module docstring. Batches come from `rollout`; `prepare` turns examples into prompts."""

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.s = recipe.grpo
        self.rewards = load_rewards(recipe.rewards)
        self.unit = {"grpo": "answer", "token": "token", "dr_grpo": "token slot"}[self.s.loss]
        names = [r.name for r in self.rewards]
        self.step_metrics = ("reward", "reward_std", *(f"reward/{n}" for n in names),
                             *(f"reward_std/{n}" for n in names), "zero_std_groups", "completion_length",
                             "completion_length_max", "time/generation_s", "generation_tokens_per_s")
        self.token_metrics = (("kl",) if self.s.beta > 0 else ()) + ("clip_fraction",)
        self.metrics = self.step_metrics + self.token_metrics
        self._cache: list[dict] | None = None  # mu > 1: the generation batch being reused
        self._samples_checked = False

    # -------------------------------------------------------------------------------- data

    def prepare(self, model, train_set, eval_set, collate, batch_size: int) -> None:
        """Every tokenized example becomes its prompt (everything before its last answer) and the token ids
        of that answer, the reference the rewards compare with. GRPO has no eval loss: the eval examples are
        left out of it (training.eval_generate_steps still scores generations on them)."""
        for i, ex in enumerate(train_set):
            labels = ex["labels"]
            end = max(j for j, x in enumerate(labels) if x != IGNORE) + 1
            start = end - 1
            while start > 0 and labels[start - 1] != IGNORE:
                start -= 1
            train_set[i] = {"input_ids": ex["input_ids"][:start], "labels": [IGNORE] * start,
                            "reference": ex["input_ids"][start:end]}
        eval_set[:] = []

    def units(self, batch: dict) -> int:
        answers = len(batch["advantages"])
        if self.s.loss == "grpo":
            return answers
        if self.s.loss == "dr_grpo":
            return answers * self.s.max_new_tokens
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    # -------------------------------------------------------------------------------- rollout

    def rollout(self, run, group: list[dict]) -> list[dict]:
        """Prompt micro batches -> training micro batches of their prompts' G sampled answers each, scored."""
        step, mu = run.state.step, self.s.updates_per_generation
        if step % mu and self._cache is not None:  # mu > 1: train again on the last generation
            self._cache = [{k: v.to(run.accelerator.device) for k, v in b.items()} for b in self._cache]  # resumed
            return self._cache
        tok = run.tokenizer
        prompts = [_prompts(b) for b in group]
        references = [[tok.decode(r, skip_special_tokens=True).strip() for r in b["reference"]] for b in group]
        flat = [p for ps in prompts for p in ps]
        started = time.perf_counter()
        completions = self._sample(run, flat, step)
        gen_time = time.perf_counter() - started
        G = self.s.group_size
        texts = [tok.decode(c, skip_special_tokens=True).strip() for c in completions]
        prompt_texts = [tok.decode(p) for p in flat for _ in range(G)]
        refs = [r for rs in references for r in rs for _ in range(G)]
        totals, each = score(self.rewards, prompt_texts, texts, refs)
        rewards = torch.tensor(totals)
        advantages = group_advantages(rewards, G, scale=self.s.loss != "dr_grpo")
        batches, k = [], 0
        for ps in prompts:
            n = len(ps) * G
            batches.append(self._batch(run, flat[k // G : k // G + len(ps)], completions[k : k + n],
                                       advantages[k : k + n]))
            k += n
        stats = self._step_stats(run, batches, rewards, each, completions, gen_time)
        for b in batches:
            b.update(stats)
        if run.main:
            self._write_samples(run, step + 1, prompt_texts, refs, texts, totals, each, advantages)
        self._cache = batches if mu > 1 else None
        return batches

    def state_dict(self) -> dict:
        """With mu > 1, the generation batch being trained on again: a resume mid-cycle continues it exactly."""
        return {"cache": [{k: v.cpu() for k, v in b.items()} for b in self._cache]} if self._cache else {}

    def load_state_dict(self, state: dict) -> None:
        self._cache = state.get("cache")

    def _sample(self, run, prompts: list[list[int]], step: int) -> list[list[int]]:
        """G completions per prompt (consecutive), token ids up to and including the end-of-sequence token."""
        s, acc = self.s, run.accelerator
        options = GenerationOptions(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                    batch_size=s.generation_batch_size,
                                    seed=sampling_seed(self.recipe.training.seed, step, acc.process_index))
        devices = [acc.device.index or 0] if acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return generate_ids(acc.unwrap_model(run.model), run.tokenizer,
                                [p for p in prompts for _ in range(s.group_size)], options, top_k=0)

    def _batch(self, run, prompts, completions, advantages) -> dict:
        """One training micro batch: prompt + answer per row, labels on the answer only, with its advantages
        and (no grad) reference / sampling-policy log-probabilities of every answer token."""
        G, t = self.s.group_size, self.recipe.training
        examples = [{"input_ids": prompts[i // G] + c, "labels": [IGNORE] * len(prompts[i // G]) + c}
                    for i, c in enumerate(completions)]
        batch = Collator(run.tokenizer.pad_token_id, padding_free=t.padding_free)(examples)
        batch = {k: v.to(run.accelerator.device) for k, v in batch.items()}
        batch["advantages"] = advantages.to(run.accelerator.device)
        model = run.model
        with torch.no_grad():
            if self.s.beta > 0:
                with getattr(model, "module", model).disable_adapter():  # the forward still goes through DDP
                    batch["ref_token_logps"] = token_logprobs(model, batch, self.s.temperature)[0]
            if self.s.updates_per_generation > 1:
                was_training = model.training
                model.eval()
                batch["old_token_logps"] = token_logprobs(model, batch, self.s.temperature)[0]
                model.train(was_training)
        return batch

    def _step_stats(self, run, batches, rewards, each, completions, gen_time) -> dict:
        """The step's metrics over all processes (one gather), stored in every micro batch for `__call__`."""
        acc, n = run.accelerator, len(completions)
        per_fn = [torch.tensor(v, dtype=torch.float64) for v in each.values()]
        G = self.s.group_size
        r = rewards.double()
        grouped = r.view(-1, G)
        local = torch.tensor([
            n, r.sum(), (r * r).sum(), *(v.sum() for v in per_fn), *((v * v).sum() for v in per_fn),
            float((grouped == grouped[:, :1]).all(dim=1).sum()), grouped.shape[0],
            sum(map(len, completions)), sum(self.units(b) for b in batches), gen_time,
            max(map(len, completions)),
        ], dtype=torch.float64, device=acc.device)
        every = acc.gather(local[None]) if acc.num_processes > 1 else local[None]
        total, k = every.sum(dim=0), len(per_fn)
        count = total[0]
        mean = lambda s: s / count  # noqa: E731
        std = lambda s, s2: (s2 / count - (s / count) ** 2).clamp(min=0).sqrt()  # noqa: E731
        tokens, units, seconds = total[3 + 2 * k + 2], total[3 + 2 * k + 3], every[:, 3 + 2 * k + 4].max()
        values = [mean(total[1]), std(total[1], total[2]),
                  *(mean(total[3 + j]) for j in range(k)), *(std(total[3 + j], total[3 + k + j]) for j in range(k)),
                  total[3 + 2 * k] / total[3 + 2 * k + 1], tokens / count, every[:, -1].max(),
                  seconds, tokens / seconds.clamp(min=1e-9)]
        return {"step_values": torch.stack(values).float(), "token_scale": (units / tokens).float()}

    def _write_samples(self, run, step, prompts, references, completions, totals, each, advantages) -> None:
        """Every prompt/answer/reward of the step to samples.jsonl, every `samples_steps` steps and at step 1."""
        path = run.recipe.run_dir / "samples.jsonl"
        if not self._samples_checked:  # resumed: the steps after the checkpoint are about to be redone
            self._samples_checked = True
            if path.exists():
                kept = [x for x in path.read_text().splitlines() if json.loads(x)["step"] < step]
                path.write_text("".join(x + "\n" for x in kept))
        every = self.s.samples_steps
        if not every or (step % every and step != 1):
            return
        with open(path, "a") as f:
            for i, c in enumerate(completions):
                f.write(json.dumps({"step": step, "group": i // self.s.group_size, "prompt": prompts[i],
                                    "reference": references[i], "completion": c, "reward": totals[i],
                                    "rewards": {name: v[i] for name, v in each.items()},
                                    "advantage": float(advantages[i])}) + "\n")

    # -------------------------------------------------------------------------------- loss

    def __call__(self, model, batch: dict) -> LossSum:
        s = self.s
        logp, seq = token_logprobs(model, batch, s.temperature)
        adv = batch["advantages"].to(logp)[seq]
        old = batch["old_token_logps"].to(logp) if "old_token_logps" in batch else logp.detach()
        ratio = torch.exp(logp - old)
        clipped = ratio.clamp(1 - s.epsilon, 1 + s.epsilon)
        per_token = -torch.min(ratio * adv, clipped * adv)
        token_values = []
        if s.beta > 0:
            d = batch["ref_token_logps"].to(logp) - logp
            kl = torch.exp(d) - d - 1
            per_token = per_token + s.beta * kl
            token_values.append(kl.detach().sum())
        was_clipped = ((ratio < 1 - s.epsilon) & (adv < 0)) | ((ratio > 1 + s.epsilon) & (adv > 0))
        token_values.append(was_clipped.float().sum())
        if s.loss == "grpo":  # mean over each answer's tokens, summed over answers
            lengths = torch.zeros(len(batch["advantages"]), device=logp.device).index_add(0, seq, torch.ones_like(logp))
            total = (per_token / lengths[seq]).sum()
        else:
            total = per_token.sum()
        units = self.units(batch)
        values = [v * units for v in batch["step_values"]] + [v * batch["token_scale"] for v in token_values]
        return LossSum(total, dict(zip(self.metrics, (v.detach() for v in values))))


def _prompts(batch: dict) -> list[list[int]]:
    """The prompts of a collated prompt batch: right-padded rows, or one padding-free row."""
    ids = batch["input_ids"].tolist()
    if "attention_mask" in batch:
        return [row[:n] for row, n in zip(ids, batch["attention_mask"].sum(dim=1).tolist())]
    starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0] + [len(ids[0])]
    return [ids[0][a:b] for a, b in zip(starts, starts[1:])]
