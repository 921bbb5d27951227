"""topk (GShard top-2 / top-k): GShard's slot-major capacity rule against a naive loop, the sampling
rule, weights, losses, and conformance with deepspeed.moe.sharded_moe.top2gating / topkgating; plus
rapid's router contract on this router."""

import pytest
import torch

from rapid.builtin.contract import *  # noqa: F401,F403
from rapid.builtin.routers.top1 import Top1Router
from rapid.builtin.routers.topk import TopKRouter, slot_major_priority
from rapid.errors import UserError
from rapid.recipe import build_config
from rapid.types import MoESpec

ROUTERS = ["topk"]
MOD = "rapid.builtin.routers.topk"


def router(E=8, k=2, second_policy="all", normalize="kept", **kw):
    return TopKRouter(TopKRouter.Config(second_policy=second_policy, normalize=normalize),
                      MoESpec(hidden=32, num_experts=E, top_k=k, **kw))


def dense(routing, E):
    """[T, E] combine weights of the kept assignments."""
    ids, w = routing.expert_ids_TK, routing.weights_TK
    out = torch.zeros(ids.shape[0], E, dtype=w.dtype)
    return out.scatter_add_(1, ids.clamp_min(0), w * (ids >= 0))


def naive_gshard(top_TK, priority_TK, E, cap):
    """GShard's order with a loop: slot by slot; inside a slot, tokens by descending priority."""
    T, K = top_TK.shape
    out, used = torch.full_like(top_TK, -1), [0] * E
    for k in range(K):
        for t in sorted(range(T), key=lambda t: -float(priority_TK[t, k])):   # stable: ties by token
            e = int(top_TK[t, k])
            if e >= 0 and used[e] < cap:
                out[t, k], used[e] = e, used[e] + 1
    return out


def test_slot_major_priority():
    p = torch.tensor([[0.1, 0.9], [0.5, 0.2], [0.3, 0.3]])
    order = slot_major_priority(p).reshape(-1).argsort(descending=True).tolist()
    assert order == [2, 4, 0, 1, 5, 3]        # slot 0 by priority (t1, t2, t0), then slot 1 (t0, t2, t1)


@pytest.mark.parametrize("k,policy", [(2, "position"), (2, "random"), (3, "probs"), (4, "position")])
def test_capacity_order_matches_naive_gshard(k, policy, monkeypatch):
    g = torch.Generator().manual_seed(k)
    T, E = 97, 6
    logits = torch.randn(T, E, generator=g) + torch.tensor([2.0, 1.0, 0, 0, 0, 0])   # skewed: experts overflow
    pri = torch.rand(T, k, generator=g)
    if policy == "random":
        monkeypatch.setattr(f"{MOD}.drop_priority", lambda pol, probs: pri)
    r = router(E=E, k=k, capacity_factor=0.6, min_capacity=1, drop_policy=policy)
    out = r.route(logits)
    top = logits.topk(k, dim=-1).indices
    ref_pri = {"random": pri, "position": -torch.arange(T * k, dtype=torch.float).view(T, k),
               "probs": torch.softmax(logits, -1).gather(1, top)}[policy]
    cap = r.spec.capacity(T, True)
    expected = naive_gshard(top, ref_pri, E, cap)
    assert torch.equal(out.expert_ids_TK, expected)
    assert bool((expected[:, 0] < 0).any()) and bool((expected[:, 1:] < 0).any())


def test_first_choices_win_over_earlier_second_choices():
    """The existing ``position`` rule (token order over all slots) would give token 0's second choice a
    slot before token 1's first choice; GShard gives it to the first choice."""
    logits = torch.tensor([[0.0, 5.0, 4.0], [0.0, 4.0, 5.0], [5.0, 0.0, 4.0]])
    r = router(E=3, k=2, capacity_factor=0.5, min_capacity=1, drop_policy="position")
    assert r.spec.capacity(3, True) == 1
    # expert 2 is token 1's first choice and the second choice of tokens 0 and 2: token 1 gets it
    assert r.route(logits).expert_ids_TK.tolist() == [[1, -1], [2, -1], [0, -1]]


def test_sampling_rule(monkeypatch):
    """Second choice kept iff 2 * g2 > u (g normalised over the top 2); a left-out choice takes no slot."""
    g = torch.Generator().manual_seed(0)
    T, E = 200, 4
    logits = torch.randn(T, E, generator=g)
    u = torch.rand(T, 2, generator=g)
    monkeypatch.setattr(f"{MOD}._uniform", lambda shape, device: u)
    r = router(E=E, k=2, second_policy="sampling", dropless=True)
    out = r.route(logits)
    p = torch.softmax(logits, -1).topk(2, -1).values
    keep2 = 2 * p[:, 1] / p.sum(-1) > u[:, 1]
    assert 0 < keep2.sum() < T
    assert torch.equal(out.expert_ids_TK[:, 1] >= 0, keep2) and bool((out.expert_ids_TK[:, 0] >= 0).all())
    assert torch.allclose(out.stats["sampled_out_frac"], 1 - (keep2.float().mean() + 1) / 2)
    # weights renormalised over the kept choices: 1 on the first choice where the second was left out
    assert torch.allclose(out.weights_TK[~keep2, 0], torch.ones(int((~keep2).sum())))
    assert torch.allclose(out.weights_TK[keep2].sum(-1), torch.ones(int(keep2.sum())))
    # with capacity: an unsampled choice takes no slot
    rc = router(E=E, k=2, second_policy="sampling", capacity_factor=0.5, min_capacity=1, drop_policy="position")
    pre = torch.where(torch.stack([torch.ones_like(keep2), keep2], 1), logits.topk(2, -1).indices, -1)
    expected = naive_gshard(pre, -torch.arange(2 * T, dtype=torch.float).view(T, 2), E, rc.spec.capacity(T, True))
    assert torch.equal(rc.route(logits).expert_ids_TK, expected)


def test_sampling_k3_keep_probability(monkeypatch):
    logits = torch.randn(300, 6)
    u = torch.rand(300, 3)
    monkeypatch.setattr(f"{MOD}._uniform", lambda shape, device: u)
    out = router(E=6, k=3, second_policy="sampling", dropless=True).route(logits)
    p = torch.softmax(logits, -1).topk(3, -1).values
    keep = 3 * p / p.sum(-1, keepdim=True) > u
    keep[:, 0] = True
    assert torch.equal(out.expert_ids_TK >= 0, keep)


def test_eval_keeps_every_choice_and_is_deterministic():
    r = router(E=4, k=2, second_policy="sampling", dropless=True).eval()
    logits = torch.randn(64, 4)
    a, b = r.route(logits), r.route(logits)
    assert bool((a.expert_ids_TK >= 0).all()) and torch.equal(a.expert_ids_TK, logits.topk(2, -1).indices)
    assert torch.equal(a.weights_TK, b.weights_TK)


def test_normalize_topk_keeps_gshard_weights():
    """normalize='topk': weights over the top k before dropping (a dropped second leaves g1 < 1)."""
    logits = torch.randn(80, 4) + torch.tensor([3.0, 0, 0, 0])
    out = router(E=4, k=2, normalize="topk", capacity_factor=0.5, min_capacity=1).route(logits)
    p = torch.softmax(logits, -1).topk(2, -1).values
    kept = out.expert_ids_TK >= 0
    assert (~kept).any()
    assert torch.allclose(out.weights_TK, p / p.sum(-1, keepdim=True) * kept)


def test_top_k_1_is_top1(monkeypatch):
    logits = torch.randn(100, 4) * 2
    pri = torch.rand(100, 1)
    monkeypatch.setattr(f"{MOD}.drop_priority", lambda pol, probs: pri)
    monkeypatch.setattr("rapid.builtin.kernels.reference.drop_priority", lambda pol, probs: pri)
    spec = dict(capacity_factor=0.8, min_capacity=1)
    ours = router(E=4, k=1, second_policy="sampling", **spec).route(logits)
    ref = Top1Router(Top1Router.Config(), MoESpec(hidden=32, num_experts=4, **spec)).route(logits)
    assert (ref.expert_ids_TK < 0).any()
    assert torch.equal(ours.expert_ids_TK, ref.expert_ids_TK) and torch.allclose(ours.weights_TK, ref.weights_TK)
    for name in ("load_balance", "z_loss"):
        assert torch.allclose(ours.losses[name], ref.losses[name])


def test_load_balance_k3_counts_every_choice():
    logits = torch.randn(50, 5)
    probs = torch.softmax(logits, -1)
    f = torch.zeros(5).scatter_add_(0, logits.topk(3, -1).indices.reshape(-1), torch.ones(150)) / 50
    out = router(E=5, k=3).route(logits)
    assert torch.allclose(out.losses["load_balance"], 5 / 3 * (f * probs.mean(0)).sum())


def test_bad_options():
    with pytest.raises(UserError, match="top_k=5"):
        TopKRouter(TopKRouter.Config(), MoESpec(hidden=8, num_experts=4, top_k=5))
    with pytest.raises(UserError, match="second_policy"):
        build_config(TopKRouter.Config, {"second_policy": "random"}, "[router]", {})
    with pytest.raises(UserError, match="normalize"):
        build_config(TopKRouter.Config, {"normalize": "none"}, "[router]", {})


# ------------------------------------------------------------------ DeepSpeed conformance
ds_moe = pytest.importorskip("deepspeed.moe.sharded_moe", reason="deepspeed not installed")


def assert_matches_ds(out, l_aux, combine_TEC, E, capacity):
    assert combine_TEC.shape[2] == capacity
    ours = dense(out, E)
    assert torch.equal(ours > 0, combine_TEC.sum(2) > 0)                     # the kept (token, expert) pairs
    assert torch.allclose(ours, combine_TEC.sum(2), atol=1e-6)              # their combine weights
    assert torch.allclose(out.losses["load_balance"], l_aux)


@pytest.mark.parametrize("T,E,cf,min_cap", [(256, 8, 1.0, 4), (512, 4, 0.5, 4), (64, 8, 0.25, 16), (300, 16, 2.0, 1)])
def test_matches_deepspeed_top2gating(T, E, cf, min_cap):
    """No second-expert sampling: same capacity, kept assignments, weights and l_aux (GShard order
    with token-position ties is DeepSpeed's cumsum rule)."""
    g = torch.Generator().manual_seed(T + E)
    logits = torch.randn(T, E, generator=g) * 2 + torch.linspace(1, 0, E)
    l_aux, combine_TEC, _, _ = ds_moe.top2gating(logits.clone(), cf, min_cap, top2_2nd_expert_sampling=False)
    r = router(E=E, k=2, capacity_factor=cf, min_capacity=min_cap, drop_policy="position")
    out = r.route(logits)
    assert_matches_ds(out, l_aux, combine_TEC, E, r.spec.capacity(T, True))
    if cf < 1:
        assert (out.expert_ids_TK < 0).any()


@pytest.mark.parametrize("T,E,cf", [(256, 8, 1.0), (200, 4, 0.5)])
def test_matches_deepspeed_top2gating_gumbel(T, E, cf, monkeypatch):
    """DeepSpeed's default (second expert by Gumbel-max) with the same noise: second_policy='gumbel'."""
    g = torch.Generator().manual_seed(T)
    logits = torch.randn(T, E, generator=g)
    noise = -torch.log(-torch.log(torch.rand(T, E, generator=g)))
    monkeypatch.setitem(ds_moe.gumbel_map, logits.device, lambda shape: noise)
    monkeypatch.setattr(f"{MOD}._gumbel", lambda shape, device: noise)
    l_aux, combine_TEC, _, _ = ds_moe.top2gating(logits.clone(), cf, 4, top2_2nd_expert_sampling=True)
    r = router(E=E, k=2, second_policy="gumbel", capacity_factor=cf, drop_policy="position")
    out = r.route(logits)
    assert not torch.equal(out.expert_ids_TK[:, 1], logits.topk(2, -1).indices[:, 1])   # the noise mattered
    assert_matches_ds(out, l_aux, combine_TEC, E, r.spec.capacity(T, True))


def test_matches_deepspeed_top2gating_dropless():
    logits = torch.randn(128, 8)
    l_aux, combine_TEC, _, _ = ds_moe.top2gating(logits.clone(), 1.0, 4, drop_tokens=False,
                                                 top2_2nd_expert_sampling=False)
    out = router(E=8, k=2, dropless=True).route(logits)
    assert bool((out.expert_ids_TK >= 0).all())
    assert torch.allclose(dense(out, 8), combine_TEC.sum(2), atol=1e-6)
    assert torch.allclose(out.losses["load_balance"], l_aux)


@pytest.mark.parametrize("drop_tokens,cf", [(False, 1.0), (True, 4.0)])
def test_matches_deepspeed_topkgating_k3_without_drops(drop_tokens, cf):
    """k = 3 when nothing is dropped (where topkgating's capacity order cannot differ): same kept
    pairs, weights and l_aux."""
    logits = torch.randn(120, 6)
    l_aux, combine_TEC, _, _ = ds_moe.topkgating(logits.clone(), 3, cf, 4, drop_tokens=drop_tokens)
    out = router(E=6, k=3, capacity_factor=cf, dropless=not drop_tokens).route(logits)
    assert bool((out.expert_ids_TK >= 0).all())
    assert torch.allclose(dense(out, 6), combine_TEC.sum(2), atol=1e-6)
    assert torch.allclose(out.losses["load_balance"], l_aux)


def test_topkgating_k3_with_drops_same_capacity_and_counts():
    """With binding capacity topkgating ranks all slots of an expert by token position; GShard keeps
    first choices first. Capacity and per-expert kept counts agree; the kept sets differ."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(240, 6, generator=g) + torch.tensor([2.0, 1.0, 0, 0, 0, 0])
    _, combine_TEC, _, _ = ds_moe.topkgating(logits.clone(), 3, 0.5, 4, drop_policy="position")
    r = router(E=6, k=3, capacity_factor=0.5, drop_policy="position")
    out = r.route(logits)
    assert combine_TEC.shape[2] == r.spec.capacity(240, True)
    kept = out.expert_ids_TK[out.expert_ids_TK >= 0]
    assert torch.equal(torch.bincount(kept, minlength=6), (combine_TEC.sum(2) > 0).sum(0))
    ds_first_dropped = ~(combine_TEC.sum(2) > 0).gather(1, logits.argmax(-1, keepdim=True))[:, 0]
    ours_first_dropped = out.expert_ids_TK[:, 0] < 0
    assert int(ours_first_dropped.sum()) < int(ds_first_dropped.sum())
