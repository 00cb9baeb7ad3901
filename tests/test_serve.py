"""`finetune serve` on the 2-layer Llama (4-bit) with two adapters, through the official `openai` client and raw
HTTP: the models list, chat and completions (streamed and not), greedy replies equal to `finetune chat --prompt`,
isolation of adapters under concurrency, mixed-adapter batches that rows join and leave, adapters added and removed
while serving, the API key, each limit, a client that disconnects, and SIGTERM draining the requests in flight.

The adapters are not trained: random non-zero LoRA weights (test_merge.make_adapter) give the two adapters and the
base three different greedy replies, which is what the isolation checks need, in a fraction of a second. Servers
run in-process on a free loopback port; one runs its engine thread, one is stepped by the test (`start=False`), so
batching and disconnects are checked at known steps instead of by timing. The CLI and SIGTERM run in a subprocess.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import load_base
from test_merge import make_adapter
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from finetune.cli import app as cli_app
from finetune.generate.lean import compute_dtype
from finetune.generate.session import ChatOptions, Session, load_session, reply
from finetune.model import allocator
from finetune.recipe.schema import QuantizationSection

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from finetune.serve import ServeOptions, app, listen, load  # noqa: E402  (needs the serve extra)

runner = CliRunner()
PROMPT = "Repeat the word twice."
TOKENS = 20
KEY = "sk-test-key"
ROOT = Path(__file__).resolve().parents[1]


class Server:
    """uvicorn on a thread, on a free loopback port."""

    def __init__(self, serving, start=True):
        self.serving = serving
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(app(serving, start=start), log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.uvicorn.started

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def post(self, path, body, key=KEY, **kw):
        return httpx.post(self.url + path, content=json.dumps(body).encode(), timeout=60, **kw,  # ASCII escapes
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(30)


def until(condition, seconds=30.0):
    """Wait (bounded) for condition() to hold."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serve_adapters")
    return {"one": make_adapter(root / "one", tiny_model_dir, seed=0),
            "two": make_adapter(root / "two", tiny_model_dir, seed=1)}


@pytest.fixture(scope="module")
def expected(adapters, tiny_model_dir):
    """Each model's greedy reply to PROMPT, one at a time, through `finetune chat`'s own code."""
    options = ChatOptions(max_new_tokens=TOKENS)
    out = {name: reply(load_session(str(path)), PROMPT, options) for name, path in adapters.items()}
    session = load_session(str(adapters["one"]))
    base = Session(load_base(str(tiny_model_dir), QuantizationSection()).eval(), session.tok, str(tiny_model_dir))
    out[tiny_model_dir.name] = reply(base, PROMPT, options)
    assert len(set(out.values())) == 3  # the base and the two adapters answer differently
    return out


@pytest.fixture(scope="module")
def server(adapters):
    s = Server(load(str(adapters["one"]), adapters={"two": str(adapters["two"])},
                    options=ServeOptions(api_key=KEY, max_tokens=64, max_n=4, max_body_bytes=20_000)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stepped(adapters):
    """A server whose engine thread is not started: the test calls engine.step()."""
    s = Server(load(str(adapters["one"]), adapters={"two": str(adapters["two"])},
                    options=ServeOptions(max_queue=3)), start=False)
    yield s
    s.stop()


def chat(client, model, **kw):
    return client.chat.completions.create(**{"model": model, "messages": [{"role": "user", "content": PROMPT}],
                                             "temperature": 0, "max_tokens": TOKENS, **kw})


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_models_list_health_and_api_key(server, tiny_model_dir):
    assert [m.id for m in server.client().models.list()] == [tiny_model_dir.name, "one", "two"]
    health = httpx.get(server.url + "/health", timeout=10)  # the one endpoint without the key
    assert health.status_code == 200 and health.json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert error_of(httpx.get(server.url + "/v1/models", headers=headers), 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        chat(server.client(key="wrong"), "one")


def test_greedy_reply_equals_finetune_chat_and_streams_the_same(server, adapters, expected):
    result = runner.invoke(cli_app, ["chat", str(adapters["two"]), "--prompt", PROMPT, "--max-new-tokens",
                                     str(TOKENS)])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected["two"] + "\n"
    answer = chat(server.client(), "two")
    assert answer.choices[0].message.content == expected["two"]
    assert answer.object == "chat.completion" and answer.model == "two"
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == TOKENS
    prompt = server.serving.registry.get("two").tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert answer.usage.prompt_tokens == len(prompt["input_ids"])
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + TOKENS

    chunks = list(chat(server.client(), "two", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["two"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == TOKENS
    raw = server.post("/v1/chat/completions", {"model": "one", "stream": True, "max_tokens": 3, "temperature": 0,
                                               "messages": [{"role": "user", "content": PROMPT}]})
    events = [line for line in raw.text.split("\n\n") if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_completions_sampling_n_and_stop(server, tiny_model_dir):
    client = server.client()
    text = client.completions.create(model="one", prompt="The cat", max_tokens=12, temperature=0).choices[0].text
    streamed = client.completions.create(model="one", prompt="The cat", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text and len(text) > 4
    stop = next(c for c in text[2:] if c.isascii() and c.isalnum())  # one byte: never half of a character
    cut = client.completions.create(model="one", prompt="The cat", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"

    sampled = [client.completions.create(model=tiny_model_dir.name, prompt="The cat", max_tokens=8, n=3,
                                         temperature=1.0, top_p=0.9, seed=7) for _ in range(2)]
    texts = [[c.text for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # seeded: repeatable; each choice its own draw
    assert [c.index for c in sampled[0].choices] == [0, 1, 2]
    assert sampled[0].usage.completion_tokens == 24 and sampled[0].object == "text_completion"


def test_concurrent_requests_for_different_adapters_keep_their_own_replies(server, expected, tiny_model_dir):
    names = ["one", "two", tiny_model_dir.name] * 4
    client, answers = server.client(), {}

    def ask(i, name):
        answers[i] = chat(client, name).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i, name)) for i, name in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [answers.get(i) for i in range(len(names))] == [expected[name] for name in names]


def test_rows_of_different_adapters_share_a_step_join_and_leave(stepped, expected, tiny_model_dir):
    engine, client, answers = stepped.serving.engine, stepped.client(), {}

    def ask(i, name, tokens):
        answers[i] = chat(client, name, max_tokens=tokens).choices[0].message.content

    first = [threading.Thread(target=ask, args=(i, name, tokens)) for i, (name, tokens)
             in enumerate([("one", TOKENS), ("two", 4), (tiny_model_dir.name, TOKENS)])]
    for t in first:
        t.start()
    until(lambda: len(engine.waiting) == 3)
    busy = stepped.post("/v1/chat/completions", {"model": "one", "messages": [{"role": "user", "content": "x"}]})
    assert error_of(busy, 429)["code"] == "rate_limit_exceeded"  # --max-queue 3
    before = dict(vars(engine.stats))
    engine.step()  # all three prefilled, then one decoding pass over three adapters
    assert len(engine.rows) == 3 and engine.stats.mixed_steps == before["mixed_steps"] + 1
    late = threading.Thread(target=ask, args=(3, "two", TOKENS))
    late.start()
    until(lambda: len(engine.waiting) == 1)
    engine.step()  # the late one joins the running batch
    assert len(engine.rows) == 4 and engine.stats.joined > before["joined"]
    for _ in range(3):
        engine.step()
    assert len(engine.rows) == 3  # "two" with max_tokens 4 has left
    while engine.rows:
        engine.step()
    for t in [*first, late]:
        t.join(30)
    two_short = reply(load_session(str(stepped.serving.registry.get("two").path)), PROMPT, ChatOptions(max_new_tokens=4))
    assert answers == {0: expected["one"], 1: two_short, 2: expected[tiny_model_dir.name], 3: expected["two"]}


def test_a_client_that_disconnects_frees_its_slot(stepped):
    engine = stepped.serving.engine
    cancelled = engine.stats.cancelled
    body = {"model": "one", "stream": True, "max_tokens": 50, "messages": [{"role": "user", "content": PROMPT}]}
    with httpx.stream("POST", stepped.url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk
        engine.step()
        engine.step()
        assert len(engine.rows) == 1
    until(lambda: engine.rows[0].job.cancelled)  # the server noticed the closed connection
    engine.step()
    assert engine.rows == [] and engine.stats.cancelled == cancelled + 1
    with pytest.raises(httpx.ReadTimeout):  # a plain request, given up while it waits in the queue
        httpx.post(stepped.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
    until(lambda: engine.waiting and engine.waiting[0].cancelled)
    engine.step()
    assert not engine.waiting and engine.stats.cancelled == cancelled + 2


def make_dora(path, model_dir):
    """A DoRA adapter (random LoRA weights, magnitudes from the base) laid out like a checkpoint."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(2)
    base = load_base(str(model_dir), QuantizationSection())
    net = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                          init_lora_weights=False, task_type="CAUSAL_LM"))
    net.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    (path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(model_dir)},
                                                      "quantization": QuantizationSection().model_dump()}))
    return path


def test_one_served_adapter_runs_folded_and_a_base_request_waits_for_its_batch(adapters, expected, tiny_model_dir):
    """Serving one adapter in float32, its batch runs it folded into the weights (as `chat` does); a base request
    cannot share that batch and is answered after it, by the base. In bf16 nothing is folded: they share one."""
    one = Server(load(str(adapters["one"]), options=ServeOptions(max_queue=4)), start=False)
    try:
        engine, client, answers = one.serving.engine, one.client(), {}

        def ask(i, name):
            answers[i] = chat(client, name).choices[0].message.content

        names = ["one", tiny_model_dir.name, "one"]
        threads = []
        for i, name in enumerate(names):  # queued in this order
            threads.append(threading.Thread(target=ask, args=(i, name)))
            threads[-1].start()
            until(lambda: len(engine.waiting) == i + 1)
        batches, folded = [], []
        while engine.waiting or engine.rows:
            engine.step()
            batches.append({r.job.adapter for r in engine.rows})
            folded.append(engine.decoder.batch.lm.folded)
        for t in threads:
            t.join(30)
        assert answers == {0: expected["one"], 1: expected[tiny_model_dir.name], 2: expected["one"]}
        name = one.serving.registry.get("one").adapter  # the PEFT adapter's name in the server
        if compute_dtype(engine.model) == torch.float32:
            assert folded[0] == name and batches[0] == {name}  # the base request waited
            assert all(b <= {name} for b, f in zip(batches, folded) if f)  # nothing joined a folded batch
            assert any(len(b) == 2 for b, f in zip(batches, folded) if not f)  # the base and "one", batched LoRA
        else:
            assert set(folded) == {None} and len(batches[0]) == 2  # one batch, batched LoRA
    finally:
        one.stop()


def test_a_dora_adapter_is_batched_only_with_itself(stepped, expected, tmp_path, tiny_model_dir):
    dora = make_dora(tmp_path / "dora", tiny_model_dir)
    alone = reply(load_session(str(dora)), PROMPT, ChatOptions(max_new_tokens=TOKENS))
    assert stepped.post("/v1/adapters", {"name": "dora", "path": str(dora)}).status_code == 200
    engine, client, answers = stepped.serving.engine, stepped.client(), {}

    def ask(i, name):
        answers[i] = chat(client, name).choices[0].message.content

    names = ["dora", "one", "dora"]
    threads = []
    for i, name in enumerate(names):  # queued in this order
        threads.append(threading.Thread(target=ask, args=(i, name)))
        threads[-1].start()
        until(lambda: len(engine.waiting) == i + 1)
    mixed, batches = engine.stats.mixed_steps, []
    while engine.waiting or engine.rows:
        engine.step()
        batches.append(sorted({r.job.adapter for r in engine.rows}))
    for t in threads:
        t.join(30)
    assert engine.stats.mixed_steps == mixed and all(len(b) <= 1 for b in batches)  # never mixed with DoRA
    assert answers == {0: alone, 1: expected["one"], 2: alone}
    assert httpx.delete(stepped.url + "/v1/adapters/dora").status_code == 200


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, expected):
    messages = [{"role": "user", "content": PROMPT}]
    bad = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "one", "messages": [',
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=10)
    assert error_of(bad, 400)["code"] == "invalid_json"
    assert error_of(server.post("/v1/chat/completions", {"model": "nope", "messages": messages}), 404)["code"] == \
        "model_not_found"
    cases = [({"temperature": 3}, "temperature"), ({"max_tokens": 65}, "max_tokens"), ({"n": 5}, "n"),
             ({"messages": []}, "messages"), ({"logprobs": True}, "logprobs"), ({"stop": ["a"] * 5}, "stop"),
             ({"messages": [{"role": "user", "content": "cat " * 300}]}, "messages"),
             ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"), ({"stop": "\udfff"}, "stop")]
    for change, param in cases:
        err = error_of(server.post("/v1/chat/completions", {"model": "one", "messages": messages, **change}), 400)
        assert err["param"] == param and err["type"] == "invalid_request_error", (change, err)
    assert error_of(server.post("/v1/completions", {"model": "one", "prompt": ["ok", "\ud800"]}), 400)["param"] == \
        "prompt"  # a lone surrogate (valid JSON escape, not Unicode text) never reaches the tokenizer
    assert error_of(server.post("/v1/completions", {"model": "one", "prompt": "x" * 30_000}), 413)["code"] == \
        "request_too_large"
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="one", messages=messages, max_tokens=1000)
    assert e.value.code == "invalid_value"
    assert chat(server.client(), "one").choices[0].message.content == expected["one"]


def test_a_failing_forward_pass_is_a_500_and_the_next_request_is_served(server, expected, monkeypatch):
    engine = server.serving.engine
    real, calls = engine._forward, []

    def fail_the_second(*args):  # the prefill passes, the first decoding pass fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated device failure")
        return real(*args)

    monkeypatch.setattr(engine, "_forward", fail_the_second)
    err = error_of(server.post("/v1/chat/completions", {"model": "one", "max_tokens": 5, "temperature": 0,
                                                        "messages": [{"role": "user", "content": PROMPT}]}), 500)
    assert err["type"] == "server_error"
    until(lambda: engine.rows == [])  # its row left the batch
    assert chat(server.client(), "one").choices[0].message.content == expected["one"]


def test_adapters_are_added_and_removed_while_serving(server, adapters, expected, tmp_path, tiny_tokenizer_dir):
    client = server.client()
    added = server.post("/v1/adapters", {"name": "three", "path": str(adapters["two"])})
    assert added.status_code == 200 and added.json()["id"] == "three"
    assert "three" in [m.id for m in client.models.list()]
    assert chat(client, "three").choices[0].message.content == expected["two"]
    assert error_of(server.post("/v1/adapters", {"name": "three", "path": str(adapters["one"])}), 409)
    assert httpx.delete(server.url + "/v1/adapters/three", headers={"Authorization": f"Bearer {KEY}"}).status_code \
        == 200
    with pytest.raises(openai.NotFoundError):
        chat(client, "three")

    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(adapters["one"]), str(damaged)], check=True)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    other = tmp_path / "other_base"  # another model: hidden size 32
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(other)
    subprocess.run(["cp", "-r", *map(str, tiny_tokenizer_dir.iterdir()), str(other)], check=True)
    foreign = make_adapter(tmp_path / "foreign", other)
    for path, words in [(tmp_path / "missing", "no adapter_config.json"), (damaged, "adapter_model.safetensors"),
                        (foreign, "hidden_size 32 vs 64")]:
        err = error_of(server.post("/v1/adapters", {"name": "bad", "path": str(path)}), 400)
        assert words in err["message"] and err["param"] == "path", err
    base = [m.id for m in client.models.list()][0]
    assert error_of(httpx.delete(f"{server.url}/v1/adapters/{base}", headers={"Authorization": f"Bearer {KEY}"}), 400)
    assert [m.id for m in client.models.list()] == [base, "one", "two"]
    assert chat(client, "one").choices[0].message.content == expected["one"]


def test_a_base_served_alone_takes_its_first_adapter_and_loses_its_last(adapters, expected, tiny_model_dir):
    s = Server(load(str(tiny_model_dir), quantize="4bit"))  # the base directory: no adapter yet
    try:
        client, base = s.client(), tiny_model_dir.name
        assert [m.id for m in client.models.list()] == [base]
        assert chat(client, base).choices[0].message.content == expected[base]
        assert s.post("/v1/adapters", {"name": "one", "path": str(adapters["one"])}).status_code == 200
        assert chat(client, "one").choices[0].message.content == expected["one"]
        assert chat(client, base).choices[0].message.content == expected[base]
        assert httpx.delete(s.url + "/v1/adapters/one").status_code == 200
        until(lambda: not s.serving.engine.model.peft_config)  # deleted once no request used it
        assert chat(client, base).choices[0].message.content == expected[base]
        assert s.post("/v1/adapters", {"name": "two", "path": str(adapters["two"])}).status_code == 200
        assert chat(client, "two").choices[0].message.content == expected["two"]
    finally:
        s.stop()


def test_cli_serves_and_sigterm_drains_requests_in_flight(adapters, tmp_path):
    result = runner.invoke(cli_app, ["serve", str(tmp_path / "nothing"), "--port", "0"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(cli_app, ["serve", str(adapters["one"]), "--adapter", "no-equals-sign"])
    assert result.exit_code == 2 and "NAME=PATH" in result.output
    env = {k: v for k, v in os.environ.items() if k not in ("FINETUNE_ALLOCATOR", allocator.MARK)}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", str(adapters["one"]), "--adapter",
                             f"two={adapters['two']}", "--port", "0"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 180
        while "http://" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, line
            line = proc.stderr.readline()
        url = line.split("http://", 1)[1].split("/v1", 1)[0]
        if sys.platform.startswith("linux"):  # serve re-executed itself under tcmalloc where it is installed
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            assert ("libtcmalloc" in maps) == (allocator.find_tcmalloc() is not None and allocator.cpu_only(env))
        body = {"model": "two", "max_tokens": 200, "temperature": 0, "messages": [{"role": "user", "content": PROMPT}]}
        # the whole greedy reply, undisturbed: its length (200, or fewer where the compute dtype's rounding makes
        # the random adapter say its end token sooner) is what the drained stream must reach too
        whole = httpx.post(f"http://{url}/v1/chat/completions", json=body, timeout=120).json()["usage"]
        body.update(stream=True, stream_options={"include_usage": True})
        events, killed = [], []
        with httpx.stream("POST", f"http://{url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    events.append((bool(killed), line))
                if '"content": "' in line and not killed:
                    proc.send_signal(signal.SIGTERM)
                    killed.append(True)
        assert proc.wait(60) == 0
        after = [line for was_killed, line in events if was_killed]
        assert after and after[-1] == "data: [DONE]"  # answered to the end after SIGTERM
        assert json.loads(after[-2][6:])["usage"]["completion_tokens"] == whole["completion_tokens"] > 8
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


REAL = ROOT / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "config.json").exists(), reason="run `make fetch` first")
def test_real_model_batched_replies_equal_chat_one_by_one(tmp_path):
    """SmolLM2-135M in the compute dtype chat uses (bf16 on CPUs that have it): four requests for two adapters
    decoded in one mixed batch answer exactly as `finetune chat` answers each alone."""
    paths = {name: make_adapter(tmp_path / name, REAL, seed=i, load_in_4bit=False)
             for i, name in enumerate(["one", "two"])}
    options = ChatOptions(max_new_tokens=TOKENS)
    expected = {name: reply(load_session(str(path)), PROMPT, options) for name, path in paths.items()}
    s = Server(load(str(paths["one"]), adapters={"two": str(paths["two"])}), start=False)
    try:
        engine, client, answers = s.serving.engine, s.client(), {}

        def ask(i, name):
            answers[i] = chat(client, name).choices[0].message.content

        names = ["one", "two", "one", "two"]
        threads = [threading.Thread(target=ask, args=(i, name)) for i, name in enumerate(names)]
        for t in threads:
            t.start()
        until(lambda: len(engine.waiting) == 4, 120)
        while engine.waiting or engine.rows:
            engine.step()
        for t in threads:
            t.join(60)
        assert engine.stats.mixed_steps > 0
        assert answers == {i: expected[name] for i, name in enumerate(names)}
    finally:
        s.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not (REAL / "config.json").exists(), reason="run `make fetch` first")
def test_vllm_serves_the_same_adapter_directories(tmp_path):
    """The checkpoints finetune writes are what vLLM's `--enable-lora --lora-modules name=path` takes (where vLLM is
    installed); `finetune serve` on the GPU answers as `finetune chat` does. Written without a GPU to run it on."""
    pytest.importorskip("vllm")
    paths = {name: make_adapter(tmp_path / name, REAL, seed=i, load_in_4bit=False)
             for i, name in enumerate(["one", "two"])}
    expected = reply(load_session(str(paths["one"])), PROMPT, ChatOptions(max_new_tokens=TOKENS))
    ours = Server(load(str(paths["one"]), adapters={"two": str(paths["two"])}))
    try:
        assert chat(ours.client(), "one").choices[0].message.content == expected
    finally:
        ours.stop()
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(["vllm", "serve", str(REAL), "--port", str(port), "--enable-lora", "--max-lora-rank", "8",
                             "--lora-modules", *(f"{n}={p}" for n, p in paths.items()), "--gpu-memory-utilization",
                             "0.3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "vLLM did not start"
            try:
                ids = [m.id for m in client.models.list()]
                break
            except openai.APIConnectionError:
                time.sleep(2)
        assert {"one", "two"} <= set(ids)
        theirs = chat(client, "one").choices[0].message.content
        same = next((i for i, (a, b) in enumerate(zip(theirs, expected)) if a != b), min(len(theirs), len(expected)))
        print(f"GPU vllm-lora: finetune and vLLM greedy replies agree on the first {same} characters")
        assert theirs
    finally:
        proc.terminate()
        proc.wait(60)
