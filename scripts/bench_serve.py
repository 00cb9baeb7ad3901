"""`finetune serve` under N concurrent clients vs plain transformers `generate`, one request at a time.

    python scripts/bench_serve.py --model models/SmolLM2-135M-Instruct --clients 1 4 16 --max-tokens 24

Four LoRA adapters (random non-zero weights, rank 8, all linear layers: a trained adapter costs the same) are
made on the model; the server runs in this process on a free loopback port. For each client count and for one
adapter vs the four mixed (request i names adapter i mod 4), the clients send greedy streamed chat requests
(`stream_options.include_usage`) back to back; each configuration is bounded by a request count and a time
limit. Reported: requests/s, generated tokens/s, p50/p99 latency and time to first token. The baseline is the same
requests through `model.generate` on the same loaded model (set_adapter per request), one at a time: its latency
is one request's own (no queueing behind the others), its time to first token is not measured (no streamer).
Writes a table between markers in docs/performance.md (or --out). Keep it short on a shared machine and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["Name three colors.", "Say hi to a friend.", "What is the capital of France?", "Count from one to five.",
           "Describe a cat in one sentence.", "Give a short reply with only the final number: 2 + 3.",
           "Extract the person's name, age and city as JSON: Lena, 29, teacher, Oslo.", "Write a haiku about rain."]
START, END = "<!-- bench_serve:start -->", "<!-- bench_serve:end -->"


def make_adapters(model_dir: str, root: Path, count: int) -> dict[str, str]:
    """`count` saved LoRA adapters over `model_dir` (random A and B, B scaled like a trained one's), each with
    the tokenizer and a recipe.yaml (full-precision base), as a checkpoint directory is laid out."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for i in range(count):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        net = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                              init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        path = root / f"adapter{i}"
        net.save_pretrained(path)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
        (path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": model_dir},
                                                          "quantization": {"load_in_4bit": False}}))
        out[f"adapter{i}"] = str(path)
    return out


class Server:
    """uvicorn on a thread on a free loopback port (as tests/test_serve.py runs it)."""

    def __init__(self, serving):
        import uvicorn

        from finetune.serve import app, listen

        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app(serving), log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)


def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency, time to first token, generated tokens) of one streamed greedy chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    latency = time.perf_counter() - start
    return latency, first if first is not None else latency, tokens


def drive(url: str, clients: int, models: list[str], requests: int, max_tokens: int, seconds: float) -> dict:
    """`clients` threads send `requests` in all (request i: model i mod len(models), prompt i mod 8), each
    thread back to back, none started after `seconds`."""
    import httpx

    results, lock, counter = [], threading.Lock(), iter(range(requests))
    deadline = time.perf_counter() + seconds

    def worker():
        with httpx.Client(timeout=600) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                r = one_request(client, url, models[i % len(models)], PROMPTS[i % len(PROMPTS)], max_tokens)
                with lock:
                    results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(results, time.perf_counter() - start)


def summary(results: list[tuple[float, float | None, int]], wall: float) -> dict:
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results if r[1] is not None)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    return {"requests": len(results), "rps": len(results) / wall, "tps": sum(r[2] for r in results) / wall,
            "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "ttft50": pct(ttft, 0.5) if ttft else None}


@torch.inference_mode()
def baseline(serving, models: list[str], requests: int, max_tokens: int, seconds: float) -> dict:
    """The same requests through `model.generate` (greedy, KV cache), one at a time, on the served model."""
    from finetune.generate import GenerationOptions, generation_kwargs, render_messages

    net, results = serving.engine.model, []
    start = time.perf_counter()
    for i in range(requests):
        if time.perf_counter() - start > seconds:
            break
        served = serving.registry.get(models[i % len(models)])
        ids = render_messages(served.tok, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], served.name)
        net.set_adapter(served.adapter)
        kwargs = generation_kwargs(net, served.tok, GenerationOptions(max_new_tokens=max_tokens))
        t0 = time.perf_counter()
        out = net.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           **kwargs)
        row = out[0, len(ids):].tolist()
        n = next((k + 1 for k, t in enumerate(row) if t in served.eos), len(row))
        results.append((time.perf_counter() - t0, None, n))
    serving.engine.adapters_changed()  # the engine sets its adapter again
    return summary(results, time.perf_counter() - start)


def table(rows: list[tuple[str, str, dict, dict]]) -> str:
    head = ("| adapters | clients | requests | req/s | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | "
            "tokens/s vs one at a time |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for mix, clients, r, base in rows:
        ttft = f"{r['ttft50']:.2f}" if r["ttft50"] is not None else "-"
        ratio = f"{r['tps'] / base['tps']:.2f}x" if base["tps"] else "-"
        lines.append(f"| {mix} | {clients} | {r['requests']} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.2f} | "
                     f"{r['p99']:.2f} | {ttft} | {ratio} |")
    return head + "\n".join(lines) + "\n"


def write(out: Path, text: str) -> None:
    doc = out.read_text() if out.is_file() else ""
    block = f"{START}\n{text}{END}\n"
    if START in doc and END in doc:
        doc = doc.split(START)[0] + block + doc.split(END, 1)[1].lstrip("\n")
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    out.write_text(doc)


def run(args) -> list[tuple[str, str, dict, dict]]:
    from finetune.serve import ServeOptions, load

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, Path(tmp), 4)
        serving = load(args.model, adapters=adapters, quantize=args.quantize,
                       options=ServeOptions(max_batch=max(args.clients), max_queue=1024))
        server = Server(serving)
        try:  # warm-up, not counted: the first forward passes of a process are slow
            baseline(serving, ["adapter0"], 1, args.max_tokens, args.seconds)
            drive(server.url, 1, ["adapter0"], 1, args.max_tokens, args.seconds)
            for mix, models in [("1", ["adapter0"]), ("4 mixed", list(adapters))]:
                base = baseline(serving, models, args.requests or 8,
                                args.max_tokens, args.seconds)
                rows.append((mix, "one at a time (`generate`)", base, base))
                print(f"{mix} adapters, generate one at a time: {base}", flush=True)
                for clients in args.clients:
                    r = drive(server.url, clients, models, args.requests or max(2 * clients, 4), args.max_tokens,
                              args.seconds)
                    rows.append((mix, str(clients), r, base))
                    print(f"{mix} adapters, {clients} clients: {r}", flush=True)
        finally:
            server.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models/SmolLM2-135M-Instruct"))
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=0, help="requests per configuration (default: 2 x clients, "
                    "at least 4)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=60.0, help="no request starts later than this per run")
    ap.add_argument("--quantize", default="none", choices=["auto", "4bit", "none"])
    ap.add_argument("--out", type=Path, default=ROOT / "docs/performance.md")
    args = ap.parse_args()
    rows = run(args)
    note = (f"## Serving: `finetune serve` vs one-at-a-time generate ({time.strftime('%Y-%m-%d')})\n\n"
            f"`python scripts/bench_serve.py --model {Path(args.model).name} --clients "
            f"{' '.join(map(str, args.clients))} --max-tokens {args.max_tokens} --quantize {args.quantize}`, "
            f"{'CUDA' if torch.cuda.is_available() else 'CPU'}, {torch.get_num_threads()} torch threads, load "
            f"average {os.getloadavg()[0]:.1f} at the end. Greedy streamed chat requests of up to "
            f"{args.max_tokens} tokens; 'one at a time' is `model.generate` on the same model (set_adapter per "
            "request), its latency a request's own with no queueing, no TTFT.\n\n")
    write(args.out, note + table(rows))
    print(note + table(rows))


if __name__ == "__main__":
    main()
