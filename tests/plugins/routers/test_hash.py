"""hash router (Roller et al. 2021): the tables of each variant against naive references, balance,
per-layer seeding, materialisation from meta, capacity, and rapid's router contract for every variant."""

from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

from rapid.builtin.contract import *  # noqa: F401,F403
from rapid.builtin.routers.hash import HashRouter, frequency_table
from rapid.errors import UserError
from rapid.types import MoESpec

ROUTERS = ["rapid.builtin.routers.hash:HashRouter", f"{__name__}:BigramHash", f"{__name__}:FrequencyHash"]
ZIPF = (1000.0 / torch.arange(1, 1001)).long()           # token counts of the contract's 1000-id vocabulary


class BigramHash(HashRouter):
    @dataclass
    class Config(HashRouter.Config):
        variant: Literal["random", "frequency", "bigram"] = "bigram"


class FrequencyHash(HashRouter):
    """variant = "frequency" with Zipf counts (as the training loop would hand them over)."""
    @dataclass
    class Config(HashRouter.Config):
        variant: Literal["random", "frequency", "bigram"] = "frequency"

    def token_counts(self):
        return ZIPF[: self.spec.vocab_size]


def make(variant="random", seed=0, **kw):
    spec = {"hidden": 8, "num_experts": 4, "vocab_size": 1000, "dropless": True, **kw}
    torch.manual_seed(seed)
    return HashRouter(HashRouter.Config(variant), MoESpec(**spec))


def route(r, tokens, prev=None):
    kw = {"prev_token_ids_T": prev} if r.needs_previous_tokens else {}
    return r(torch.zeros(len(tokens), 8), token_ids_T=tokens, domain_ids_T=torch.zeros_like(tokens), **kw)


def test_random_table_is_balanced_and_used():
    r = make(num_experts=7)
    assert set(torch.bincount(r.table_V, minlength=7).tolist()) == {142, 143}   # 1000 ids over 7: at most one apart
    tokens = torch.randint(0, 1000, (500,))
    out = route(r, tokens)
    assert torch.equal(out.expert_ids_TK[:, 0], r.table_V[tokens]) and bool((out.weights_TK == 1).all())
    assert out.logits_TE is None and out.losses == {} and "table_V" in r.state_dict()


def test_tables_differ_per_layer_and_seed_and_repeat_under_a_seed():
    a, b, c, d = make(layer=0), make(layer=1), make(layer=0, seed=1), make(layer=0)
    assert not torch.equal(a.table_V, b.table_V) and not torch.equal(a.table_V, c.table_V)
    assert torch.equal(a.table_V, d.table_V)


def test_materialised_from_meta():
    with torch.device("meta"):
        r = make("bigram")
    r.to_empty(device="cpu")
    torch.manual_seed(0)
    r.reset_parameters()
    assert torch.equal(r.word_V, make("bigram").word_V) and torch.equal(r.word_V1, make("bigram").word_V1)


def naive_frequency(counts, E, seed):
    """Most frequent first (equal counts in the order of a random permutation), to the expert with the
    least total count, then the fewest ids, then the lowest random rank; unseen ids to the expert with
    the fewest ids: O(V * E)."""
    g = torch.Generator().manual_seed(seed)
    perm, rank = torch.randperm(len(counts), generator=g).tolist(), torch.randperm(E, generator=g).tolist()
    pos = {t: i for i, t in enumerate(perm)}
    load, n, table = [0] * E, [0] * E, [0] * len(counts)
    for t in sorted(range(len(counts)), key=lambda t: (-counts[t], pos[t])):
        e = min(range(E), key=lambda e: (load[e] if counts[t] else 0, n[e], rank[e]))
        table[t], load[e], n[e] = e, load[e] + counts[t], n[e] + 1
    return table


@pytest.mark.parametrize("E", [2, 5, 8])
def test_frequency_table_matches_naive_greedy(E):
    counts = torch.cat([torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(E)), ZIPF[:100]])
    got = frequency_table(counts, E, torch.Generator().manual_seed(9))
    assert got.tolist() == naive_frequency(counts.tolist(), E, 9)
    load = torch.bincount(got, weights=counts.double(), minlength=E)
    assert float(load.max() - load.min()) <= float(counts.max())          # greedy's guarantee


def test_frequency_balances_tokens_of_the_data_and_deals_unseen_ids():
    counts = torch.cat([ZIPF[:600], torch.zeros(400, dtype=torch.long)])
    r = make("frequency", token_counts=counts.numpy())                   # any array-like the loop hands over
    load = torch.bincount(r.table_V, weights=counts.double(), minlength=4)
    assert float(load.max() / load.mean()) < 1.05 < float(torch.bincount(make().table_V, counts.double()).max()
                                                          / load.mean())   # far better than random hashing
    ids = torch.bincount(r.table_V, minlength=4)                        # the 400 unseen ids level the id counts
    assert int(ids.max() - ids.min()) <= 1 and int(torch.bincount(r.table_V[:600], minlength=4).max() -
                                                   torch.bincount(r.table_V[:600], minlength=4).min()) > 1


def test_frequency_without_statistics(builtin_registry):
    from rapid.builtin.plan import make_plan
    from rapid.recipe import resolve
    from tests.conftest import tiny_raw
    recipe = resolve(tiny_raw(router={"name": "rapid.builtin.routers.hash:HashRouter", "variant": "frequency"}),
                     "<t>", builtin_registry)
    assert make_plan(recipe, builtin_registry).params_expert > 0     # rapid plan needs no statistics
    with pytest.raises(UserError, match="'frequency' needs token counts"):
        make("frequency")
    with torch.device("meta"):                       # rapid plan builds on meta: fine without counts
        r = make("frequency")
    r.to_empty(device="cpu")
    with pytest.raises(UserError, match="'frequency' needs token counts"):
        r.reset_parameters()                         # materialising it is not
    with pytest.raises(UserError, match="1001 entries for a vocabulary of 1000"):
        make("frequency", token_counts=list(range(1001)))


def test_bigram_hashes_the_pair():
    r = make("bigram", num_experts=5)
    assert r.needs_previous_tokens and not make().needs_previous_tokens
    cur, prev = torch.randint(0, 1000, (400,)), torch.randint(-1, 1000, (400,))
    got = route(r, cur, prev).expert_ids_TK[:, 0].tolist()
    want = [((int(r.word_V[c]) ^ int(r.word_V1[p + 1])) * 0x5BD1E995 % (2**31 - 1)) % 5 for c, p in zip(cur, prev)]
    assert got == want
    by_prev = {}
    for p in (-1, 0, 17, 999):                      # each predecessor deals the vocabulary about evenly
        by_prev[p] = route(r, torch.arange(1000), torch.full((1000,), p)).expert_ids_TK[:, 0]
        loads = torch.bincount(by_prev[p], minlength=5)
        assert int(loads.min()) > 140 and int(loads.max()) < 260, loads                 # 200 +- 4.7 sigma
    # which tokens share an expert changes with the predecessor (not E clusters rotated)
    same_a = by_prev[0][:, None] == by_prev[0][None, :]
    same_b = by_prev[17][:, None] == by_prev[17][None, :]
    together = float((same_a & same_b).sum() - 1000) / float(same_a.sum() - 1000)
    assert 0.1 < together < 0.3                                                     # about 1/E, not 1
    assert len(set(route(r, torch.full((1000,), 3), torch.arange(1000)).expert_ids_TK[:, 0].tolist())) == 5
    with pytest.raises(UserError, match="needs each token's previous token"):
        r(torch.zeros(4, 8), token_ids_T=cur[:4], domain_ids_T=cur[:4])


def test_capacity_keeps_the_earliest_tokens_with_position_policy():
    r = make(dropless=False, capacity_factor=1.0, min_capacity=1, drop_policy="position").train()
    first = int(torch.nonzero(r.table_V == 0)[0])
    out = route(r, torch.full((8,), first))          # 8 tokens for expert 0: capacity ceil(8 / 4) = 2
    assert out.expert_ids_TK[:, 0].tolist() == [0, 0] + [-1] * 6
    assert out.weights_TK[:, 0].tolist() == [1, 1] + [0] * 6


def test_refuses_top_k_2_and_a_missing_vocabulary():
    with pytest.raises(UserError, match="top_k=2"):
        make(top_k=2)
    with pytest.raises(UserError, match="vocabulary size"):
        make(vocab_size=0)


def test_recipe_variant_and_layers_of_a_model(builtin_registry):
    from rapid.recipe import build_model, resolve
    from tests.conftest import tiny_raw
    raw = tiny_raw(router={"name": "rapid.builtin.routers.hash:HashRouter"})
    model = build_model(resolve(raw, "<t>", builtin_registry), builtin_registry)
    t0, t1 = (b.moe.router.table_V for b in model.blocks)
    assert not torch.equal(t0, t1) and int(t1.max()) == 3          # experts [2, 4]: layer 1 has 4
    raw["router"]["variant"] = "bigram"
    model = build_model(resolve(raw, "<t>", builtin_registry), builtin_registry)
    assert not torch.equal(*(b.moe.router.word_V for b in model.blocks))
    with pytest.raises(UserError, match="'variant' is 'hashed'; valid: random, frequency, bigram"):
        resolve(tiny_raw(router={"name": "rapid.builtin.routers.hash:HashRouter", "variant": "hashed"}), "<t>",
                builtin_registry)
