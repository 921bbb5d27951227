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
from rapid.moe import apply_capacity, drop_priority
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
        T, E = logits_TE.shape
        probs_TE = torch.softmax(logits_TE, dim=-1)
        prob_T1, top1_T1 = probs_TE.max(dim=-1, keepdim=True)
        capacity = self.spec.capacity(T, self.training)
        expert_ids_T1 = apply_capacity(top1_T1, drop_priority(self.spec.drop_policy, prob_T1), E, capacity)
        kept_T1 = expert_ids_T1 >= 0
        weights_T1 = prob_T1 if self.config.gate_weights == "prob" else torch.ones_like(prob_T1)
        weights_T1 = weights_T1 * kept_T1
        return Routing(
            expert_ids_TK=expert_ids_T1,
            weights_TK=weights_T1,
            logits_TE=logits_TE,
            losses={"load_balance": load_balance_loss(probs_TE, top1_T1.squeeze(1)), "z_loss": z_loss(logits_TE)},
            stats={"capacity": float(capacity or 0)},
        )


@hookimpl
def rapid_register_routers():
    return {"top1": Top1Router}
