"""large_margin: the distance formula against a per-token computation (and as a real l_p distance to
the routing boundary), the loss and its gradient, routing equal to top1, option validation; plus
rapid's router contract on this router."""

import pytest
import torch

from rapid.builtin.contract import *  # noqa: F401,F403
from rapid.builtin.routers.large_margin import LargeMarginRouter, margin_distances
from rapid.builtin.routers.top1 import Top1Router
from rapid.errors import UserError
from rapid.recipe import build_config
from rapid.types import MoESpec

ROUTERS = ["large_margin"]


def router(E=6, D=16, seed=0, **cfg):
    torch.manual_seed(seed)
    return LargeMarginRouter(LargeMarginRouter.Config(**cfg), MoESpec(hidden=D, num_experts=E, dropless=True))


def run(r, x):
    kw = dict(token_ids_T=torch.zeros(len(x), dtype=torch.long), domain_ids_T=torch.zeros(len(x), dtype=torch.long))
    return r(x, **kw)


def naive_distances(x, W, norm, margin, competitors, competitor):
    """Per token and per competitor, in float64, straight from the definition."""
    out = []
    for h in x.double():
        z = W.double() @ h
        y = int(z.argmax())
        d = {}
        for j in range(len(W)):
            if j != y:
                v = (W[y] - W[j]).double()
                q = 2 if norm == "l2" else 1
                d[j] = float(v @ h) / (float(v.norm(p=q)) if margin == "normalised" else 1.0)
        js = sorted(d, key=d.get) if competitor == "nearest" else sorted(d, key=lambda j: -float(z[j]))
        out.append([d[j] for j in js[:competitors]])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("norm,margin,m,competitor", [
    ("l2", "normalised", 1, "nearest"), ("linf", "normalised", 1, "nearest"), ("l2", "normalised", 3, "nearest"),
    ("linf", "normalised", 2, "runner_up"), ("l2", "raw", 2, "nearest"), ("l2", "normalised", 1, "runner_up")])
def test_loss_and_stats_match_per_token_computation(norm, margin, m, competitor):
    r = router(norm=norm, margin=margin, competitors=m, competitor=competitor)
    x = torch.randn(40, 16)
    d = naive_distances(x, r.gate.weight.detach(), norm, margin, m, competitor)
    r.config.gamma = gamma = float(d[:, 0].median())                 # some tokens inside the margin, some not
    out = run(r, x)
    short = torch.relu(gamma - d)
    assert torch.allclose(out.losses["large_margin"].double(), short.sum(1).mean(), atol=1e-5)
    assert torch.allclose(out.stats["margin_mean"].double(), d[:, 0].mean(), atol=1e-5)
    assert torch.allclose(out.stats["margin_within_frac"].double(), (short > 0).any(1).double().mean())
    assert 0 < float(out.stats["margin_within_frac"]) < 1


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_distance_is_the_lp_distance_to_the_boundary(norm):
    """Moving h by d in l_p norm (along the dual direction) lands exactly on z_y = z_j; the nearest
    boundary's d is the smallest l_p step that changes the routing."""
    torch.manual_seed(1)
    W, x = torch.randn(5, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    z = x @ W.T
    y = z.argmax(-1)
    d_TE = margin_distances(z, W, y, norm)
    d, j = d_TE.min(-1)
    v = W[y] - W[j]
    step = v / v.norm(dim=-1, keepdim=True) if norm == "l2" else v.sign()     # unit l_p vectors
    on_boundary = x - d[:, None] * step
    zb = on_boundary @ W.T
    assert torch.allclose(zb.gather(1, y[:, None]), zb.gather(1, j[:, None]))
    assert torch.allclose(zb.max(-1).values, zb.gather(1, y[:, None])[:, 0])      # no other boundary crossed first
    assert torch.allclose(step.norm(p=2 if norm == "l2" else float("inf"), dim=-1), torch.ones(30, dtype=torch.float64))


@pytest.mark.parametrize("cfg", [dict(norm="l2"), dict(norm="linf"), dict(margin="raw"),
                                 dict(competitors=3, competitor="runner_up")])
def test_sgd_step_on_the_margin_loss_increases_the_margin(cfg):
    r = router(E=8, seed=2, **{"gamma": 5.0, **cfg})
    x = torch.randn(256, 16)
    before = run(r, x)
    assert float(before.stats["margin_within_frac"]) == 1.0          # every token inside the margin
    before.losses["large_margin"].backward()
    with torch.no_grad():
        r.gate.weight -= 0.02 * r.gate.weight.grad / r.gate.weight.grad.norm()
    after = run(r, x)
    assert float(after.stats["margin_mean"]) > float(before.stats["margin_mean"])
    assert float(after.losses["large_margin"].detach()) < float(before.losses["large_margin"].detach())


def test_loss_is_zero_beyond_the_margin():
    r = router(competitors=2)
    x = torch.randn(64, 16)
    d_min = float(naive_distances(x, r.gate.weight.detach(), "l2", "normalised", 2, "nearest").min())
    r.config.gamma = 0.9 * d_min
    out = run(r, x)
    assert float(out.losses["large_margin"].detach()) == 0.0 and float(out.stats["margin_within_frac"]) == 0.0
    out.losses["large_margin"].backward()
    assert float(r.gate.weight.grad.abs().max()) == 0.0


def test_routing_is_top1s():
    """Same gate weights: the same experts, weights, load_balance and z_loss as the top1 router."""
    lm = LargeMarginRouter(LargeMarginRouter.Config(), MoESpec(hidden=16, num_experts=4, capacity_factor=0.5,
                                                               min_capacity=1, drop_policy="position"))
    t1 = Top1Router(Top1Router.Config(), lm.spec)
    t1.load_state_dict(lm.state_dict())
    x = torch.randn(64, 16)
    a, b = run(lm, x), run(t1, x)
    assert (a.expert_ids_TK < 0).any()
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK) and torch.equal(a.weights_TK, b.weights_TK)
    assert set(a.losses) == {"load_balance", "z_loss", "large_margin"}
    for name in ("load_balance", "z_loss"):
        assert torch.equal(a.losses[name], b.losses[name])


def test_loss_term_is_registered_by_the_module():
    from rapid.builtin.routers import large_margin
    from rapid.plugins import Registry, make_plugin_manager
    from rapid.types import ModelOutput
    reg = Registry(make_plugin_manager(autoload=False))           # a builtin now: registered by its module
    assert reg.pm.is_registered(large_margin)
    assert reg.get("router", "large_margin") is LargeMarginRouter
    term = reg.get("loss", "large_margin")
    out = ModelOutput(logits_BSV=torch.zeros(1), aux={"large_margin": [torch.tensor(0.5), torch.tensor(0.25)]})
    assert float(term(out, None)) == 0.75


def test_bad_options():
    with pytest.raises(UserError, match="top_k=2"):
        LargeMarginRouter(LargeMarginRouter.Config(), MoESpec(hidden=8, num_experts=4, top_k=2))
    with pytest.raises(UserError, match="competitors=4"):
        LargeMarginRouter(LargeMarginRouter.Config(competitors=4), MoESpec(hidden=8, num_experts=4))
    for key, value in (("gamma", 0.0), ("gamma", -1), ("norm", "l1"), ("norm", 2), ("margin", "logit"),
                       ("competitors", 0), ("competitor", "random")):
        with pytest.raises(UserError, match=key):
            build_config(LargeMarginRouter.Config, {key: value}, "[router]", {})
    cfg = build_config(LargeMarginRouter.Config, {"gamma": 2, "norm": "linf", "jitter": 0.01}, "[router]", {})
    assert (cfg.gamma, cfg.norm, cfg.jitter) == (2.0, "linf", 0.01)


def test_the_margin_term_is_on_unless_the_recipe_sets_it(builtin_registry):
    from rapid.recipe import resolve
    from tests.conftest import tiny_raw
    explicit = {"lm": 1.0, "load_balance": 0.1}
    assert resolve(tiny_raw(router={"name": "large_margin"}, model={"top_k": 1}), "x", builtin_registry).loss[
        "large_margin"] == 0.01
    assert resolve(tiny_raw(router={"name": "large_margin"}, model={"top_k": 1}, loss=explicit), "x",
                   builtin_registry).loss == {**explicit, "large_margin": 0.01}
    off = resolve(tiny_raw(router={"name": "large_margin"}, model={"top_k": 1}, loss={**explicit, "large_margin": 0.0}),
                  "x", builtin_registry)
    assert off.loss["large_margin"] == 0.0
    assert "large_margin" not in resolve(tiny_raw(), "x", builtin_registry).loss
