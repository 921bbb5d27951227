"""uniform (system measurements): loads within one token whatever the gate says, k distinct experts
per token, gate probabilities as weights; plus rapid's router contract on this router."""

import pytest
import torch

from rapid.builtin.contract import *  # noqa: F401,F403
from rapid.builtin.routers.uniform import UniformRouter
from rapid.types import MoESpec

ROUTERS = ["uniform"]


@pytest.mark.parametrize("T,E,k", [(64, 4, 1), (61, 8, 2), (10, 3, 3)])
def test_loads_are_even_whatever_the_gate_prefers(T, E, k):
    torch.manual_seed(0)
    r = UniformRouter(UniformRouter.Config(), MoESpec(hidden=8, num_experts=E, top_k=k, dropless=True))
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0] = 10.0                    # a gate that wants expert 0 for every token
    x = torch.ones(T, 8)
    out = r(x, token_ids_T=torch.zeros(T, dtype=torch.long), domain_ids_T=torch.zeros(T, dtype=torch.long))
    loads = torch.bincount(out.expert_ids_TK.reshape(-1), minlength=E)
    assert int(loads.max() - loads.min()) <= 1 and int(loads.sum()) == T * k
    assert all(len(set(row.tolist())) == k for row in out.expert_ids_TK)
    torch.testing.assert_close(out.weights_TK, torch.softmax(out.logits_TE, -1).gather(1, out.expert_ids_TK))
