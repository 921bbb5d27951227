"""Contract tests over every registered router (builtins and installed third parties): a new
router is covered by being registered."""

import pytest
import torch

from rapid.plugins import Registry, make_plugin_manager
from rapid.types import MoESpec, Routing

ROUTERS = sorted(Registry(make_plugin_manager()).entries("router"))


def _make(name, E=4, top_k=1, **spec_kw):
    reg = Registry(make_plugin_manager())
    cls = reg.get("router", name)
    spec = MoESpec(hidden=16, num_experts=E, top_k=top_k, **spec_kw)
    return cls(cls.Config(), spec)


def _inputs(T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, 16, generator=g), torch.randint(0, 1000, (T,), generator=g),
            torch.randint(0, 3, (T,), generator=g))


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("training", [True, False])
def test_routing_shapes_and_invariants(name, training):
    router = _make(name, capacity_factor=1.0, min_capacity=1).train(training)
    x, tok, dom = _inputs()
    r = router(x, token_ids_T=tok, domain_ids_T=dom)
    assert isinstance(r, Routing)
    T, K = 64, router.spec.top_k
    assert r.expert_ids_TK.shape == (T, K) and r.expert_ids_TK.dtype == torch.long
    assert r.weights_TK.shape == (T, K) and r.weights_TK.is_floating_point()
    assert int(r.expert_ids_TK.min()) >= -1 and int(r.expert_ids_TK.max()) < 4
    dropped = r.expert_ids_TK < 0
    assert torch.all(r.weights_TK[dropped] == 0), "dropped assignments must have weight 0"
    cap = router.spec.capacity(T, training)
    kept = r.expert_ids_TK[~dropped]
    assert int(torch.bincount(kept, minlength=4).max()) <= cap, "capacity exceeded"
    if r.logits_TE is not None:
        assert r.logits_TE.shape == (T, 4)
    for term in r.losses.values():
        assert term.dim() == 0 and torch.isfinite(term)


@pytest.mark.parametrize("name", ROUTERS)
def test_dropless_drops_nothing(name):
    router = _make(name, dropless=True)
    x, tok, dom = _inputs(T=256)
    assert bool((router(x, token_ids_T=tok, domain_ids_T=dom).expert_ids_TK >= 0).all())


@pytest.mark.parametrize("name", ROUTERS)
def test_deterministic_under_seed(name):
    router = _make(name, capacity_factor=0.5)
    x, tok, dom = _inputs()
    torch.manual_seed(7)
    a = router(x, token_ids_T=tok, domain_ids_T=dom)
    torch.manual_seed(7)
    b = router(x, token_ids_T=tok, domain_ids_T=dom)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK) and torch.equal(a.weights_TK, b.weights_TK)


@pytest.mark.parametrize("name", ROUTERS)
def test_gated_routers_get_gradients(name):
    router = _make(name)
    params = [p for p in router.parameters() if p.requires_grad]
    if not params:
        pytest.skip(f"router {name!r} has no trainable parameters (fixed routing)")
    x, tok, dom = _inputs()
    r = router(x, token_ids_T=tok, domain_ids_T=dom)
    (r.weights_TK.sum() + sum(r.losses.values())).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
