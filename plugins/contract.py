"""rapid's router contract, as pytest tests any router package runs in its own repository.

    # tests/test_rapid_contract.py of a router package
    from rapid.builtin.contract import *  # noqa: F401,F403
    ROUTERS = ["modulo"]      # the routers to check; without it, every registered router

Every test takes a router name (``ROUTERS`` of the importing module, else every router registered in
this environment, third-party ones included) and builds the router with its default ``Config`` for a
layer of 4 experts, 3 declared domains and a 1000-token vocabulary, with top_k = 1 or, if the router
refuses that (raises ``rapid.errors.UserError``), 2; a router that takes neither fails. Shapes,
capacity and dropless are checked at both top_k = 1 and 2 (skipped, with the reason, where the router
refuses one). What is checked: shapes, dtypes and value ranges of the
``Routing``; weights non-negative and 0 where an assignment was dropped; capacity honoured when the
router says it is (``honors_capacity``); when dropless, nothing dropped in evaluation and no token
without an expert in training; the same routing for the same
torch seed; gradients reaching every learnable router parameter; every expert and router parameter
in the autograd graph of a MoE layer (data-parallel backends hang otherwise); the same routing after
a state-dict round trip into a router built from another seed.
"""

from __future__ import annotations

import pytest
import torch

from rapid.errors import UserError
from rapid.types import MoESpec, Routing

__all__ = ["pytest_generate_tests", "test_routing_shapes_and_ranges", "test_capacity_is_honoured",
           "test_dropless_drops_nothing", "test_deterministic_under_a_seed", "test_gradients_reach_the_router",
           "test_every_parameter_is_in_the_graph", "test_state_dict_round_trip"]

DOMAINS = ("d0", "d1", "d2")
ROOMY = {"capacity_factor": 4.0, "eval_capacity_factor": 4.0}   # capacity = all 64 tokens: nothing dropped


def pytest_generate_tests(metafunc):
    if "router_name" in metafunc.fixturenames:
        names = getattr(metafunc.module, "ROUTERS", None)
        if names is None:
            from rapid.plugins import Registry
            names = sorted(Registry().entries("router"))
        metafunc.parametrize("router_name", names)
    if "top_k" in metafunc.fixturenames:
        metafunc.parametrize("top_k", [1, 2])


def make(name: str, top_k: int | None = None, seed: int = 0, **spec_kw):
    """The router ``name`` with its default Config, for a contract layer: with ``top_k`` (skipped if
    the router refuses it), or else the first of top_k = 1, 2 it accepts (failing if it takes neither)."""
    from rapid.plugins import Registry
    cls = Registry().get("router", name)
    refusals = []
    for k in [top_k] if top_k else [1, 2]:
        spec = MoESpec(**{"hidden": 16, "num_experts": 4, "top_k": k, "vocab_size": 1000, "domains": DOMAINS,
                          **spec_kw})
        torch.manual_seed(seed)
        try:
            router = cls(cls.Config(), spec)
        except UserError as exc:
            refusals.append(f"top_k={k}: {exc}")
            continue
        if hasattr(router, "reset_parameters"):
            router.reset_parameters()
        return router
    if top_k:
        pytest.skip(f"router {name!r} refuses this layer: {refusals[0]}")
    pytest.fail(f"router {name!r} cannot be built for the contract's layer with its default Config: "
                f"{'; '.join(refusals)}")


def inputs(T: int = 64, seed: int = 0, S: int = 16):
    """Hidden states, token ids, domain ids and previous tokens of T tokens in sequences of S."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (T,), generator=g)
    prev = torch.cat([torch.full((T // S, 1), -1), tokens.view(T // S, S)[:, :-1]], 1).reshape(-1)
    return torch.randn(T, 16, generator=g), tokens, torch.randint(0, len(DOMAINS), (T,), generator=g), prev


def route(router, x, tokens, domains, prev) -> Routing:
    extra = {"prev_token_ids_T": prev} if router.needs_previous_tokens else {}
    return router(x, token_ids_T=tokens, domain_ids_T=domains, **extra)


def test_routing_shapes_and_ranges(router_name, top_k):
    router = make(router_name, top_k, capacity_factor=1.0, min_capacity=1)
    r = route(router, *inputs())
    T, K, E = 64, router.slots_per_token, 4
    assert isinstance(r, Routing)
    assert r.expert_ids_TK.shape == (T, K) and r.expert_ids_TK.dtype == torch.long
    assert r.weights_TK.shape == (T, K) and r.weights_TK.is_floating_point()
    assert int(r.expert_ids_TK.min()) >= -1 and int(r.expert_ids_TK.max()) < E
    assert bool((r.weights_TK >= 0).all()), "combine weights must be non-negative"
    assert bool((r.weights_TK[r.expert_ids_TK < 0] == 0).all()), "dropped assignments must have weight 0"
    kept = r.expert_ids_TK
    for t in range(T):                           # a token's kept slots go to different experts
        slots = kept[t][kept[t] >= 0].tolist()
        assert len(slots) == len(set(slots)), f"token {t} sent twice to one expert: {slots}"
    if r.logits_TE is not None:
        assert r.logits_TE.shape == (T, E)
    for name, term in r.losses.items():
        assert term.dim() == 0 and torch.isfinite(term), name


@pytest.mark.parametrize("training", [True, False])
def test_capacity_is_honoured(router_name, top_k, training):
    router = make(router_name, top_k, capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1).train(training)
    if not router.honors_capacity:
        pytest.skip(f"router {router_name!r} has its own balance rule (honors_capacity = False)")
    r = route(router, *inputs())
    kept = r.expert_ids_TK[r.expert_ids_TK >= 0]
    assert int(torch.bincount(kept, minlength=4).max()) <= router.spec.capacity(64, training)


def test_dropless_drops_nothing(router_name, top_k):
    router = make(router_name, top_k, dropless=True)
    if not router.honors_capacity:
        pytest.skip(f"router {router_name!r} has its own balance rule (honors_capacity = False)")
    args = inputs(T=256)
    assert bool((route(router.eval(), *args).expert_ids_TK >= 0).all()), "an assignment was dropped in evaluation"
    # in training a router may leave later choices out by its own rule (GShard samples the second)
    assert bool((route(router.train(), *args).expert_ids_TK >= 0).any(1).all()), "a token lost every expert"


def test_deterministic_under_a_seed(router_name):
    router = make(router_name, capacity_factor=0.5)
    args = inputs()
    torch.manual_seed(7)
    a = route(router, *args)
    torch.manual_seed(7)
    b = route(router, *args)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK) and torch.equal(a.weights_TK, b.weights_TK)


def test_gradients_reach_the_router(router_name):
    router = make(router_name)
    params = [p for p in router.parameters() if p.requires_grad]
    if not params:
        pytest.skip(f"router {router_name!r} has no learnable parameters")
    x, tokens, domains, prev = inputs()
    r = route(router, x.requires_grad_(), tokens, domains, prev)
    (r.weights_TK.sum() + sum(r.losses.values(), torch.zeros(()))).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params)


def test_every_parameter_is_in_the_graph(router_name):
    """In a MoE layer, the output and the router's losses reach every expert (even one without
    tokens) and every learnable router parameter."""
    from rapid.kernels import Kernels
    from rapid.moe import MoE
    from rapid.plugins import Registry
    router = make(router_name, **ROOMY)
    torch.manual_seed(0)
    moe = MoE(router.spec, router, 32, Kernels(Registry()))
    moe.experts.reset_parameters(0.02, 0.02)
    x, tokens, domains, prev = inputs()
    y, routing = moe(x, tokens, domains, prev)
    (y.square().sum() + sum(routing.losses.values(), torch.zeros(()))).backward()
    missing = [n for n, p in moe.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters outside the graph: {missing}"


def test_state_dict_round_trip(router_name):
    a = make(router_name, seed=1, **ROOMY).eval()
    b = make(router_name, seed=2, **ROOMY).eval()
    b.load_state_dict(a.state_dict())
    args = inputs()
    ra, rb = route(a, *args), route(b, *args)
    assert torch.equal(ra.expert_ids_TK, rb.expert_ids_TK) and torch.allclose(ra.weights_TK, rb.weights_TK)
