"""expert_choice (Zhou et al. 2022): each expert's top-C tokens against a naive loop, score-weighted
combine, the unrouted-token statistic, capacity at training and evaluation, refusals; plus rapid's
router contract on this router."""

import math

import pytest
import torch

from rapid.builtin.contract import *  # noqa: F401,F403
from rapid.builtin.routers.expert_choice import ExpertChoiceRouter
from rapid.errors import UserError
from rapid.moe import MoE
from rapid.kernels import Kernels
from rapid.plugins import Registry, make_plugin_manager
from rapid.types import MoESpec

ROUTERS = ["expert_choice"]


def make(E=4, **kw):
    torch.manual_seed(0)
    return ExpertChoiceRouter(ExpertChoiceRouter.Config(), MoESpec(hidden=8, num_experts=E, **kw))


@pytest.mark.parametrize("T,E,cf,k", [(32, 4, 1.0, 1), (30, 4, 2.0, 1), (17, 3, 1.25, 2), (8, 4, 9.0, 1)])
def test_each_expert_takes_its_best_tokens(T, E, cf, k):
    r = make(E, capacity_factor=cf, top_k=k, min_capacity=1)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T))
    out = r.route(logits)
    C = min(T, max(1, math.ceil(T * k / E * cf)))
    probs = torch.softmax(logits, -1)
    want_ids, want_w = torch.full((T, E), -1), torch.zeros(T, E)
    for e in range(E):                                  # naive: expert e's C highest-scoring tokens
        for t in sorted(range(T), key=lambda t: -float(probs[t, e]))[:C]:
            want_ids[t, e], want_w[t, e] = e, probs[t, e]
    assert torch.equal(out.expert_ids_TK, want_ids)
    torch.testing.assert_close(out.weights_TK, want_w)
    taken = (want_ids >= 0).sum(1)
    assert out.stats["capacity"] == C
    assert float(out.stats["dropped_frac"]) == pytest.approx(float((taken == 0).float().mean()))
    assert float(out.stats["experts_per_token"]) == pytest.approx(E * C / T)
    assert set(out.losses) == {"z_loss"}


def test_evaluation_uses_the_training_capacity_factor():
    """Validation measures the model as it trains: the same experts per token (not eval_capacity_factor)."""
    r = make(4, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=1)
    logits = torch.randn(40, 4)
    assert r.route(logits).stats["capacity"] == 10
    assert r.eval().route(logits).stats["capacity"] == 10


def test_in_a_moe_layer_a_token_sums_its_experts_and_unrouted_tokens_get_zero():
    reg = Registry(make_plugin_manager(autoload=False))
    spec = MoESpec(hidden=8, num_experts=4, capacity_factor=0.5, min_capacity=1)
    torch.manual_seed(0)
    moe = MoE(spec, ExpertChoiceRouter(ExpertChoiceRouter.Config(), spec), 16, Kernels(reg, "reference"))
    moe.experts.reset_parameters(0.1, 0.1)
    x = torch.randn(32, 8)
    y, routing = moe(x, torch.zeros(32, dtype=torch.long), torch.zeros(32, dtype=torch.long))
    want = torch.zeros(32, 8)
    w1, w2 = moe.experts.w1_EDF, moe.experts.w2_EFD
    for t in range(32):
        for e in range(4):
            if routing.expert_ids_TK[t, e] >= 0:
                want[t] += routing.weights_TK[t, e] * (torch.nn.functional.gelu(x[t] @ w1[e]) @ w2[e])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    unrouted = (routing.expert_ids_TK < 0).all(1)
    assert bool(unrouted.any()) and bool((y[unrouted] == 0).all())
    assert float(routing.stats["load_max_mean"]) == 1.0           # every expert exactly C tokens


def test_dropless_is_refused(builtin_registry):
    with pytest.raises(UserError, match="every expert\\s+would take every token"):
        make(dropless=True)
