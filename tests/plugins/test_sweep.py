"""rapid sweep: a 4-point CPU sweep writes results.jsonl, the Markdown table, CSV and plot; a rerun
skips finished points; a budget below the plan or below the measured peak records OOM without
stopping the sweep; a point that fails is recorded and the sweep goes on; bad grids and budgets are
one clear error before any point runs. Plus the planner against measured peaks (within 15%)."""

import json
from pathlib import Path

import pytest
import tomli_w
import torch

from rapid.builtin import sweep as sweep_mod
from rapid.builtin.sweep import parse_grid, parse_size, sweep
from rapid.cli import main
from rapid.errors import UserError
from rapid.types import Router
from tests.conftest import tiny_raw
from tests.e2e.test_train import _text_data


class ExplodingRouter(Router):
    """Fails in its second forward: a point that dies after it started."""
    from dataclasses import dataclass as _dc

    @_dc
    class Config:
        pass

    calls = 0

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.gate = torch.nn.Linear(spec.hidden, spec.num_experts, bias=False)

    def forward(self, x_TD, *, token_ids_T, domain_ids_T):
        raise RuntimeError("the exploding router exploded")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    raw = tiny_raw(model={"vocab_size": 300, "dropless": True}, data=_text_data(root), run={"name": "s"})
    path = root / "r.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.fixture(scope="module")
def done(recipe, builtin_registry_module):
    out = recipe.parent / "out"
    result = sweep(recipe, ["parallel.micro_batch=2,4", "parallel.activation_checkpoint=false,true"], [],
                   builtin_registry_module, out, live=False, steps=4, warmup=1)
    return out, result


@pytest.fixture(scope="module")
def builtin_registry_module():
    from rapid.plugins import Registry, make_plugin_manager
    return Registry(make_plugin_manager(autoload=False))


def test_four_points_write_every_report(done):
    out, (where, keys, results) = done
    assert where == out and keys == ["parallel.micro_batch", "parallel.activation_checkpoint"]
    assert [r["status"] for r in results] == ["done"] * 4
    assert [r["switches"] for r in results] == [{"parallel.micro_batch": m, "parallel.activation_checkpoint": a}
                                               for m in (2, 4) for a in (False, True)]
    for r in results:
        assert r["ms_per_iter"] > 0 and r["tokens_per_s"] > 0 and r["samples_per_s"] == pytest.approx(
            r["tokens_per_s"] / 16, rel=1e-2)
        assert r["peak_memory_bytes"] > 100 * 2**20 and r["planned_bytes"] > 0 and r["load_max_mean"] >= 1.0
        assert not (out / "points" / f"{results.index(r):03d}" / "checkpoints").exists()   # no final save
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["point"] == "parallel.micro_batch=2 parallel.activation_checkpoint=false"
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| micro_batch | activation_checkpoint | ms/iter | tokens/s | max memory | planned")
    assert len(md) == 6 and md[2].startswith("| 2 | false | ")
    assert (out / "results.csv").read_text().splitlines()[0].startswith("point,parallel.micro_batch,")
    assert (out / "results.png").stat().st_size > 1000


def test_the_planner_is_within_15_percent_of_the_measured_peak(done):
    for r in done[1][2]:
        assert abs(r["plan_error"]) <= 0.15, (r["point"], r["planned_bytes"], r["peak_memory_bytes"])


def test_a_rerun_skips_finished_points_and_other_settings_are_refused(done, recipe, builtin_registry_module):
    out, _ = done
    before = (out / "results.jsonl").read_text()
    _, _, again = sweep(recipe, ["parallel.micro_batch=2,4", "parallel.activation_checkpoint=false,true"], [],
                        builtin_registry_module, out, live=False, steps=4, warmup=1)
    assert (out / "results.jsonl").read_text() == before and len(again) == 4
    _, _, part = sweep(recipe, ["parallel.micro_batch=4", "parallel.activation_checkpoint=true,false"], [],
                       builtin_registry_module, out, live=False, steps=4, warmup=1, time_limit=60)
    assert (out / "results.jsonl").read_text() == before                # another grid and limits: points reused
    assert [r["point"] for r in part] == ["parallel.micro_batch=4 parallel.activation_checkpoint=true",
                                          "parallel.micro_batch=4 parallel.activation_checkpoint=false"]
    with pytest.raises(UserError, match="holds a sweep of another recipe or other settings"):
        sweep(recipe, ["parallel.micro_batch=2"], [], builtin_registry_module, out, live=False, steps=5, warmup=1)


def test_budgets_record_oom_and_a_failing_point_does_not_stop_the_sweep(recipe, builtin_registry_module,
                                                                          tmp_path, monkeypatch):
    # the plan says 1 KiB per process: the budget of 64 MiB passes it, the measured peak does not
    monkeypatch.setattr(sweep_mod, "_plan_total", lambda recipe, registry, nproc: (1024, 1))
    _, _, rs = sweep(recipe, ["router.name=top1,tests.plugins.test_sweep:ExplodingRouter"], [],
                     builtin_registry_module, tmp_path / "measured", live=False, steps=3, warmup=1,
                     max_memory="64MiB")
    assert rs[0]["status"] == "oom" and rs[0]["oom"] == "measured" and "budget" in rs[0]["error"]
    assert rs[1]["status"] in ("oom", "failed")                   # whichever came first: both are recorded
    monkeypatch.undo()
    _, _, rs = sweep(recipe, ["router.name=top1,tests.plugins.test_sweep:ExplodingRouter"], [],
                     builtin_registry_module, tmp_path / "failed", live=False, steps=3, warmup=1)
    assert rs[0]["status"] == "done"
    assert rs[1]["status"] == "failed" and "exploding router exploded" in rs[1]["error"], rs[1]
    _, _, rs = sweep(recipe, ["parallel.micro_batch=2,4"], [], builtin_registry_module, tmp_path / "predicted",
                     live=False, steps=3, warmup=1, max_memory="1MiB")
    assert [(r["status"], r["oom"]) for r in rs] == [("oom", "predicted")] * 2
    assert not (tmp_path / "predicted" / "points").exists()        # nothing was started


def test_unsupported_combinations_are_recorded_not_run(recipe, builtin_registry_module, tmp_path):
    _, _, rs = sweep(recipe, ["parallel.zero_stage=2"], ["parallel.name=torch"], builtin_registry_module,
                     tmp_path / "u", live=False, steps=3, warmup=1, nproc=2)
    assert rs[0]["status"] == "unsupported" and "strategies that do: deepspeed, fairscale" in rs[0]["error"]


def test_grid_and_size_parsing():
    assert parse_grid(["parallel.micro_batch=4,8", 'parallel.name="torch",local', "model.experts=[2,4],4"]) == {
        "parallel.micro_batch": [4, 8], "parallel.name": ["torch", "local"], "model.experts": [[2, 4], 4]}
    assert parse_size("8GiB") == 8 * 2**30 and parse_size("1.5 GB") == 1_500_000_000 and parse_size("512") == 512


@pytest.mark.parametrize("argv, needle", [
    (["--grid", "parallel.stepz=1,2"], "unknown key 'stepz'"),
    (["--grid", "parallel.micro_batch=four"], "key 'micro_batch' must be int, got str 'four'"),
    (["--grid", "micro_batch=4"], "is not table.key=value"),
    (["--grid", "parallel.micro_batch="], "is not table.key=value"),
    ([], "the sweep has an empty grid"),
    (["--grid", "parallel.micro_batch=4,4"], "--grid parallel.micro_batch lists a value twice"),
    (["--grid", "parallel.micro_batch=4", "--max-memory", "lots"], "--max-memory 'lots' is not a memory size"),
    (["--grid", "parallel.micro_batch=4", "--steps", "2", "--warmup", "2"], "warmup=2 leaves no timed step"),
])
def test_bad_input_is_one_error_before_any_point(recipe, tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["sweep", str(recipe), "--out", "o", "--no-live", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and needle in " ".join(err.split()), err
    assert not (tmp_path / "o" / "points").exists() and not (tmp_path / "o" / "results.jsonl").exists()


def test_plan_grid_prints_the_predictions(recipe, capsys):
    with pytest.raises(SystemExit):
        main(["plan", str(recipe), "--grid", "parallel.micro_batch=2,4", "--grid", "parallel.name=single,torch",
              "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and rows[0]["planned_bytes"] > 0
    assert rows[0]["planned_bytes"] < rows[2]["planned_bytes"]                  # micro_batch 2 < 4


def test_activation_plan_terms():
    """Fused attention holds no S x S scores unless dropout forces the math path; tensor parallelism
    splits the attention and MLP activations; checkpointing keeps block inputs; 16-bit halves matmul outputs."""
    from rapid.builtin.models.gpt_moe import Config
    from rapid.builtin.plan import activation_bytes
    cfg = Config(vocab_size=1000, seq_len=2048, hidden=256, layers=4, heads=4, moe_every=0, experts=1)
    base = activation_bytes(cfg, 1, "fp32")
    per_token_layer = (base - activation_bytes(Config(**{**cfg.__dict__, "layers": 3}), 1, "fp32")) / 2048
    assert per_token_layer == 8 * 256 + 4 * (6 * 256 + 256 + 2 * 1024)                 # no seq_len term
    dropout = activation_bytes(Config(**{**cfg.__dict__, "dropout": 0.1}), 1, "fp32")
    assert dropout - base == 2048 * 4 * 3 * 4 * 2048 * (4 + 1)     # 3 h S per token: 4 layers + one in backward
    assert activation_bytes(cfg, 1, "fp32", tp=2) < base and activation_bytes(cfg, 1, "bf16") < base
    assert base - activation_bytes(cfg, 1, "fp32", checkpointing=True) == 2048 * (3 * per_token_layer - 4 * 4 * 256)


def test_a_cut_line_is_closed_and_a_refused_size_is_a_predicted_oom(recipe, builtin_registry_module, tmp_path):
    out = tmp_path / "s"
    grid = ["model.hidden=32,16384"]                  # 16384: rapid run's own plan refuses it before allocating
    _, _, rs = sweep(recipe, grid, [], builtin_registry_module, out, live=False, steps=3, warmup=1)
    assert rs[0]["status"] == "done" and (rs[1]["status"], rs[1]["oom"]) == ("oom", "predicted"), rs[1]
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:60])          # interrupted mid-write
    _, _, again = sweep(recipe, grid, [], builtin_registry_module, out, live=False, steps=3, warmup=1)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[::2]]
    assert [r["point"] for r in records] == [r["point"] for r in rs] and len(again) == 2


def test_the_fastest_line_quotes_each_value():
    from rapid.builtin.sweep import best_line
    results = [{"status": "done", "tokens_per_s": 1.0, "nproc": 2,
                "sets": ["model.experts=[2, 4]", 'run.name="a b"', "parallel.name='x'"]}]
    line = best_line(Path("r.toml"), [], results)
    assert line == ("rapid run r.toml --set 'model.experts=[2, 4]' --set 'run.name=\"a b\"' "
                    "--set 'parallel.name='\"'\"'x'\"'\"'' --nproc 2")


def test_a_point_whose_validation_split_is_too_small_still_runs(recipe, builtin_registry_module, tmp_path):
    # 0.5% of 400 lines: 139 validation tokens, 8 sequences, fewer than a micro-batch of 16. A sweep
    # measures speed and memory and never validates ([run] eval_batches = 0), so the point runs.
    sets = ["data.val_fraction=0.005", "parallel.micro_batch=16"]
    _, _, rs = sweep(recipe, sets, [], builtin_registry_module, tmp_path / "v", live=False, steps=3, warmup=1)
    assert rs[0]["status"] == "done", rs[0]
    with pytest.raises(UserError, match="validation split has 8 sequences, fewer than micro_batch"):
        from rapid.recipe import load_recipe
        from rapid.train import train
        train(load_recipe(recipe, [*sets, "run.steps=1"]), tmp_path / "run",
              registry=builtin_registry_module, progress=False)
