"""Uniform routing, for system measurements (``rapid sweep``): every expert gets the same number of
tokens whatever the model has learnt, so a throughput difference between two layouts is the layouts',
not the routing's. Not a routing method to train with.

The gate is computed as by ``top1`` (the same FLOPs, and its gradient keeps it in the graph), but
the T * k assignment slots are dealt round-robin (token t's j-th expert is ``(t * k + j) mod E``, k =
``top_k``: k different experts): loads differ by at most one assignment, and no token is dropped while ``capacity_factor`` >= 1. Combine weight: the gate's
probability of that expert. No auxiliary loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rapid import hookimpl
from rapid.builtin.routers.top1 import gate_logits
from rapid.moe import apply_capacity, drop_priority
from rapid.types import MoESpec, Router, Routing


class UniformRouter(Router):
    @dataclass
    class Config:
        pass

    def __init__(self, config: Config, spec: MoESpec):
        super().__init__(config, spec)
        self.gate = nn.Linear(spec.hidden, spec.num_experts, bias=False)

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor, domain_ids_T: Tensor) -> Routing:
        logits_TE = gate_logits(self.gate, x_TD)
        T, E = logits_TE.shape
        probs_TE = torch.softmax(logits_TE, dim=-1)
        K = self.spec.top_k
        expert_TK = torch.arange(T * K, device=x_TD.device).view(T, K) % E
        weights_TK = probs_TE.gather(1, expert_TK)
        capacity = self.spec.capacity(T, self.training)
        expert_ids_TK = apply_capacity(expert_TK, drop_priority(self.spec.drop_policy, weights_TK), E, capacity)
        return Routing(expert_ids_TK=expert_ids_TK, weights_TK=weights_TK * (expert_ids_TK >= 0), logits_TE=logits_TE)


@hookimpl
def rapid_register_routers():
    return {"uniform": UniformRouter}
