"""Decoding speed: finetune's decoding path vs plain transformers `generate` vs llama.cpp, on the same model and
adapter, greedy, in one run.

    python scripts/bench_generate.py                      # SmolLM2-135M-Instruct, NF4 base + a LoRA adapter
    python scripts/bench_generate.py --quantize none      # a float base
    python scripts/bench_generate.py --model DIR --batches 1 --max-new-tokens 4 --repeats 1 --no-serve  # smallest

The adapter is random (rank 16 on every linear layer, B scaled like a trained one's: a trained adapter costs the
same), saved as a checkpoint directory on the base the way `finetune train` lays one out. finetune loads it as
`finetune chat` / `serve` do (the recipe's 4-bit base when it was trained on one) and decodes through
`finetune.generate` (the lean step where it models the network); transformers runs `model.generate` on that same
loaded model (what `finetune chat` and `eval --generate` ran before); llama.cpp (llama-cpp-python, the optional
`llamacpp` extra) runs `finetune export --type q8_0` of the same checkpoint with 2 threads, several sequences in
one `llama_decode` per step. Without llama-cpp-python it measures the rest and says so. The "int8 weights" row is
finetune's path under FINETUNE_DECODE_WEIGHTS=int8 (8-bit weights, as llama.cpp's q8_0; not the exact numbers).

Each configuration decodes `--max-new-tokens` tokens per sequence (end-of-sequence ignored) after the prompt's
prefill, and is timed whole (prefill included); tools alternate within every repeat, medians of `--repeats` are
reported with the 1-minute load average when each number was taken (the machine may be shared: compare the ratios).
`--serve` rows run `finetune serve`'s engine (no HTTP) with 16 concurrent streams of one adapter and of four
mixed adapters. Every tool runs under the allocator `finetune chat` and `serve` pick (tcmalloc where installed:
`--allocator`). Writes a table between markers in docs/performance.md (or --out) unless --no-write.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Tell me a story about a cat who lived in a small city by the sea."
START, END = "<!-- bench_generate:start -->", "<!-- bench_generate:end -->"


def make_adapter(model_dir: str, path: Path, seed: int, load_in_4bit: bool) -> Path:
    """A random LoRA checkpoint on `model_dir` (r 16, all linear layers) with tokenizer and recipe.yaml."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (path / "adapter_config.json").is_file():
        return path
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    net = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                                          task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    net.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    (path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(model_dir)},
                                                      "quantization": {"load_in_4bit": load_in_4bit}}))
    return path


def load(adapter: Path):
    """The model as `finetune chat` loads the checkpoint, and its tokenizer."""
    from finetune.generate import load_session

    session = load_session(str(adapter))
    return session.model, session.tok


def finetune_tps(model, prompt: list[int], batch: int, tokens: int, lm=None) -> float:
    """Tokens/s of `batch` sequences through finetune's decoding path (generate_ids' loop, no end-of-sequence); on
    `lm` (a lean model of `model`, e.g. `int8_model`'s) where given."""
    from finetune.generate.batch import LeanBatch
    from finetune.generate.decoder import Decoder, Sequence, active_adapter, lean_decoder

    decoder = lean_decoder(model) if lm is None else Decoder(LeanBatch(lm))
    if decoder is None:
        return float("nan")
    decoder.adapter = active_adapter(model)
    start = time.perf_counter()
    with torch.inference_mode():
        decoder.admit([[Sequence(list(prompt), tokens, frozenset(), decoder.adapter)] for _ in range(batch)])
        while decoder.rows:
            decoder.step()
    return batch * tokens / (time.perf_counter() - start)


def int8_model(model):
    """The lean model `finetune chat` decodes `model` with under FINETUNE_DECODE_WEIGHTS=int8 (None where the lean
    step does not model it or int8 is not faster on this CPU)."""
    from finetune.generate.decoder import lean_decoder, lean_model
    from finetune.generate.weights import DECODE_WEIGHTS

    os.environ[DECODE_WEIGHTS] = "int8"
    try:
        lm = lean_model(model) if lean_decoder(model) is not None else None
    finally:
        del os.environ[DECODE_WEIGHTS]
    return lm if lm is not None and lm.head.int8 is not None else None


def transformers_tps(model, prompt: list[int], batch: int, tokens: int) -> float:
    ids = torch.tensor([prompt] * batch)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                       pad_token_id=0)
    return batch * tokens / (time.perf_counter() - start)


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: `batch` sequences decoded together, one llama_decode per step."""

    def __init__(self, gguf: Path, sequences: int, context: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
        params = L.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_seq_max = context * sequences, context * sequences, sequences
        params.n_threads = params.n_threads_batch = torch.get_num_threads()
        params.kv_unified = True
        self.ctx = L.llama_init_from_model(self.model, params)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(context * sequences, 0, sequences)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list:
        """entries: (token, position, sequence, wants logits); the logits rows asked for, in order."""
        import numpy as np

        b = self.batch
        b.n_tokens = len(entries)
        for k, (token, pos, seq, logits) in enumerate(entries):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = token, pos, 1, logits
            b.seq_id[k][0] = seq
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return [np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, k), shape=(self.vocab,))
                for k, e in enumerate(entries) if e[3]]

    def tps(self, prompt: list[int], batch: int, tokens: int) -> float:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        rows = self._decode([(t, i, s, i == len(prompt) - 1) for s in range(batch) for i, t in enumerate(prompt)])
        last = [int(r.argmax()) for r in rows]
        for step in range(tokens - 1):
            rows = self._decode([(last[s], len(prompt) + step, s, True) for s in range(batch)])
            last = [int(r.argmax()) for r in rows]
        return batch * tokens / (time.perf_counter() - start)

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def export_q8(adapter: Path, out: Path) -> Path:
    from finetune.export import export

    if not out.is_file():
        export(adapter, out, type="q8_0", overwrite=True)
    return out


def engine_tps(model_dir: str, adapters: dict[str, Path], names: list[str], streams: int, tokens: int) -> float:
    """Aggregate tokens/s of `streams` concurrent greedy requests through `finetune serve`'s engine (request i names
    adapter i mod len(names)), all submitted at once, the engine stepping on this thread."""
    from finetune.serve import ServeOptions, load as serve_load
    from finetune.serve.engine import Job

    serving = _SERVING.get(id(adapters))
    if serving is None:
        serving = serve_load(model_dir, adapters={n: str(p) for n, p in adapters.items()},
                             options=ServeOptions(max_batch=max(streams, 16), max_queue=1024))
        _SERVING[id(adapters)] = serving
    engine, done = serving.engine, threading.Semaphore(0)
    served = [serving.registry.get(names[i % len(names)]) for i in range(streams)]
    prompt = served[0].tok(PROMPT)["input_ids"]
    start = time.perf_counter()
    for s in served:
        engine.submit(Job(prompt, s.adapter, tokens, frozenset(), emit=lambda i, t: False,
                          finish=lambda i, r, n: done.release()))
    while engine.waiting or engine.rows:
        engine.step()
    return streams * tokens / (time.perf_counter() - start)


_SERVING: dict[int, object] = {}


def grpo_share(steps: int, work: Path, allocator: str = "auto") -> list[tuple[str, float, float, float]]:
    """GRPO's generation share of a quickstart step (recipes/grpo_quickstart.yaml, `steps` steps after the first):
    the lean decode step vs the model's own generate (FINETUNE_DECODE=model), alternating, each a fresh
    `finetune train` (under the bench's `allocator`). [(path, generation s per step, step s, load average)]."""
    import json
    import subprocess

    out = []
    for path, env in (("finetune", {}), ("model.generate", {"FINETUNE_DECODE": "model"})):
        run = work / f"grpo-{path}"
        cmd = [sys.executable, "-m", "finetune", "train", str(ROOT / "recipes/grpo_quickstart.yaml"),
               f"training.max_steps={steps + 1}", f"output_dir={run}", "training.save_steps=1000", "--overwrite"]
        chosen = {"FINETUNE_ALLOCATOR": "glibc"} if allocator == "glibc" else {}
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, **chosen, **env}, check=True, capture_output=True)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "time/generation_s" in r][1:]  # the first step warms up
        out.append((path, statistics.median(r["time/generation_s"] for r in rows),
                    statistics.median(r["step_s"] for r in rows), os.getloadavg()[0]))
        print(f"GRPO {path}: generation {out[-1][1]:.2f} s of a {out[-1][2]:.2f} s step", flush=True)
    return out


def run(args) -> list[tuple[str, dict[int, list[tuple[float, float]]]]]:
    """[(row label, {batch: [(tokens/s, load average), ...]})]."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    quant = args.quantize == "4bit"
    adapter = make_adapter(args.model, work / f"adapter0-{args.quantize}", 0, quant)
    model, tok = load(adapter)
    prompt = tok(PROMPT)["input_ids"]
    eight = int8_model(model) if args.int8 else None  # (its speed probe first, before llama.cpp's threads start)
    llama, note = None, ""
    if not args.no_llamacpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            note = "llama-cpp-python is not installed (pip install 'finetune[llamacpp]'): llama.cpp not measured"
        else:
            gguf = export_q8(adapter, work / f"adapter0-{args.quantize}-q8_0.gguf")
            llama = LlamaCpp(gguf, max(args.batches), len(prompt) + args.max_new_tokens + 8)
    if note:
        print(note, flush=True)
    tools = {"finetune": lambda b: finetune_tps(model, prompt, b, args.max_new_tokens),
             "transformers generate": lambda b: transformers_tps(model, prompt, b, args.max_new_tokens)}
    if eight is not None:
        tools["finetune, int8 weights"] = lambda b: finetune_tps(model, prompt, b, args.max_new_tokens, eight)
    elif args.int8:
        print("finetune, int8 weights: not measured (the decode step keeps the exact weights here: the log says why)",
              flush=True)
    if llama is not None:
        tools["llama.cpp q8_0"] = lambda b: llama.tps(prompt, b, args.max_new_tokens)
    results: dict[str, dict[int, list]] = {name: {b: [] for b in args.batches} for name in tools}
    for fn in tools.values():  # warm-up, not counted
        fn(1)
    serve_rows = {}
    if args.serve:
        adapters = {f"adapter{i}": make_adapter(args.model, work / f"adapter{i}-{args.quantize}", i, quant)
                    for i in range(4)}
        serve_rows = {"serve engine, 1 adapter": ["adapter0"], "serve engine, 4 mixed adapters": list(adapters)}
        results.update({label: {args.streams: []} for label in serve_rows})
        engine_tps(args.model, adapters, ["adapter0"], 2, 2)  # warm-up
    for repeat in range(args.repeats):
        for b in args.batches:
            for name, fn in tools.items():
                results[name][b].append((fn(b), os.getloadavg()[0]))
                print(f"repeat {repeat + 1} batch {b} {name}: {results[name][b][-1][0]:.1f} tokens/s "
                      f"(load {results[name][b][-1][1]:.1f})", flush=True)
        for label, names in serve_rows.items():
            results[label][args.streams].append((engine_tps(args.model, adapters, names, args.streams,
                                                            args.max_new_tokens), os.getloadavg()[0]))
            print(f"repeat {repeat + 1} {label}: {results[label][args.streams][-1][0]:.1f} tokens/s", flush=True)
    if llama is not None:
        llama.close()
    return list(results.items()), note


def table(rows, batches: list[int], streams: int) -> str:
    cols = sorted(set(batches) | ({streams} if any(streams in r for _, r in rows) else set()))
    head = "| tokens/s (median; load avg) | " + " | ".join(f"batch {b}" for b in cols) + " |\n"
    head += "|---" * (len(cols) + 1) + "|\n"
    lines = []
    for label, by_batch in rows:
        cells = []
        for b in cols:
            got = by_batch.get(b)
            if not got:
                cells.append("-")
                continue
            tps = statistics.median(x for x, _ in got)
            cells.append(f"{tps:.1f} ({', '.join(f'{x:.1f}' for x, _ in got)}; load "
                         f"{', '.join(f'{load:.1f}' for _, load in got)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def ratios(rows, streams: int) -> str:
    med = {label: {b: statistics.median(x for x, _ in got) for b, got in r.items() if got} for label, r in rows}
    out = []
    llama = med.get("llama.cpp q8_0", {}).get(1)
    if llama:
        out.append(f"finetune batch 1 / llama.cpp batch 1: {med['finetune'].get(1, float('nan')) / llama:.2f}x "
                   "(target >= 0.7x)")
        if med.get("finetune, int8 weights", {}).get(1):
            out.append(f"finetune with int8 weights (FINETUNE_DECODE_WEIGHTS=int8) batch 1 / llama.cpp batch 1: "
                       f"{med['finetune, int8 weights'][1] / llama:.2f}x")
        serve = med.get("serve engine, 1 adapter", {}).get(streams)
        if serve:
            out.append(f"serve engine {streams} streams / llama.cpp single stream: {serve / llama:.2f}x "
                       "(target >= 1.5x)")
    one, four = med.get("serve engine, 1 adapter", {}).get(streams), \
        med.get("serve engine, 4 mixed adapters", {}).get(streams)
    if one and four:
        out.append(f"four mixed adapters / one adapter: {four / one:.2f}x (target >= 0.8x)")
    for b, tps in med.get("finetune", {}).items():
        hf = med.get("transformers generate", {}).get(b)
        if hf:
            out.append(f"finetune / transformers generate at batch {b}: {tps / hf:.2f}x")
    return "".join(f"- {line}\n" for line in out)


def grpo_lines(grpo: list[tuple[str, float, float, float]]) -> str:
    if not grpo:
        return ""
    lines = []
    for path in ("finetune", "model.generate"):
        got = [g for g in grpo if g[0] == path]
        gen, step = statistics.median(g[1] for g in got), statistics.median(g[2] for g in got)
        lines.append(f"- GRPO quickstart step, {path}: generation {gen:.2f} s of {step:.2f} s ({gen / step:.0%}; "
                     f"load {', '.join(f'{g[3]:.1f}' for g in got)})")
    return "".join(line + "\n" for line in lines)


def write(out: Path, text: str) -> None:
    doc = out.read_text() if out.is_file() else ""
    block = f"{START}\n{text}{END}\n"
    if START in doc and END in doc:
        doc = doc.split(START)[0] + block + doc.split(END, 1)[1].lstrip("\n")
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    out.write_text(doc)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models/SmolLM2-135M-Instruct"))
    ap.add_argument("--quantize", default="4bit", choices=["4bit", "none"], help="the base the adapter trains on")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=16, help="concurrent requests in the serve rows")
    ap.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp (and the GGUF export)")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                    help="also finetune's path with FINETUNE_DECODE_WEIGHTS=int8 (where it is faster on this CPU)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "finetune-bench-generate"),
                    help="adapters and GGUF exports, kept between runs")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/performance.md")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--grpo", type=int, default=0, metavar="STEPS", help="also GRPO's generation share of a "
                    "quickstart step, lean step vs model.generate, over STEPS steps after the first (needs make data)")
    ap.add_argument("--allocator", default="auto", choices=["auto", "glibc"],
                    help="auto: every tool under the allocator `finetune chat` / `serve` pick here (tcmalloc on CPU "
                    "where it is installed, finetune/model/allocator.py): the script re-executes itself under it; "
                    "glibc: as started")
    args = ap.parse_args(argv)
    if args.allocator == "auto" and argv is None:
        from finetune.model.allocator import execute, preloaded

        execute(preloaded([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]))
    from finetune.model.allocator import allocator_in_use

    rows, note = run(args)
    grpo = []
    for _ in range(args.repeats if args.grpo else 0):
        grpo += grpo_share(args.grpo, Path(args.work), args.allocator)
    flags = _cpu_flags()
    text = (f"`python scripts/bench_generate.py --quantize {args.quantize} --batches "
            f"{' '.join(map(str, args.batches))} --max-new-tokens {args.max_new_tokens} --repeats {args.repeats}`, "
            f"{time.strftime('%Y-%m-%d')}, {Path(args.model).name}, CPU flags: {flags or 'n/a'}, "
            f"{torch.get_num_threads()} threads, compute dtype {os.environ.get('FINETUNE_CPU_DTYPE', 'auto')}, "
            f"allocator {allocator_in_use()} (every tool)."
            f"{' ' + note + '.' if note else ''}\n\n" + table(rows, args.batches, args.streams) + "\n" +
            ratios(rows, args.streams) + grpo_lines(grpo))
    print(text)
    if not args.no_write:
        write(args.out, text)


def _cpu_flags() -> str:
    try:
        words = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return ""
    return " ".join(w for w in words if w.startswith(("avx", "amx")))


if __name__ == "__main__":
    main()
