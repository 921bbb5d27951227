"""rre router (PanGu-Sigma Random Routed Experts): group sizes and their errors, the two-level table,
per-layer seeding, recipe validation of [router.groups], sub-model tables, and rapid's router contract."""

import pytest
import torch

from rapid.builtin.contract import *  # noqa: F401,F403
from rapid.builtin.routers.rre import RRERouter, group_sizes
from rapid.errors import UserError
from rapid.recipe import build_model, load_recipe, resolve
from rapid.types import MoESpec
from tests.conftest import tiny_raw

ROUTERS = ["rapid.builtin.routers.rre:RRERouter"]
NAME = "rapid.builtin.routers.rre:RRERouter"


def make(groups=None, E=4, domains=("news", "review", "blog"), seed=0, **kw):
    torch.manual_seed(seed)
    spec = MoESpec(**{"hidden": 8, "num_experts": E, "vocab_size": 500, "domains": domains, "dropless": True, **kw})
    return RRERouter(RRERouter.Config(groups or {}), spec)


@pytest.mark.parametrize("groups, E, sizes", [
    ({}, 4, [2, 1, 1]), ({}, 8, [3, 3, 2]), ({}, 3, [1, 1, 1]),
    ({"news": 1, "review": 2, "blog": 1}, 4, [1, 2, 1]),
    ({"blog": 1, "news": 1, "review": 2}, 8, [2, 4, 2]),        # a layer with twice the experts: twice each
])
def test_group_sizes(groups, E, sizes):
    assert group_sizes(groups, ("news", "review", "blog"), E, 0) == sizes


@pytest.mark.parametrize("groups, E, domains, needle", [
    ({}, 4, (), "no domains are declared"),
    ({}, 2, ("a", "b", "c"), "2 experts for 3 domains"),
    ({"a": 1, "b": 1}, 4, ("a", "b", "c"), "leaves out the domains ['c']"),
    ({"a": 1, "b": 1, "c": 1, "x": 1}, 4, ("a", "b", "c"), "names undeclared domains ['x']"),
    ({"a": 2, "b": 0, "c": 2}, 4, ("a", "b", "c"), "gives 'b' 0 experts"),
    ({"a": 3, "b": 1, "c": 1}, 4, ("a", "b", "c"), "asks for 5 experts in all, which exceeds the layer's 4"),
    ({"a": 1, "b": 1, "c": 1}, 4, ("a", "b", "c"), "asks for 3 experts in all, which does not divide"),
])
def test_group_errors(groups, E, domains, needle):
    with pytest.raises(UserError, match=None) as info:
        make(groups, E, domains)
    assert needle in str(info.value)


def test_each_domain_routes_inside_its_group_balanced():
    r = make({"news": 1, "review": 2, "blog": 3}, E=6)
    assert [r.group(d) for d in ("news", "review", "blog")] == [range(0, 1), range(1, 3), range(3, 6)]
    for d, name in enumerate(r.spec.domains):
        counts = torch.bincount(r.expert_DV[d], minlength=6)[r.group(name).start:r.group(name).stop]
        assert int(counts.sum()) == 500 and int(counts.max() - counts.min()) <= 1     # only its group, balanced
    assert not torch.equal(r.expert_DV[1], r.expert_DV[2] - 2)          # each domain draws its own table
    tokens, domains = torch.randint(0, 500, (300,)), torch.randint(0, 3, (300,))
    out = r(torch.zeros(300, 8), token_ids_T=tokens, domain_ids_T=domains)
    assert out.expert_ids_TK[:, 0].tolist() == [int(r.expert_DV[d, t]) for d, t in zip(domains, tokens)]
    assert bool((out.weights_TK == 1).all()) and out.logits_TE is None and out.losses == {}


def test_tables_per_layer_seed_and_materialisation():
    a, b, c = make(layer=0), make(layer=1), make(layer=0, seed=5)
    assert not torch.equal(a.expert_DV, b.expert_DV) and not torch.equal(a.expert_DV, c.expert_DV)
    with torch.device("meta"):
        m = make(layer=1)
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.reset_parameters()
    assert torch.equal(m.expert_DV, b.expert_DV) and "expert_DV" in m.state_dict()


def test_capacity_is_per_group_from_the_domains_tokens():
    """8 review tokens (a group of 1 expert) and 4 news tokens (2 experts), capacity factor 0.5: each
    review expert keeps ceil(8 / 1 * 0.5) = 4, each news expert ceil(4 / 2 * 0.5) = 1 (the layer-wide
    rule would give every expert ceil(12 / 4 * 0.5) = 2)."""
    r = make(dropless=False, capacity_factor=0.5, min_capacity=1, drop_policy="position").train()
    review_tok = int(torch.nonzero(r.expert_DV[1] == 2)[0])            # review's only expert is 2
    news_tok = int(torch.nonzero(r.expert_DV[0] == 0)[0])              # news: experts 0 and 1
    tokens = torch.tensor([review_tok] * 8 + [news_tok] * 4)
    domains = torch.tensor([1] * 8 + [0] * 4)
    out = r(torch.zeros(12, 8), token_ids_T=tokens, domain_ids_T=domains).expert_ids_TK[:, 0]
    assert out.tolist() == [2] * 4 + [-1] * 4 + [0] + [-1] * 3
    assert r.capacity(domains).tolist() == [1, 1, 4, 1]                 # blog: no tokens, min_capacity
    assert make(dropless=True).capacity(domains) is None


def test_apply_capacity_takes_one_capacity_per_expert():
    from rapid.moe import apply_capacity
    ids = torch.tensor([[0], [0], [1], [1], [1], [-1], [2]])
    prio = -torch.arange(7.0)[:, None]
    out = apply_capacity(ids, prio, 3, torch.tensor([1, 2, 0]))
    assert out[:, 0].tolist() == [0, -1, 1, 1, -1, -1, -1]


def test_subset_renumbers_experts_and_keeps_the_routing():
    r = make({"news": 2, "review": 1, "blog": 3}, E=6)
    kept, table = r.subset(r.expert_DV, ["blog", "news"])           # declared order: news, blog
    assert kept.tolist() == [0, 1, 3, 4, 5] and table.shape == (2, 500)
    assert torch.equal(kept[table], r.expert_DV[[0, 2]])             # new id -> the same old expert
    assert table[0].max() == 1 and table[1].min() == 2


def test_recipe_groups_validate(builtin_registry, tmp_path):
    def raw(**router):
        return tiny_raw(router={"name": NAME, **router}, data={"domains": ["news", "review"]},
                        model={"experts": [2, 4]})
    recipe = resolve(raw(groups={"news": 1, "review": 1}), "<t>", builtin_registry)
    model = build_model(recipe, builtin_registry)
    assert [b.moe.router.sizes for b in model.blocks] == [[1, 1], [2, 2]]
    assert "[router.groups]\nnews = 1\nreview = 1" in recipe.to_toml()
    with pytest.raises(UserError, match=r"key 'groups'\['review'\] must be greater than 0"):
        resolve(raw(groups={"news": 2, "review": 0}), "<t>", builtin_registry)
    with pytest.raises(UserError, match=r"key 'groups' must be dict\[str, int\], got dict"):
        resolve(raw(groups={"news": "two", "review": 1}), "<t>", builtin_registry)
    with pytest.raises(UserError, match=r"\[router\] \(name = .*\): router 'rre': \[router.groups\] .* names "
                                        r"undeclared domains \['sport'\]"):
        build_model(resolve(raw(groups={"news": 1, "review": 1, "sport": 1}), "<t>", builtin_registry),
                    builtin_registry)
    with pytest.raises(UserError, match="no domains are declared"):
        build_model(resolve(tiny_raw(router={"name": NAME}), "<t>", builtin_registry), builtin_registry)
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    assert load_recipe(path, ["router.groups={news = 2, review = 2}"], builtin_registry).router.groups == \
        {"news": 2, "review": 2}
    with pytest.raises(UserError, match="unknown key 'groups.news'"):    # --set takes table.key only
        load_recipe(path, ["router.groups.news=3"], builtin_registry)
