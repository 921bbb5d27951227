"""Switch Transformer top-1 routing (Fedus et al. 2021), semantics matched to DeepSpeed's top1gating.

fp32 softmax over the router logits; each token goes to its argmax expert; capacity
``ceil(T / E * capacity_factor)`` floored at ``min_capacity`` (or unbounded when dropless); the drop
policy picks which tokens an over-full expert keeps. Load-balance loss ``E * sum_i f_i * P_i`` is
computed before dropping; z-loss is ``mean(logsumexp(logits)^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rapid import hookimpl
from rapid.errors import UserError
from rapid.types import Fraction, MoESpec, Router, Routing


def load_balance_loss(probs_TE: Tensor, top1_T: Tensor) -> Tensor:
    """Switch load-balance loss E * sum_i f_i P_i with f from the top-1 choice before dropping."""
    E = probs_TE.shape[1]
    f_E = torch.bincount(top1_T, minlength=E).float() / top1_T.numel()
    return E * torch.sum(f_E * probs_TE.mean(dim=0))


def gate_logits(gate: nn.Linear, x_TD: Tensor) -> Tensor:
    """Router logits in fp32 whatever autocast is active (routing decisions need the precision)."""
    with torch.autocast(x_TD.device.type, enabled=False):
        return F.linear(x_TD.float(), gate.weight.float())


def z_loss(logits_TE: Tensor) -> Tensor:
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class Top1Router(Router):
    @dataclass
    class Config:
        jitter: Fraction = 0.0                   # multiplicative input jitter U(1-eps, 1+eps) in training
        gate_weights: Literal["prob", "one"] = "prob"  # combine weight = router probability, or 1

    def __init__(self, config: Config, spec: MoESpec):
        super().__init__(config, spec)
        if spec.top_k != 1:
            raise UserError(f"router 'top1' routes each token to one expert; [model] top_k={spec.top_k}",
                            hint="set [model] top_k = 1")
        self.gate = nn.Linear(spec.hidden, spec.num_experts, bias=False)

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor, domain_ids_T: Tensor) -> Routing:
        if self.training and self.config.jitter > 0:
            eps = self.config.jitter
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - eps, 1 + eps)
        return self.route(gate_logits(self.gate, x_TD))

    def route(self, logits_TE: Tensor) -> Routing:
        """Routing from fp32 logits (separate from ``forward`` so it can be checked in isolation)."""
        capacity = self.spec.capacity(logits_TE.shape[0], self.training)
        r = self.route_topk(logits_TE, 1, capacity)      # softmax, argmax, capacity and the expert order
        kept_T1 = r.expert_ids_TK >= 0
        weights_T1 = r.gates_TK if self.config.gate_weights == "prob" else torch.ones_like(r.gates_TK)
        weights_T1 = weights_T1 * kept_T1
        return Routing(
            expert_ids_TK=r.expert_ids_TK,
            weights_TK=weights_T1,
            logits_TE=logits_TE,
            losses={"load_balance": load_balance_loss(r.probs_TE, r.top_TK.squeeze(1)), "z_loss": z_loss(logits_TE)},
            stats={"capacity": float(capacity or 0)},
            order=r.order,
        )


@hookimpl
def rapid_register_routers():
    return {"top1": Top1Router}
