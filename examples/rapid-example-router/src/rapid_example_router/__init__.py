"""A complete third-party rapid plugin: the ``modulo`` router sends token id t to expert t % E
(with an optional offset), a fixed hash routing that needs no gate. Installed through the ``rapid``
entry-point group, it shows up in ``rapid plugins`` and can be selected with
``[router] name = "modulo"``."""

from dataclasses import dataclass

import torch

import rapid
from rapid.moe import apply_capacity, drop_priority
from rapid.types import Router, Routing


class ModuloRouter(Router):
    @dataclass
    class Config:
        offset: int = 0

    def forward(self, x_TD, *, token_ids_T, domain_ids_T):
        E, K = self.spec.num_experts, self.spec.top_k
        # slot k of token t goes to expert (t + offset + k) % E: K distinct experts per token
        expert_ids_TK = (token_ids_T[:, None] + self.config.offset + torch.arange(K, device=x_TD.device)) % E
        weights_TK = torch.full(expert_ids_TK.shape, 1.0 / K, device=x_TD.device)
        capacity = self.spec.capacity(x_TD.shape[0], self.training)
        expert_ids_TK = apply_capacity(expert_ids_TK, drop_priority(self.spec.drop_policy, weights_TK), E, capacity)
        return Routing(expert_ids_TK, weights_TK * (expert_ids_TK >= 0))


@rapid.hookimpl
def rapid_register_routers():
    return {"modulo": ModuloRouter}
