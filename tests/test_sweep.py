"""`finetune sweep`: a grid of overrides trained point by point, killed and resumed, failing points, bad values,
and the Optuna search (slow).

Each point is a real `finetune train` child process on the 2-layer fixture model; a child costs its start-up
(imports, model and data) far more than its few steps, so the grid tests keep to few points.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.sweep.space import Point, name_points, parse_space, split_values

from conftest import recipe_file, write_jsonl

runner = CliRunner()
GRID = ["lora.r=2,4", "training.learning_rate=1e-3,2e-3"]
NAMES = ["r2-lr1e-3", "r2-lr2e-3", "r4-lr1e-3", "r4-lr2e-3"]  # product order: the last axis varies fastest
STEPS = 40  # long enough (with a checkpoint every 2 steps) that point 3 is killed between two checkpoints


@pytest.fixture(scope="module")
def data(tmp_path_factory, toy_alpaca_rows):
    tmp = tmp_path_factory.mktemp("sweep_data")
    write_jsonl(tmp / "train.jsonl", toy_alpaca_rows[:16])
    write_jsonl(tmp / "eval.jsonl", toy_alpaca_rows[40:44])
    (tmp / "bad.jsonl").write_text('{"instruction": "Repeat the word once.", "input": "cat"}\n')  # no output
    return tmp


def make_recipe(tmp_path: Path, model_dir: Path, data_dir: Path, **training) -> Path:
    return recipe_file(tmp_path, model_dir, data_dir, "grid", lora={"dropout": 0.0},
                       **{"max_steps": 4, "gradient_accumulation_steps": 1, "eval_steps": 2, **training})


def sweep(*args: str):
    return runner.invoke(app, ["sweep", *args], env={"COLUMNS": "250"})


def state(sweep_dir: Path) -> dict:
    try:
        return json.loads((sweep_dir / "sweep-state.json").read_text())
    except (OSError, ValueError):
        return {}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _env() -> dict:
    """The environment of a driver started as its own process: this checkout's finetune first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}


def _wait_for(condition, driver: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert driver.poll() is None, driver.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_values_split_outside_brackets_and_ranges_are_parsed():
    assert split_values("[q_proj,v_proj],[q_proj]") == ["[q_proj,v_proj]", "[q_proj]"]
    assert split_values("{a: 1, b: 2}") == ["{a: 1, b: 2}"] and split_values("'x,y',z") == ["'x,y'", "z"]
    space = parse_space(["lora.r=2:16:int", "training.learning_rate=1e-5:1e-3:log", "lora.alpha=8,16",
                         "training.max_steps=5"])
    assert [(r.key, r.low, r.high, r.integer, r.log) for r in space.ranges] == [
        ("lora.r", 2, 16, True, False), ("training.learning_rate", 1e-5, 1e-3, False, True)]
    assert [(a.key, a.values) for a in space.axes] == [("lora.alpha", ("8", "16"))]
    assert space.fixed == ["training.max_steps=5"]


def test_point_names_are_readable_or_hashed_when_long():
    points = name_points([{"lora.r": "2", "training.learning_rate": "0.001", "adapter.method": "ia3"}])
    assert points == [Point("r2-lr0.001-ia3", {"lora.r": "2", "training.learning_rate": "0.001",
                                               "adapter.method": "ia3"})]
    long = name_points([{"data.train": "/" + "x" * 60 + str(i)} for i in range(2)] + [{"data.train": "a.jsonl"}])
    assert [p.name[:2] for p in long[:2]] == ["p-", "p-"] and long[0].name != long[1].name
    assert long[2].name == "traina.jsonl"
    assert name_points([{"data.train": "/" + "x" * 60 + "0"}])[0].name == long[0].name  # stable alone too


def test_grid_file_with_cli_items(tmp_path, tiny_model_dir, data):
    grid = tmp_path / "sweep.yaml"
    grid.write_text("lora.r: [2, 4]\ntraining.max_steps: 3\nlora.target_modules: [[q_proj], [q_proj, v_proj]]\n")
    space = parse_space(["training.learning_rate=1e-3,2e-3"], grid)
    assert space.fixed == ["training.max_steps=3"]
    assert [(a.key, a.values) for a in space.axes] == [
        ("lora.r", ("2", "4")), ("lora.target_modules", ('["q_proj"]', '["q_proj", "v_proj"]')),
        ("training.learning_rate", ("1e-3", "2e-3"))]
    assert len(space.grid()) == 8


@pytest.mark.parametrize("items, key", [
    (["lora.r=2,abc"], "lora.r"),
    (["lora.rr=2,4"], "lora.rr"),
    (["training.learning_rate=1e-5:1e-3:log"], "training.learning_rate"),  # a range without --search
    (["output_dir=a,b"], "output_dir"),
    (["lora.r=4"], "Nothing to sweep"),
])
def test_bad_values_exit_2_naming_the_key_before_anything_runs(tmp_path, tiny_model_dir, data, items, key):
    recipe = make_recipe(tmp_path, tiny_model_dir, data)
    result = sweep(str(recipe), *items)
    assert result.exit_code == 2, result.output
    assert key in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs" / "grid-sweep" / "sweep-state.json").exists()


@pytest.mark.parametrize("body, said", [
    (b"a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + b"".join(b"%c: &%c [%s]\n" % (k, k, b", ".join([b"*" + bytes([k - 1])] * 9))
                                                    for k in b"bcdefgh"), "100,000"),  # 9^8 values: a bomb
    (b"lora.r: " + b"[" * 3000 + b"\n", "sweep.yaml"),
    (b"lora.r: [2, 4]\xff\n", "UTF-8"),
])
def test_a_hostile_grid_file_exits_2_naming_it(tmp_path, tiny_model_dir, data, body, said):
    grid = tmp_path / "sweep.yaml"
    grid.write_bytes(body)
    result = sweep(str(make_recipe(tmp_path, tiny_model_dir, data)), "--grid", str(grid))
    assert result.exit_code == 2, result.output
    assert "sweep.yaml" in result.output and said in result.output and "Traceback" not in result.output


def test_search_without_optuna_says_how_to_install_it(tmp_path, tiny_model_dir, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    result = sweep(str(make_recipe(tmp_path, tiny_model_dir, data)), "--search", "2", "lora.r=2,4")
    assert result.exit_code == 2 and "pip install 'finetune[sweep]'" in " ".join(result.output.split())
    assert not (tmp_path / "runs" / "grid-sweep").exists()


@pytest.mark.slow  # CI time (make test-slow runs it): the SIGTERM test below covers a point's checkpoint
def test_grid_killed_during_point_3_resumes_without_redoing_points_1_and_2(tmp_path, tiny_model_dir, data):
    recipe = make_recipe(tmp_path, tiny_model_dir, data, max_steps=STEPS, save_steps=2, eval_steps=10)
    sweep_dir = tmp_path / "runs" / "grid-sweep"
    driver = subprocess.Popen([sys.executable, "-m", "finetune", "sweep", str(recipe), *GRID], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    third = sweep_dir / NAMES[2]
    _wait_for(lambda: (third / "checkpoint-2").is_dir(), driver)  # published whole (renamed into place)
    child = state(sweep_dir)["points"][2]["pid"]
    os.kill(child, signal.SIGKILL)  # the driver and its child, as a machine crash would
    driver.kill()
    driver.wait()
    assert not (third / "summary.json").exists()
    before = {n: ((sweep_dir / n / "summary.json").stat().st_mtime_ns, summary(sweep_dir / n)) for n in NAMES[:2]}
    assert state(sweep_dir)["points"][2]["status"] == "running"

    result = sweep(str(recipe), *GRID)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in sweep_dir.iterdir() if (p / "summary.json").exists()) == NAMES
    for n in NAMES[:2]:  # not run again
        assert ((sweep_dir / n / "summary.json").stat().st_mtime_ns, summary(sweep_dir / n)) == before[n]
    points = state(sweep_dir)["points"]
    assert [p["attempts"] for p in points] == [1, 1, 2, 1] and {p["status"] for p in points} == {"finished"}
    log = (sweep_dir / "logs" / f"{NAMES[2]}.log").read_text()
    assert log.count("$ ") == 2 and "--resume" in log and "resuming from" in " ".join(log.split())
    steps = [m["step"] for m in map(json.loads, (third / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == list(range(1, STEPS + 1))  # each step once: resumed, not started over

    report = json.loads((sweep_dir / "sweep.json").read_text())
    rows = {r["name"]: r for r in report["points"]}
    assert list(rows) == NAMES
    with open(sweep_dir / "sweep.csv") as f:
        table = {r["point"]: r for r in csv.DictReader(f)}
    for n in NAMES:
        s, row = summary(sweep_dir / n), rows[n]
        assert row["overrides"] == dict(zip(["lora.r", "training.learning_rate"], n[1:].split("-lr")))
        for key in ("trainable_parameters", "eval_loss", "steps", "peak_memory_gib"):
            assert row[key] == s[key], (n, key)
            assert table[n][key] == str(s[key]), (n, key)
        assert row["seconds"] == s["wall_time_s"] and row["tokens_per_s"] > 0 and row["planned_memory_gib"] > 0
        assert f"{s['eval_loss']:.4f}" in next(line for line in result.output.splitlines() if f" {n} " in line)
    assert [rows[n]["trainable_parameters"] for n in NAMES] == [896, 896, 1792, 1792]  # 2 layers x r (64+64 + 64+32)
    best = min(NAMES, key=lambda n: rows[n]["eval_loss"])
    assert report["best"] == best and [n for n in NAMES if rows[n]["best"]] == [best]
    assert (sweep_dir / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sigterm_checkpoints_the_point_and_a_failing_point_gives_exit_5(tmp_path, tiny_model_dir, data, monkeypatch):
    """SIGTERM to the driver reaches the training point, which checkpoints; the restart resumes it, then the bad
    point fails (its reason in the table), the sweep still ends and exits 5."""
    monkeypatch.chdir(data)
    recipe = make_recipe(tmp_path, tiny_model_dir, data, max_steps=STEPS, eval_steps=10, eval_generate_steps=STEPS,
                         eval_generate_examples=2, eval_max_new_tokens=4)
    sweep_dir, items = tmp_path / "runs" / "grid-sweep", ["data.train=train.jsonl,bad.jsonl"]
    driver = subprocess.Popen([sys.executable, "-m", "finetune", "sweep", str(recipe), *items], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    good = sweep_dir / "traintrain.jsonl"
    _wait_for(lambda: (good / "metrics.jsonl").exists() and "loss" in (good / "metrics.jsonl").read_text(), driver)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=300) == 143, driver.stderr.read()
    assert any(good.glob("checkpoint-[0-9]*")) and not (good / "summary.json").exists()
    assert [p["status"] for p in state(sweep_dir)["points"]] == ["interrupted", "pending"]

    result = sweep(str(recipe), *items)
    assert result.exit_code == 5, result.output
    rows = {r["name"]: r for r in json.loads((sweep_dir / "sweep.json").read_text())["points"]}
    assert rows["traintrain.jsonl"]["status"] == "finished" and rows["traintrain.jsonl"]["steps"] == STEPS
    last = json.loads((good / "metrics.jsonl").read_text().splitlines()[-1])  # the generation record at the end
    assert "eval_exact_match" in last and rows["traintrain.jsonl"]["generation"] == {k: v for k, v in last.items()
                                                                                     if k.startswith("eval_")}
    assert "eval_exact_match" in (sweep_dir / "sweep.csv").read_text().splitlines()[0].split(",")
    assert "--resume" in (sweep_dir / "logs" / "traintrain.jsonl.log").read_text()
    assert rows["trainbad.jsonl"]["status"] == "failed" and "bad.jsonl:1" in rows["trainbad.jsonl"]["reason"]
    output = " ".join(result.output.split())
    assert "1 of 2 sweep points failed" in output and "bad.jsonl:1" in output

    edited = json.loads(recipe.read_text())
    edited["training"]["learning_rate"] = 1e-3
    recipe.write_text(json.dumps(edited))  # now the finished point trained another recipe: refused
    again = sweep(str(recipe), *items)
    assert again.exit_code == 2 and "has changed since the sweep" in " ".join(again.output.split())


@pytest.mark.slow
def test_search_samples_n_points_within_the_ranges_and_continues(tmp_path, tiny_model_dir, data):
    recipe = make_recipe(tmp_path, tiny_model_dir, data)
    items = ["training.learning_rate=1e-3:1e-2:log", "lora.r=2,4"]
    result = sweep(str(recipe), "--search", "2", *items)
    assert result.exit_code == 0, result.output
    sweep_dir = tmp_path / "runs" / "grid-sweep"
    first = {n: summary(sweep_dir / n) for n in ("trial-0", "trial-1")}
    result = sweep(str(recipe), "--search", "3", *items)  # the same search, one point more
    assert result.exit_code == 0, result.output
    report = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["name"] for r in report["points"]] == ["trial-0", "trial-1", "trial-2"]
    assert {n: summary(sweep_dir / n) for n in first} == first  # not run again
    for r in report["points"]:
        assert r["status"] in ("finished", "pruned")
        assert 1e-3 <= float(r["overrides"]["training.learning_rate"]) <= 1e-2 and r["overrides"]["lora.r"] in "24"
    values = [tuple(r["overrides"].values()) for r in report["points"]]
    assert len(set(values)) == 3  # the restarted sampler draws new points, not the first ones again
