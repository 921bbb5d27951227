"""``rapid extract`` (PanGu-Sigma sub-model extraction): the sub-model's logits equal the full model's
for its domains, its checkpoint loads like any other (optimizer state included), ``rapid plan`` shows
the smaller model, and bad input is one clear error (exit 2) that writes nothing."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rapid import checkpoint
from rapid.builtin.extract import extract
from rapid.builtin.parallel.single import persistent_buffers
from rapid.cli import main
from rapid.errors import UserError
from rapid.moe import count_params
from rapid.plugins import Registry, make_plugin_manager
from rapid.recipe import build_model, load_recipe, resolve
from rapid.train import optimizer_factory
from rapid.types import Batch
from tests.conftest import tiny_raw

DOMAINS = ["news", "review", "blog"]
GROUPS = {"news": 1, "review": 2, "blog": 1}


@pytest.fixture(scope="module")
def reg():
    return Registry(make_plugin_manager(autoload=False))


class WithBuffers:
    """An engine as it is, or (``keep=False``) one whose checkpoint state leaves out the model's
    persistent buffers (the routing tables), as a checkpoint from elsewhere might."""

    def __init__(self, engine, keep=True):
        self.engine, self.keep = engine, keep

    def checkpoint_state(self):
        tensors, extra = self.engine.checkpoint_state()
        buffers = set(persistent_buffers(self.engine.inner))
        assert buffers <= set(tensors), "the engine leaves out persistent buffers"
        return {k: v for k, v in tensors.items() if self.keep or k not in buffers}, extra

    def load_extra_state(self, extra):
        self.engine.load_extra_state(extra)


def engine(recipe, reg, seed):
    torch.manual_seed(seed)
    model = build_model(recipe, reg)
    model.reset_parameters()
    return WithBuffers(reg.strategy("single", recipe.parallel).wrap(model, optimizer_factory(recipe), 1.0))


def write_run(root, reg, router="rapid.builtin.routers.rre:RRERouter", buffers=True, model=None, **router_keys):
    """A checkpoint (step 1) under root/checkpoints of a model with experts [4, 8] over three domains,
    its Adam moments random (as after training)."""
    raw = tiny_raw(router={"name": router, **router_keys}, data={"domains": DOMAINS},
                   model={"experts": [4, 8], "dropless": True, **(model or {})})
    recipe = resolve(raw, "<t>", reg)
    e = engine(recipe, reg, 0)
    for key, t in e.engine.checkpoint_state()[0].items():       # creates the optimizer state in place
        if key.startswith("optim.") and t.dim() > 0:
            t.normal_()
    state = {"format": checkpoint.FORMAT, "step": 1, "schedule_steps": 4, "skipped_steps": 0, "data": {"epoch": 0},
             "data_id": {"corpus": "c", "tokenizer": "t", "domains": DOMAINS}}
    e.keep = buffers
    return checkpoint.save(root / "checkpoints", 1, e, state, recipe=recipe.to_toml()), recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reg):
    root = tmp_path_factory.mktemp("runs")
    return {"even": write_run(root / "even", reg), "groups": write_run(root / "groups", reg, groups=GROUPS),
            "top1": write_run(root / "top1", reg, router="top1"),
            "nobuf": write_run(root / "nobuf", reg, buffers=False),
            # capacity per group: the kept domains drop what they drop in the full model
            "capped": write_run(root / "capped", reg, model={"dropless": False, "drop_policy": "position",
                                                             "capacity_factor": 0.5, "eval_capacity_factor": 0.5,
                                                             "min_capacity": 1})}


@pytest.mark.parametrize("run, experts, kept_groups", [
    ("even", [3, 5], {}),                                     # even split: [2, 1, 1] and [3, 3, 2]
    ("groups", [2, 4], {"news": 1, "blog": 1}),
    ("capped", [3, 5], {}),
])
def test_sub_model_computes_the_full_models_logits(tmp_path, reg, runs, run, experts, kept_groups):
    full_ckpt, full_recipe = runs[run]
    path = extract(full_ckpt.parent.parent, ["blog", "news"], tmp_path / "sub", reg)
    sub = load_recipe(tmp_path / "sub" / "recipe.toml", registry=reg)
    assert (sub.model.experts, sub.data.keep_domains, sub.router.groups) == (experts, ["news", "blog"], kept_groups)
    assert sub.data.domains == DOMAINS                       # the same data and ids; training keeps two domains
    assert (path / "recipe.toml").read_text() == sub.to_toml()
    big, small = engine(full_recipe, reg, 1), engine(sub, reg, 2)       # other seeds: everything comes from the files
    checkpoint.load(full_ckpt, big)
    state = checkpoint.load(path, small)
    assert state["step"] == 1 and state["data"] == {"epoch": 0} and state["data_id"]["domains"] == ["news", "blog"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (6, 16), generator=g)
    news_or_blog = torch.randint(0, 2, (6, 16), generator=g)           # both domains in every sequence
    with torch.no_grad():
        a = big.engine.inner.eval()(Batch(tokens, tokens, news_or_blog * 2)).logits_BSV
        b = small.engine.inner.eval()(Batch(tokens, tokens, news_or_blog)).logits_BSV
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the kept experts (and their Adam moments) are the full model's, renumbered
    rb, rs = big.engine.inner.blocks[1].moe, small.engine.inner.blocks[1].moe
    kept = [e for d in ("news", "blog") for e in rb.router.group(d)]
    assert torch.equal(rs.experts.w1_EDF, rb.experts.w1_EDF[kept])
    exp_avg = lambda e, w: e.engine.optimizer.state[w]["exp_avg"]    # noqa: E731
    assert torch.equal(exp_avg(small, rs.experts.w2_EFD), exp_avg(big, rb.experts.w2_EFD)[kept])
    assert bool(exp_avg(small, rs.experts.w2_EFD).abs().sum() > 0)


def test_cli_extract_and_plan_show_the_smaller_model(tmp_path, reg, runs, monkeypatch, capsys):
    monkeypatch.setattr("rapid.cli._registry", lambda ctx=None: reg)
    monkeypatch.chdir(tmp_path)
    full = runs["even"][0]
    with pytest.raises(SystemExit) as info:
        main(["extract", str(full), "--domains", "review", "--out", "sub"])
    assert info.value.code in (0, None)
    manifest = json.loads((tmp_path / "sub/checkpoints/step_00000001/manifest.json").read_text())
    assert (tmp_path / "sub/checkpoints/latest").read_text() == "step_00000001"
    capsys.readouterr()
    plans = []
    for recipe in (full / "recipe.toml", "sub/recipe.toml"):
        with pytest.raises(SystemExit):
            main(["plan", str(recipe), "--json"])
        plans.append(json.loads(capsys.readouterr().out))
    full, sub = plans
    small = build_model(load_recipe(tmp_path / "sub/recipe.toml", registry=reg), reg)
    assert sub["params_total"] == manifest["params"]["params_total"] == count_params(small, 1)["params_total"]
    assert sub["params_dense"] == full["params_dense"]
    assert sub["params_expert"] == full["params_expert"] * (1 + 3) // (4 + 8)    # review: 1 of 4, 3 of 8


def _snapshot(*roots):
    return [sorted((str(p), p.stat().st_size) for p in root.rglob("*")) for root in roots]


@pytest.mark.parametrize("args, needle", [
    (["--domains", "sport", "--out", "sub"], "--domains: 'sport' is not a domain of"),
    (["--domains", ",", "--out", "sub"], "--domains names no domain"),
    (["--domains", "news", "--out", "."], "exists and is not an empty directory"),
])
def test_bad_input_is_one_error_and_writes_nothing(tmp_path, reg, runs, monkeypatch, capsys, args, needle):
    monkeypatch.setattr("rapid.cli._registry", lambda ctx=None: reg)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("a file")
    full = runs["even"][0].parent.parent
    before = _snapshot(tmp_path, full)
    with pytest.raises(SystemExit) as info:
        main(["extract", str(full), *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in " ".join(err.split()), err
    assert _snapshot(tmp_path, full) == before


def test_refuses_other_routers_and_checkpoints_without_tables(tmp_path, reg, runs):
    with pytest.raises(UserError, match="router 'top1'; extract needs 'rre'"):
        extract(runs["top1"][0], ["news"], tmp_path / "a", reg)
    with pytest.raises(UserError, match="holds no routing table of MoE layer blocks.0.moe"):
        extract(runs["nobuf"][0], ["news"], tmp_path / "b", reg)
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["even"][0], damaged / "checkpoints" / "step_00000001")
    shard = damaged / "checkpoints" / "step_00000001" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match="does not match its manifest"):
        extract(damaged, ["news"], tmp_path / "c", reg)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_an_extracted_run_continues_training_on_its_domains(tmp_path, monkeypatch):
    """rapid run (rre over two text files = two domains) -> rapid extract one domain -> rapid run
    DIR/recipe.toml --out DIR --resume: the sub-model trains on that domain's documents only."""
    import random
    import tomli_w
    monkeypatch.chdir(tmp_path)
    rnd = random.Random(0)
    for name, words in (("news", "the cat sat on a mat"), ("review", "good bad fine great poor")):
        Path(f"{name}.txt").write_text("\n".join(" ".join(rnd.choice(words.split()) for _ in range(20))
                                                 for _ in range(200)))
    raw = tiny_raw(run={"steps": 2, "eval_every": 0}, router={"name": "rre"},
                   data={"name": "text", "paths": ["news.txt", "review.txt"], "per_line": True,
                         "domains": ["news", "review"], "val_fraction": 0.1},
                   model={"experts": [2, 4], "top_k": 1})
    Path("r.toml").write_text(tomli_w.dumps(raw))
    for argv in (["run", "r.toml", "--out", "full", "--no-progress"],
                 ["extract", "full", "--domains", "review", "--out", "sub"],
                 ["run", "sub/recipe.toml", "--out", "sub", "--resume", "--set", "run.steps=4", "--no-progress"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code in (0, None), argv
    rows = [json.loads(line) for line in Path("sub/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-2:] == [3, 4] and "val_loss" in rows[-1]
    state = json.loads(Path("sub/checkpoints/step_00000004/state.json").read_text())
    assert state["data_id"]["domains"] == ["review"]
