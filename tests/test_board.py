"""`finetune board` on tiny runs: the JSON routes (runs table, metrics from an offset, recipe diff, token, paths
confined to RUNS_DIR, damaged runs), then the page itself in a real headless browser (Debian's chromium and
chromedriver through Selenium): table, curves equal to metrics.jsonl, a live point without reload, the recipe
diff, launch (a bad override refused next to its key, a 3-step run to the end), stop (SIGTERM: a checkpoint)
and resume, and a streamed chat reply equal to `finetune chat --prompt`.

The runs are trained once per module by the real CLI on the 2-layer fixture model; the server is the real
uvicorn on a free loopback port, in a thread of this process.
"""

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import write_jsonl
from typer.testing import CliRunner

from finetune.artifacts import hold
from finetune.board import make_app
from finetune.cli import app as cli_app

runner = CliRunner()
TOKEN = "test-token-123"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PROMPT = "Repeat the word twice."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recipe_body(model_dir, data_dir, name, out=None, **training) -> dict:
    body = {
        "name": name, "model": {"name_or_path": str(model_dir)}, "quantization": {"load_in_4bit": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"), "format": "alpaca",
                 "max_length": 32},
        "training": {"max_steps": 4, "micro_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1,
                     "eval_steps": 2, "save_steps": 2, "optimizer": "adamw_torch", "gradient_checkpointing": False,
                     "seed": 3, **training},
    }
    if out:
        body["output_dir"] = str(out)
    return body


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, toy_alpaca_rows):
    """runs/alpha and runs/beta (trained, different learning rates), a sweep with one point, a damaged run,
    and recipes/tiny.yaml for the launch form."""
    root = tmp_path_factory.mktemp("board")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", toy_alpaca_rows[:16])
    write_jsonl(data / "eval.jsonl", toy_alpaca_rows[40:44])
    runs, recipes = root / "runs", root / "recipes"
    recipes.mkdir()
    for name, lr in (("alpha", 1e-2), ("beta", 3e-3)):
        path = root / f"{name}.yaml"
        path.write_text(json.dumps(recipe_body(tiny_model_dir, data, name, runs / name, learning_rate=lr)))
        result = runner.invoke(cli_app, ["train", str(path)])
        assert result.exit_code == 0, result.output
    shutil.copytree(runs / "alpha", runs / "grid-sweep" / "lr-0.01")
    (runs / "grid-sweep" / "sweep.json").write_text("{}")
    (runs / "broken").mkdir()
    (runs / "broken" / "recipe.yaml").write_text("model: [unclosed\n")
    (recipes / "tiny.yaml").write_text(json.dumps(recipe_body(tiny_model_dir, data, "tiny")))
    return {"root": root, "runs": runs, "recipes": recipes, "data": data}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(world):
    import uvicorn

    port = free_port()
    app = make_app(world["runs"], world["recipes"], TOKEN)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the board did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "app": app}
    srv.should_exit = True
    thread.join(timeout=90)


def get(server, path, token=TOKEN, **kw):
    return httpx.get(server["url"] + path, headers={"X-Board-Token": token} if token else {}, timeout=30, **kw)


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- JSON routes


def test_runs_table_rows(server, world):
    rows = {r["id"]: r for r in get(server, "/api/runs").json()["runs"]}
    assert set(rows) == {"alpha", "beta", "broken", "grid-sweep/lr-0.01"}
    alpha = rows["alpha"]
    assert (alpha["status"], alpha["objective"], alpha["method"], alpha["steps"], alpha["total_steps"]) == (
        "finished", "sft", "lora", 4, 4)
    summary = json.loads((world["runs"] / "alpha" / "summary.json").read_text())
    assert alpha["best_eval_loss"] == summary["best_eval_loss"]
    assert alpha["peak_memory_gib"] == summary["peak_memory_gib"]
    assert alpha["checkpoints"] == ["checkpoint-2", "checkpoint-final"]
    assert rows["grid-sweep/lr-0.01"]["group"] == "grid-sweep" and rows["alpha"]["group"] is None
    assert rows["broken"]["status"] == "damaged" and "YAML" in rows["broken"]["problem"]


def test_metrics_from_an_offset_and_recipe_diff(server, world):
    lines = metrics_lines(world["runs"] / "alpha")
    whole = get(server, "/api/metrics/alpha").json()
    assert whole["rows"] == lines and all("time" in r for r in lines)
    assert get(server, f"/api/metrics/alpha?offset={whole['offset']}").json()["rows"] == []
    diff = get(server, "/api/diff", params={"a": "alpha", "b": "beta"}).json()["diff"]
    assert diff == [{"key": "name", "a": "alpha", "b": "beta"},
                    {"key": "output_dir", "a": str(world["runs"] / "alpha"), "b": str(world["runs"] / "beta")},
                    {"key": "training.learning_rate", "a": 1e-2, "b": 3e-3}]


def test_inside_a_run(server, world):
    d = get(server, "/api/run/alpha").json()
    assert [(c["name"], c["intact"]) for c in d["checkpoints"]] == [("checkpoint-2", True), ("checkpoint-final", True)]
    assert d["environment"]["data_fingerprint"] and d["recipe"].startswith("name: alpha")
    # a checkpoint changed after it was written: verify's verdict names the file
    shutil.copytree(world["runs"] / "beta", world["runs"] / "gamma")
    (world["runs"] / "gamma" / "checkpoint-2" / "adapter_config.json").write_text("{}")
    try:
        d = get(server, "/api/run/gamma").json()
        assert [c["intact"] for c in d["checkpoints"]] == [False, True]
        assert "adapter_config.json" in d["checkpoints"][0]["summary"]
    finally:
        shutil.rmtree(world["runs"] / "gamma")


def test_token_and_paths_are_refused(server, world):
    assert get(server, "/api/runs", token=None).status_code == 403
    assert get(server, "/api/runs", token="wrong").status_code == 403
    assert get(server, "/", token=None).status_code == 403
    page = httpx.get(server["url"] + f"/?token={TOKEN}", timeout=30)
    assert page.status_code == 200 and page.cookies.get("finetune_board_token") == TOKEN
    (world["root"] / "secret.txt").write_text("no")
    for path in ["/api/run/..%2Fdata", "/api/metrics/../../etc/passwd", "/api/run/%2E%2E/%2E%2E/etc",
                 "/api/diff?a=alpha&b=../data", "/api/recipes?id=recipes/../secret.txt", "/static/../app.py",
                 "/api/run/nothing-here"]:
        assert get(server, path).status_code == 404, path
    r = httpx.post(server["url"] + "/api/chat", json={"checkpoint": "../../etc", "prompt": "hi"},
                   headers={"X-Board-Token": TOKEN}, timeout=30)
    assert r.status_code == 404


def test_no_token_only_on_loopback(world):
    from finetune.board import serve_board
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match="loopback"):
        serve_board(world["runs"], host="0.0.0.0", no_token=True)
    result = runner.invoke(cli_app, ["board", str(world["runs"]), "--host", "0.0.0.0", "--no-token"])
    assert result.exit_code == 2 and "loopback" in result.output


def test_launch_refuses_a_bad_override_before_starting(server, world):
    app = server["app"]
    before = len(app.state.board.jobs.jobs)
    r = httpx.post(server["url"] + "/api/launch", headers={"X-Board-Token": TOKEN}, timeout=30,
                   json={"recipe": "recipes/tiny.yaml", "overrides": ["training.max_steps=abc", "lora.rr=3"]})
    assert r.status_code == 400
    errors = r.json()["errors"]
    assert set(errors) == {"training.max_steps", "lora.rr"}
    assert "valid integer" in errors["training.max_steps"][0] and "Did you mean 'r'" in errors["lora.rr"][0]
    assert len(app.state.board.jobs.jobs) == before and not (world["runs"] / "tiny").exists()
