"""top1 (Switch) semantics, and conformance with deepspeed.moe.sharded_moe.top1gating."""

import math

import pytest
import torch

from rapid.builtin.routers.top1 import Top1Router
from rapid.moe import apply_capacity
from rapid.types import MoESpec


def router(E=8, **kw):
    spec = MoESpec(hidden=32, num_experts=E, **kw)
    return Top1Router(Top1Router.Config(), spec)


def test_capacity_formula():
    spec = MoESpec(hidden=8, num_experts=8, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4)
    assert spec.capacity(4096, training=True) == math.ceil(4096 / 8 * 1.25) == 640
    assert spec.capacity(4096, training=False) == 1024
    assert spec.capacity(10, training=True) == 4           # floored at min_capacity
    assert MoESpec(hidden=8, num_experts=8, dropless=True).capacity(10, True) is None


def naive_capacity(ids, priority, E, cap):
    out = ids.clone()
    for e in range(E):
        rows = [t for t in range(len(ids)) if ids[t] == e]
        rows.sort(key=lambda t: -float(priority[t]))
        for t in rows[cap:]:
            out[t] = -1
    return out


@pytest.mark.parametrize("cap", [1, 5, 17, 1000])
def test_apply_capacity_matches_naive(cap):
    g = torch.Generator().manual_seed(cap)
    ids = torch.randint(0, 6, (200, 1), generator=g)
    pri = torch.rand(200, 1, generator=g)
    got = apply_capacity(ids, pri, 6, cap)
    assert torch.equal(got[:, 0], naive_capacity(ids[:, 0], pri[:, 0], 6, cap))


def test_position_policy_keeps_earliest_tokens():
    r = router(E=2, capacity_factor=0.5, min_capacity=1, drop_policy="position")
    logits = torch.tensor([[5.0, 0.0]] * 8)  # all want expert 0, capacity = ceil(8/2*0.5) = 2
    ids = r.route(logits).expert_ids_TK[:, 0]
    assert ids.tolist() == [0, 0, -1, -1, -1, -1, -1, -1]


def test_losses():
    r = router(E=4)
    logits = torch.randn(100, 4)
    out = r.route(logits)
    probs = torch.softmax(logits, -1)
    f = torch.bincount(probs.argmax(-1), minlength=4).float() / 100
    assert torch.allclose(out.losses["load_balance"], 4 * (f * probs.mean(0)).sum())
    assert torch.allclose(out.losses["z_loss"], torch.logsumexp(logits, -1).pow(2).mean())


def test_jitter_only_in_training():
    spec = MoESpec(hidden=32, num_experts=4)
    r = Top1Router(Top1Router.Config(jitter=0.5), spec)
    x = torch.randn(50, 32)
    kw = dict(token_ids_T=torch.zeros(50, dtype=torch.long), domain_ids_T=torch.zeros(50, dtype=torch.long))
    r.eval()
    assert torch.equal(r(x, **kw).logits_TE, r(x, **kw).logits_TE)
    r.train()
    assert not torch.equal(r(x, **kw).logits_TE, r(x, **kw).logits_TE)


# ------------------------------------------------------------------ DeepSpeed conformance
ds_moe = pytest.importorskip("deepspeed.moe.sharded_moe", reason="deepspeed not installed")


@pytest.mark.parametrize("T,E,cf,min_cap", [(256, 8, 1.0, 4), (512, 4, 1.25, 4), (64, 8, 0.5, 16), (300, 16, 2.0, 1)])
def test_matches_deepspeed_top1gating_rts(T, E, cf, min_cap, monkeypatch):
    """Same logits and the same random-token-selection draws: same capacity, experts, kept tokens,
    load-balance loss and number dropped."""
    g = torch.Generator().manual_seed(T + E)
    logits = torch.randn(T, E, generator=g) * 2
    uniform_TE = torch.rand(T, E, generator=g)
    monkeypatch.setitem(ds_moe.exp_selection_uniform_map, logits.device, lambda shape: uniform_TE)
    l_aux, combine_TEC, dispatch_TEC, exp_counts = ds_moe.top1gating(
        logits, capacity_factor=cf, min_capacity=min_cap, use_rts=True, drop_tokens=True)

    r = router(E=E, capacity_factor=cf, min_capacity=min_cap, drop_policy="random")
    top1 = logits.argmax(-1)
    priority = uniform_TE.gather(1, top1[:, None])  # the draw DeepSpeed ranks each token by
    monkeypatch.setattr("rapid.builtin.kernels.reference.drop_priority", lambda policy, probs: priority)
    out = r.route(logits)

    assert combine_TEC.shape[2] == r.spec.capacity(T, training=True)
    ds_kept = dispatch_TEC.any(dim=2)                                  # [T, E]
    ours_kept = torch.zeros(T, E, dtype=torch.bool)
    kept = out.expert_ids_TK[:, 0] >= 0
    ours_kept[kept.nonzero()[:, 0], out.expert_ids_TK[kept, 0]] = True
    assert torch.equal(ours_kept, ds_kept)
    assert torch.allclose(out.losses["load_balance"], l_aux)
    assert torch.equal(torch.bincount(top1, minlength=E), exp_counts)
    assert T - int(kept.sum()) == T - int(ds_kept.sum())
    ds_weights = combine_TEC.sum(dim=(1, 2))
    assert torch.allclose(out.weights_TK[:, 0], ds_weights)


def test_matches_deepspeed_dropless():
    logits = torch.randn(128, 8)
    l_aux, combine_TEC, dispatch_TEC, _ = ds_moe.top1gating(logits, 1.0, 4, drop_tokens=False, use_rts=False)
    out = router(E=8, dropless=True).route(logits)
    assert bool(dispatch_TEC.any(dim=(1, 2)).all()) and bool((out.expert_ids_TK >= 0).all())
    assert torch.allclose(out.losses["load_balance"], l_aux)


def test_position_policy_drop_counts_match_deepspeed():
    """Without random selection DeepSpeed breaks ties inside torch.topk; the number dropped per
    expert is what both must agree on."""
    logits = torch.randn(400, 4) + torch.tensor([2.0, 0, 0, 0])
    _, _, dispatch_TEC, _ = ds_moe.top1gating(logits, 1.0, 4, use_rts=False)
    out = router(E=4, capacity_factor=1.0, drop_policy="position").route(logits)
    ours = torch.bincount(out.expert_ids_TK[out.expert_ids_TK >= 0], minlength=4)
    assert torch.equal(ours, dispatch_TEC.any(dim=2).sum(0))


def test_apply_capacity_ignores_dropped_entries():
    """-1 entries take no slot: they were once counted against expert 0."""
    ids = torch.tensor([[-1], [-1], [0], [0], [1]])
    assert apply_capacity(ids, torch.zeros(5, 1), 2, 2)[:, 0].tolist() == [-1, -1, 0, 0, 1]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 4, (300, 1), generator=g)
    pri = torch.rand(300, 1, generator=g)
    assert torch.equal(apply_capacity(ids, pri, 4, 7)[:, 0], naive_capacity(ids[:, 0], pri[:, 0], 4, 7))
