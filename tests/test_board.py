"""`finetune board` on tiny runs: the JSON routes (runs table, metrics from an offset, recipe diff, token, paths
confined to RUNS_DIR, damaged runs), then the page itself in a real headless browser (Debian's chromium and
chromedriver through Selenium): table, curves equal to metrics.jsonl, a live point without reload, the recipe
diff, launch (a bad override refused next to its key, a 3-step run to the end), stop (SIGTERM: a checkpoint)
and resume, and a streamed chat reply equal to `finetune chat --prompt`.

The runs are trained once per module by the real CLI on the 2-layer fixture model; the server is the real
uvicorn on a free loopback port, in a thread of this process.
"""

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, write_jsonl
from test_training import one_thread  # noqa: F401  (the module-wide one-thread fixture)
from typer.testing import CliRunner

from finetune.artifacts import hold
from finetune.board import make_app
from finetune.cli import app as cli_app

runner = CliRunner()
TOKEN = "test-token-123"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PROMPT = "Repeat the word twice."


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
        path.write_text(json.dumps(recipe_body(tiny_model_dir, data, name, runs / name, learning_rate=lr,
                                               eval_generate_steps=2, eval_max_new_tokens=4)))
        result = runner.invoke(cli_app, ["train", str(path)])
        assert result.exit_code == 0, result.output
    result = runner.invoke(cli_app, ["eval", str(root / "alpha.yaml"), "--adapter", str(runs / "alpha" / "checkpoint-final"),
                                     "--compare", "--json", str(runs / "alpha" / "eval.json")])
    assert result.exit_code == 0, result.output
    shutil.copytree(runs / "alpha", runs / "grid-sweep" / "lr-0.01")
    (runs / "grid-sweep" / "sweep.json").write_text("{}")
    (runs / "broken").mkdir()
    (runs / "broken" / "recipe.yaml").write_text("model: [unclosed\n")
    (recipes / "tiny.yaml").write_text(json.dumps(recipe_body(tiny_model_dir, data, "tiny")))
    return {"root": root, "runs": runs, "recipes": recipes, "data": data}


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
    app.state.board.jobs.stop_all()  # a run a failed test left going
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
    report = json.loads((world["runs"] / "alpha" / "eval.json").read_text())
    assert d["evals"] == [{"file": "eval.json", "models": report["models"], "examples": 4, "data": report["data"]}]
    assert list(report["models"]) == ["base", "adapter"]
    samples = [json.loads(x) for x in (world["runs"] / "alpha" / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in d["eval_samples"]] == [4, 2]  # newest first, every eval example at each
    assert d["eval_samples"][1]["samples"] == [x for x in samples if x["step"] == 2] and len(samples) == 8
    # a checkpoint changed after it was written: verify's verdict names the file
    shutil.copytree(world["runs"] / "beta", world["runs"] / "gamma")
    (world["runs"] / "gamma" / "checkpoint-2" / "adapter_config.json").write_text("{}")
    try:
        d = get(server, "/api/run/gamma").json()
        assert [c["intact"] for c in d["checkpoints"]] == [False, True]
        assert "adapter_config.json" in d["checkpoints"][0]["summary"]
    finally:
        shutil.rmtree(world["runs"] / "gamma")


def test_the_planners_prediction_is_beside_the_peak(server, world):
    from finetune.plan import plan
    from finetune.recipe import load_recipe

    want = round(plan(load_recipe(world["runs"] / "alpha" / "recipe.yaml"), device="cpu").total / 2**30, 3)
    rows = wait_for(lambda: {r["id"]: r for r in get(server, "/api/runs").json()["runs"]
                             if r.get("plan_gib") is not None}, "the plan (a background thread)", 120)
    assert abs(rows["alpha"]["plan_gib"] - want) < 0.05 * want  # on CPU the plan counts this process's runtime


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


def test_half_written_and_broken_records_never_break_the_page(server, world):
    run = world["runs"] / "partial"
    shutil.copytree(world["runs"] / "beta", run)
    try:
        whole = get(server, "/api/metrics/partial").json()
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 5, "loss": 0.5')  # a line being written
        assert get(server, f"/api/metrics/partial?offset={whole['offset']}").json() == {
            "rows": [], "offset": whole["offset"], "running": False}
        with open(run / "metrics.jsonl", "a") as f:
            f.write(', "time": 1.0}\n')
        assert get(server, f"/api/metrics/partial?offset={whole['offset']}").json()["rows"] == [
            {"step": 5, "loss": 0.5, "time": 1.0}]
        (run / "summary.json").write_text("{not json")
        (run / "environment.json").write_text("")
        d = get(server, "/api/run/partial").json()
        assert d["summary"] == {"damaged": "summary.json is not valid JSON"}
        assert d["environment"] == {"damaged": "environment.json is not valid JSON"}
        broken = get(server, "/api/run/broken").json()
        assert broken["row"]["status"] == "damaged" and broken["checkpoints"] == []
    finally:
        shutil.rmtree(run)


def test_chat_route_streams_pieces(server, world):
    from finetune.generate import ChatOptions, load_session, reply

    ckpt = world["runs"] / "beta" / "checkpoint-final"
    want = reply(load_session(str(ckpt)), PROMPT, ChatOptions(max_new_tokens=12))
    with httpx.stream("POST", server["url"] + "/api/chat", headers={"X-Board-Token": TOKEN}, timeout=120,
                      json={"checkpoint": "beta/checkpoint-final", "prompt": PROMPT, "max_new_tokens": 12}) as r:
        items = [json.loads(line) for line in r.iter_lines() if line]
    assert items[-1] == {"done": True} and len(items) > 2  # several pieces, then the end
    assert "".join(i["text"] for i in items[:-1]).strip() == want


def test_no_token_only_on_loopback(world):
    from finetune.board import serve_board
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match="loopback"):
        serve_board(world["runs"], host="0.0.0.0", no_token=True)
    result = runner.invoke(cli_app, ["board", str(world["runs"]), "--host", "0.0.0.0", "--no-token"])
    assert result.exit_code == 2 and "loopback" in result.output


def test_a_sweeps_grid_is_validated_point_by_point_before_anything_starts(world):
    from finetune.board.launch import Jobs, OverrideErrors, grid_points

    assert grid_points(["lora.r=2,4", "training.learning_rate=1e-3,2e-3", "lora.target_modules=[q_proj,v_proj]"]) == [
        ["lora.r=2", "training.learning_rate=1e-3", "lora.target_modules=[q_proj,v_proj]"],
        ["lora.r=4", "training.learning_rate=1e-3", "lora.target_modules=[q_proj,v_proj]"],
        ["lora.r=2", "training.learning_rate=2e-3", "lora.target_modules=[q_proj,v_proj]"]]
    jobs = Jobs(world["runs"])
    with pytest.raises(OverrideErrors) as e:
        jobs.sweep(world["recipes"] / "tiny.yaml", ["lora.r=2,4", "training.max_steps=3,many"])
    assert list(e.value.by_key) == ["training.max_steps"] and "valid integer" in e.value.by_key["training.max_steps"][0]
    assert jobs.jobs == {}


def test_without_a_token_only_loopback_hosts_are_answered(world):
    from starlette.testclient import TestClient

    client = TestClient(make_app(world["runs"], world["recipes"], token=None), base_url="http://127.0.0.1:7860")
    assert client.get("/api/runs").status_code == 200
    assert client.get("/api/runs", headers={"host": "localhost:7860"}).status_code == 200
    assert client.get("/api/runs", headers={"host": "evil.example:7860"}).status_code == 403  # DNS rebinding


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
    r = httpx.post(server["url"] + "/api/launch", headers={"X-Board-Token": TOKEN}, timeout=30,
                   json={"recipe": "runs/alpha", "overrides": []})  # the run's own recipe: its name is taken
    assert r.status_code == 400 and "already holds a run" in r.json()["errors"]["name"][0]
    r = httpx.post(server["url"] + "/api/launch", headers={"X-Board-Token": TOKEN}, timeout=30,
                   json={"recipe": "recipes/tiny.yaml", "overrides": [f"output_dir={world['root']}/elsewhere"]})
    assert r.status_code == 400 and "inside the board's runs directory" in r.json()["errors"]["output_dir"][0]
    assert len(app.state.board.jobs.jobs) == before


# ----------------------------------------------------------------------------- the page in a browser


@pytest.fixture(scope="module")
def browser(server):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100",
                "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    driver.set_script_timeout(30)
    driver.get(server["url"] + f"/?token={TOKEN}")
    yield driver
    driver.quit()


def wait_for(condition, what: str, timeout: float = 60):
    """Poll `condition()` until it is truthy (its value is returned); fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # an element re-drawn between finding and reading it: try again
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def by_css(driver, css):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


CLICK_WHEN_READY = """
const e = document.querySelector(arguments[0]);
if (!e || e.disabled || e.getClientRects().length === 0) return false;
e.click();
return true;
"""


def click(driver, css: str, what: str, timeout: float = 60) -> None:
    """Click the element `css` selects once it is present, enabled and shown: the page's table is redrawn every
    refresh, so finding the element and clicking it happen in one script (nothing of the page runs between)."""
    wait_for(lambda: driver.execute_script(CLICK_WHEN_READY, css), what, timeout)


def table_rows(driver) -> dict[str, str]:
    return {tr.get_attribute("data-run"): tr.find_elements("css selector", ".status")[0].text
            for tr in by_css(driver, "#runs-table tbody tr[data-run]")}


def chart_y(driver, key: str, trace: str) -> list:
    return driver.execute_script(
        "const d = document.getElementById(arguments[0]); if (!d || !d.data) return null;"
        "const t = d.data.find((t) => t.name === arguments[1]); return t ? [t.x, t.y] : null;",
        "chart-" + key.replace("/", "_"), trace)


def choose(driver, css: str, text: str, nth: int = 0, by: str = "visible_text") -> None:
    """Pick the option of the `nth` select `css` finds whose visible text (or value) is `text`. The page rebuilds a
    select's options when the runs change, which can make the element Selenium holds stale mid-pick: find, pick and
    check the choice held, again until it does."""
    from selenium.webdriver.support.ui import Select

    def pick():
        select = Select(by_css(driver, css)[nth])
        getattr(select, f"select_by_{by}")(text)
        chosen = select.first_selected_option
        return (chosen.text if by == "visible_text" else chosen.get_attribute("value")) == text

    wait_for(pick, f"option {text!r} of {css}")


def tab(driver, name):
    click(driver, f'button.tab[data-tab="{name}"]', f"the {name} tab")


def test_page_lists_runs_sorts_filters_and_draws_their_curves(browser, world):
    rows = wait_for(lambda: len(table_rows(browser)) == 4 and table_rows(browser), "the runs table")
    assert rows == {"alpha": "finished", "beta": "finished", "grid-sweep/lr-0.01": "finished", "broken": "damaged"}
    assert any("sweep grid-sweep" in td.text for td in by_css(browser, "#runs-table tr.group td"))
    for run in ("alpha", "beta"):
        lines = metrics_lines(world["runs"] / run)
        want = [[m["step"] for m in lines if "loss" in m], [m["loss"] for m in lines if "loss" in m]]
        assert wait_for(lambda: chart_y(browser, "loss", run), f"{run}'s loss curve") == want
        evals = [[m["step"] for m in lines if "eval_loss" in m], [m["eval_loss"] for m in lines if "eval_loss" in m]]
        assert chart_y(browser, "eval_loss", run) == evals
    click(browser, 'input[name=xaxis][value=time]', "the time axis")
    lines = metrics_lines(world["runs"] / "alpha")
    want = [m["time"] - lines[0]["time"] for m in lines if "loss" in m]
    got = wait_for(lambda: (c := chart_y(browser, "loss", "alpha")) and c[0][0] != 1 and c[0], "x by time")
    assert got == pytest.approx(want, abs=1e-6)
    click(browser, 'input[name=xaxis][value=step]', "the step axis")
    click(browser, '#runs-table th[data-key="name"]', "the name column")  # ascending by name
    names = [tr.get_attribute("data-run") for tr in by_css(browser, "#runs-table tbody tr[data-run]")]
    assert names.index("alpha") < names.index("beta") < names.index("broken")
    by_css(browser, "#filter")[0].send_keys("bet")
    assert wait_for(lambda: list(table_rows(browser)) == ["beta"], "the filter")
    by_css(browser, "#filter")[0].clear()
    by_css(browser, "#filter")[0].send_keys(" \b")  # clear() sends no input event
    wait_for(lambda: len(table_rows(browser)) == 4, "the filter cleared")
    shot = world["root"] / "board.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("FINETUNE_BOARD_SCREENSHOT"):  # README's picture: FINETUNE_BOARD_SCREENSHOT=docs/board.png
        shutil.copy(shot, os.environ["FINETUNE_BOARD_SCREENSHOT"])


def test_a_running_runs_new_point_appears_without_reload(browser, world):
    run = world["runs"] / "live"
    shutil.copytree(world["runs"] / "beta", run)
    (run / "summary.json").unlink()
    lines = metrics_lines(run)
    with hold(run, "finetune train"):  # what a live `finetune train` holds
        wait_for(lambda: table_rows(browser).get("live") == "running", "the live run in the table")
        click(browser, 'tr[data-run="live"] .pick', "the live run's pick box")
        wait_for(lambda: chart_y(browser, "loss", "live"), "the live run's curve")
        handle = browser.execute_script("window.marker = 42; return window.marker")  # gone on a reload
        new = {**lines[-2], "step": 5, "loss": 0.125, "time": time.time()}
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(new) + "\n")
        x, y = wait_for(lambda: (c := chart_y(browser, "loss", "live")) and 5 in c[0] and c, "the new point")
        assert (x[-1], y[-1]) == (5, 0.125)
        assert browser.execute_script("return window.marker") == handle == 42
    wait_for(lambda: table_rows(browser).get("live") == "failed", "the lock released without a checkpoint at 5")
    shutil.rmtree(run)


def test_run_page_shows_checkpoints_evals_samples_and_recipe(browser, world):
    tab(browser, "curves")
    click(browser, 'tr[data-run="alpha"] a.run-link', "alpha's run link")
    body = wait_for(lambda: by_css(browser, "#run-recipe") and by_css(browser, "#run-body")[0].text, "the run page")
    assert by_css(browser, "#run-recipe")[0].text == (world["runs"] / "alpha" / "recipe.yaml").read_text().strip()
    assert body.count("intact (") == 2 and "eval eval.json (4 examples" in body
    assert "generations at eval steps" in body and "step 4 (4)" in body
    browser.save_screenshot(str(world["root"] / "run.png"))


def test_recipe_diff_shows_only_the_differing_keys(browser):
    tab(browser, "compare")
    choose(browser, "#diff-a", "alpha")
    choose(browser, "#diff-b", "beta")
    click(browser, "#diff-go", "the diff button")
    keys = wait_for(lambda: [td.text for td in by_css(browser, "#diff-table td.diff-key")], "the diff")
    assert keys == ["name", "output_dir", "training.learning_rate"]
    assert [td.text for td in by_css(browser, "#diff-table tbody tr")[2].find_elements("css selector", "td")] == [
        "training.learning_rate", "0.01", "0.003"]


def set_overrides(driver, pairs):
    while len(by_css(driver, "#overrides tbody tr")) < len(pairs):
        click(driver, "#add-override", "the add-override button")
    for tr, (key, value) in zip(by_css(driver, "#overrides tbody tr"), pairs):
        for css, text in ((".ov-key", key), (".ov-value", value)):
            box = tr.find_elements("css selector", css)[0]
            box.clear()
            box.send_keys(text)


def ended(driver) -> str | None:
    """The last job's "exit N" once it has ended."""
    states = by_css(driver, ".job-state")
    return states[-1].text if states and states[-1].text.startswith("exit") else None


def test_launch_form_refuses_a_bad_override_then_runs_a_3_step_run(browser, server, world):
    tab(browser, "launch")
    choose(browser, "#launch-recipe", "recipes/tiny.yaml")
    assert "not available" in by_css(browser, "#sweep-note")[0].text or by_css(browser, "#sweep-option")[0].is_enabled()
    set_overrides(browser, [("training.max_steps", "three"), ("name", "tiny3")])
    click(browser, "#launch-go", "the launch button")
    error = wait_for(lambda: by_css(browser, "#overrides tbody tr")[0].find_elements("css selector", ".ov-error")[0].text,
                     "the error next to the key")
    assert "training.max_steps" in error and "valid integer" in error
    assert by_css(browser, "#overrides tbody tr")[1].find_elements("css selector", ".ov-error")[0].text == ""
    assert server["app"].state.board.jobs.jobs == {} and not (world["runs"] / "tiny3").exists()
    set_overrides(browser, [("training.max_steps", "3"), ("name", "tiny3")])
    click(browser, "#launch-go", "the launch button")
    assert wait_for(lambda: ended(browser), "the run to end", 180) == "exit 0", \
        by_css(browser, "#job-log")[0].text
    assert "done in" in by_css(browser, "#job-log")[0].text
    browser.save_screenshot(str(world["root"] / "launch.png"))
    assert json.loads((world["runs"] / "tiny3" / "summary.json").read_text())["steps"] == 3
    wait_for(lambda: table_rows(browser).get("tiny3") == "finished", "the new run in the table")


def test_stop_writes_a_checkpoint_and_resume_continues(browser, world):
    tab(browser, "launch")
    set_overrides(browser, [("training.max_steps", "100000"), ("name", "long"), ("training.eval_steps", "null")])
    click(browser, "#launch-go", "the launch button")
    run = world["runs"] / "long"
    wait_for(lambda: table_rows(browser).get("long") == "running" and (run / "metrics.jsonl").stat().st_size,
             "the long run to train", 180)
    click(browser, 'tr[data-run="long"] button.stop', "the long run's stop button")
    assert wait_for(lambda: ended(browser), "the run to stop", 120) == "exit 143"
    stopped = max(m["step"] for m in metrics_lines(run) if "loss" in m)
    assert (run / f"checkpoint-{stopped}" / "training_state.pt").is_file()
    wait_for(lambda: table_rows(browser).get("long") == "interrupted", "interrupted in the table")
    click(browser, 'tr[data-run="long"] button.resume', "the long run's resume button")
    wait_for(lambda: max(m["step"] for m in metrics_lines(run)) > stopped + 1, "the resumed run to train", 180)
    said = f"resuming from {run / f'checkpoint-{stopped}'} at step {stopped}".replace(" ", "")
    wait_for(lambda: said in "".join(by_css(browser, "#job-log")[0].text.split()), "the resume in the log")
    click(browser, 'tr[data-run="long"] button.stop', "the resumed run's stop button", 120)
    assert wait_for(lambda: ended(browser), "the resumed run to stop", 120) == "exit 143"
    steps = [m["step"] for m in metrics_lines(run) if "loss" in m]
    assert steps == list(range(1, max(steps) + 1))  # resumed where it stopped: each step once
    assert (run / f"checkpoint-{max(steps)}" / "training_state.pt").is_file()


def test_chat_panel_streams_the_reply_finetune_chat_gives(browser, world):
    ckpt = "alpha/checkpoint-final"
    result = runner.invoke(cli_app, ["chat", str(world["runs"] / ckpt), "--prompt", PROMPT, "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    tab(browser, "chat")
    choose(browser, ".chat-target", ckpt, nth=0, by="value")
    choose(browser, ".chat-target", "base:" + ckpt, nth=1, by="value")
    box = by_css(browser, "#chat-max")[0]
    box.clear()
    box.send_keys("12")
    by_css(browser, "#chat-input")[0].send_keys(PROMPT)
    click(browser, "#chat-send", "the chat send button")
    replies = wait_for(lambda: len(d := by_css(browser, ".chat-log .assistant.done")) == 2 and [x.text for x in d],
                       "both replies", 120)
    assert replies[0] == result.stdout.strip()
    browser.save_screenshot(str(world["root"] / "board.png"))
    assert replies[1]  # the base answered too (the adapter switched off)
