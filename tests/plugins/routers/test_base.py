"""base (BASE layers, Lewis et al. 2021): the auction's assignment against brute force on small
problems (exact balance, optimal within its bound), pairwise-swap optimality on larger ones, greedy
evaluation, the sigmoid gate and its gradient; plus rapid's router contract on this router."""

import itertools
import math

import pytest
import torch

from rapid.builtin.contract import *  # noqa: F401,F403
from rapid.builtin.routers.base import BaseRouter, balanced_assignment
from rapid.errors import UserError
from rapid.types import MoESpec

ROUTERS = ["base"]


def brute_force(scores):
    """The best total score over every assignment with at most ceil(T/E) tokens per expert."""
    T, E = scores.shape
    C = math.ceil(T / E)
    best = -math.inf
    for choice in itertools.product(range(E), repeat=T):
        if max(choice.count(e) for e in range(E)) <= C:
            best = max(best, sum(float(scores[t, e]) for t, e in enumerate(choice)))
    return best


@pytest.mark.parametrize("T,E,seed", [(6, 3, 0), (6, 2, 1), (7, 3, 2), (8, 4, 3), (5, 2, 4), (9, 3, 5)])
def test_auction_is_balanced_and_optimal_within_its_bound(T, E, seed):
    scores = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    tol = 1e-4
    out = balanced_assignment(scores, tolerance=tol)
    loads = torch.bincount(out, minlength=E)
    assert int(loads.max()) == math.ceil(T / E) and int(loads.sum()) == T
    if T % E == 0:
        assert bool((loads == T // E).all())
    total = float(scores[torch.arange(T), out].sum())
    bound = T * tol * float(scores.max() - scores.min())
    assert brute_force(scores) - bound <= total <= brute_force(scores) + 1e-5


@pytest.mark.parametrize("T,E", [(256, 8), (250, 16), (64, 4)])
def test_no_swap_of_two_tokens_improves_a_large_assignment(T, E):
    scores = torch.randn(T, E, generator=torch.Generator().manual_seed(T))
    tol = 1e-4
    out = balanced_assignment(scores, tolerance=tol)
    assert int(torch.bincount(out, minlength=E).max()) == math.ceil(T / E)
    own = scores[torch.arange(T), out]
    # gain of swapping tokens s and t: scores[s, e(t)] + scores[t, e(s)] - own[s] - own[t]
    cross = scores[:, out]                                                # [s, t] = scores[s, e(t)]
    gain = cross + cross.t() - own[:, None] - own[None, :]
    assert float(gain.max()) <= 2 * tol * float(scores.max() - scores.min()) + 1e-6
    greedy = scores.argmax(1)
    assert float(own.sum()) <= float(scores[torch.arange(T), greedy].sum())   # balance costs affinity


def test_ties_and_a_single_expert():
    assert torch.equal(balanced_assignment(torch.zeros(6, 1)), torch.zeros(6, dtype=torch.long))
    out = balanced_assignment(torch.ones(12, 4))
    assert torch.equal(torch.bincount(out, minlength=4), torch.full((4,), 3))
    with pytest.raises(ValueError, match="not finite"):
        balanced_assignment(torch.tensor([[0.0, math.inf], [1.0, 0.0]]))


def router(E=4, **kw):
    torch.manual_seed(0)
    return BaseRouter(BaseRouter.Config(), MoESpec(hidden=8, num_experts=E, **kw))


def test_training_is_balanced_evaluation_greedy_and_the_gate_a_sigmoid():
    r = router(capacity_factor=0.1)                  # BASE ignores capacity: nothing is dropped
    x = torch.randn(64, 8)
    train = r(x, token_ids_T=torch.zeros(64, dtype=torch.long), domain_ids_T=torch.zeros(64, dtype=torch.long))
    assert torch.equal(torch.bincount(train.expert_ids_TK[:, 0], minlength=4), torch.full((4,), 16))
    affinity = x @ r.centroids_ED.t()
    torch.testing.assert_close(train.weights_TK, torch.sigmoid(affinity.gather(1, train.expert_ids_TK)))
    assert train.losses == {}
    r.eval()
    ev = r(x, token_ids_T=torch.zeros(64, dtype=torch.long), domain_ids_T=torch.zeros(64, dtype=torch.long))
    assert torch.equal(ev.expert_ids_TK[:, 0], affinity.argmax(1))
    ev.weights_TK.sum().backward()
    assert r.centroids_ED.grad is not None and float(r.centroids_ED.grad.abs().sum()) > 0


def test_refuses_top_k_2_and_bad_options(builtin_registry, tmp_path):
    with pytest.raises(UserError, match="routes each token to one expert"):
        router(top_k=2)
    from rapid.recipe import resolve
    from tests.conftest import tiny_raw
    with pytest.raises(UserError, match="tolerance' must be less than or equal to 0.1"):
        resolve(tiny_raw(router={"name": "base", "tolerance": 0.5}, model={"top_k": 1}), "x.toml", builtin_registry)


def test_out_of_rounds_returns_the_last_complete_phase_or_a_greedy_finish():
    """Every token prefers expert 0 and one outlier stretches the range: with few rounds the result
    is still balanced, and no worse than its phase's bound (the last complete phase), or a greedy
    finish when even the first phase did not complete."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(512, 8, generator=g) * 0.1
    scores[:, 0] += 1.0
    scores[0, 3] = 50.0
    full_info, capped_info, greedy_info = {}, {}, {}
    full = balanced_assignment(scores, tolerance=1e-3, info=full_info)
    capped = balanced_assignment(scores, tolerance=1e-3, max_rounds=40, info=capped_info)
    greedy = balanced_assignment(scores, tolerance=1e-4, max_rounds=1, info=greedy_info)
    value = lambda out: float(scores[torch.arange(512), out].sum())          # noqa: E731
    for out in (full, capped, greedy):
        assert torch.equal(torch.bincount(out, minlength=8), torch.full((8,), 64))
    assert capped_info["rounds"] == 40 and capped_info["eps"] > full_info["eps"]
    span = float(scores.max() - scores.min())
    assert value(capped) >= value(full) - 512 * capped_info["eps"] * span
    assert greedy_info["eps"] == math.inf and int(greedy[0]) == 3            # the outlier kept its expert
    assert value(greedy) > value(torch.arange(512) % 8)                      # better than dealing in order


def test_non_finite_affinities_route_without_raising():
    r = router()
    affinity = torch.randn(16, 4)
    affinity[3, 1] = float("nan")
    out = r.route(affinity)
    assert out.expert_ids_TK.shape == (16, 1) and out.stats == {}          # no auction on NaN
    assert r.route(torch.randn(16, 4)).stats["auction_rounds"] > 0
