"""Inside one run: its resolved recipe, summary and environment, its checkpoints with the `finetune verify`
verdict, the eval reports (`finetune eval --json`, schema finetune.eval/1) and samples found in it, and the
generation samples written while training (GRPO's samples.jsonl, eval_samples.jsonl per eval step).

Every file is read defensively: a missing or broken one is reported as such, never raised.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.artifacts import verify_checkpoint
from finetune.board.runs import checkpoints, row

SAMPLES_SHOWN = 64  # per step: the page shows what a reader reads, not a data dump


def _text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _json(path: Path):
    text = _text(path)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return {"damaged": f"{path.name} is not valid JSON"}


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for line in (_text(path) or "").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            rows.append(value)
    return rows


class Verifier:
    """`verify_checkpoint` verdicts, cached by the manifest's modification time (hashing is the slow part)."""

    def __init__(self):
        self.cache: dict[tuple, dict] = {}

    def verdict(self, ckpt: Path) -> dict:
        manifest = ckpt / "manifest.json"
        key = (str(ckpt), manifest.stat().st_mtime_ns if manifest.exists() else None)
        if key not in self.cache:
            try:
                v = verify_checkpoint(ckpt)
                self.cache[key] = {"intact": v.intact, "summary": v.summary()}
            except Exception as e:  # a checkpoint damaged in a way verify itself trips on is still damaged
                self.cache[key] = {"intact": False, "summary": f"DAMAGED: {type(e).__name__}: {e}"}
        return self.cache[key]


def by_step(rows: list[dict]) -> list[dict]:
    """Samples grouped per step, newest step first; a sample logged twice under one (step, index) (a resumed
    run redoing a step) keeps the last copy."""
    steps: dict[int, dict] = {}
    for i, r in enumerate(rows):
        steps.setdefault(r.get("step", 0), {})[r.get("index", i)] = r
    return [{"step": s, "samples": list(steps[s].values())[:SAMPLES_SHOWN]} for s in sorted(steps, reverse=True)]


def eval_reports(run_dir: Path) -> list[dict]:
    """`finetune eval --json` files in the run directory (any *.json with schema finetune.eval/1)."""
    out = []
    for path in sorted(run_dir.glob("*.json")):
        doc = _json(path)
        if isinstance(doc, dict) and str(doc.get("schema", "")).startswith("finetune.eval/"):
            out.append({"file": path.name, "models": doc.get("models") or {}, "examples": doc.get("examples"),
                        "data": doc.get("data")})
    return out


def detail(root: Path, run_dir: Path, verifier: Verifier) -> dict:
    """Everything the run page shows (see the module docstring)."""
    ckpts = []
    for p in checkpoints(run_dir):
        state = _json(p / "trainer_state.json") or {}
        ckpts.append({"name": p.name, "path": p.relative_to(root).as_posix(), "step": state.get("step"),
                      **verifier.verdict(p)})
    env = _json(run_dir / "environment.json")
    return {
        "row": row(root, run_dir, None),
        "recipe": _text(run_dir / "recipe.yaml"),
        "summary": _json(run_dir / "summary.json"),
        "environment": env,
        "checkpoints": ckpts,
        "evals": eval_reports(run_dir),
        "grpo_samples": by_step(_jsonl(run_dir / "samples.jsonl")),
        "eval_samples": by_step(_jsonl(run_dir / "eval_samples.jsonl")),
    }
