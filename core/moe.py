"""The MoE feed-forward block: router -> permute -> experts -> unpermute/combine (+ residual MLP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rapid.kernels import Kernels
from rapid.types import MoESpec, Router, Routing


def apply_capacity(expert_ids_TK: Tensor, priority_TK: Tensor, num_experts: int,
                   capacity: int | None) -> Tensor:
    """Keep at most ``capacity`` assignments per expert, those with the highest priority; the
    others become -1 (entries that are already -1 stay -1 and take no slot). Two stable sorts,
    linear memory: no [T, E, C] tensors."""
    if capacity is None:
        return expert_ids_TK
    flat = expert_ids_TK.reshape(-1)
    key = torch.where(flat >= 0, flat, num_experts)                       # dropped entries sort last
    by_priority = torch.argsort(priority_TK.reshape(-1), descending=True, stable=True)
    order = by_priority[torch.argsort(key[by_priority], stable=True)]    # grouped by expert, best first
    counts = torch.bincount(key, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[key[order]]
    keep = torch.empty_like(flat, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity
    return torch.where(keep & (flat >= 0), flat, -1).view_as(expert_ids_TK)


def drop_priority(policy: str, probs_TK: Tensor) -> Tensor:
    """Which assignments survive a full expert: ``random`` (Switch/DeepSpeed random token selection),
    ``position`` (earlier tokens first) or ``probs`` (higher router probability first)."""
    if policy == "random":
        return torch.rand(probs_TK.shape, device=probs_TK.device)
    if policy == "position":
        T, K = probs_TK.shape
        return -torch.arange(T * K, device=probs_TK.device, dtype=torch.float32).view(T, K)
    if policy == "probs":
        return probs_TK.detach().float()
    raise ValueError(f"unknown drop policy {policy!r}")



class Experts(nn.Module):
    """E independent FFNs stored as stacked weights (one grouped matmul per projection)."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, activation: str = "gelu"):
        super().__init__()
        self.activation = activation
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        for p in (self.w1_EDF, self.w2_EFD):
            p.rapid_expert = True

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1_EDF, std=std)
        nn.init.normal_(self.w2_EFD, std=out_std)


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, activation: str = "gelu"):
        super().__init__()
        self.fc = nn.Linear(hidden, ffn, bias=False)
        self.proj = nn.Linear(ffn, hidden, bias=False)
        self.approximate = "tanh" if activation == "gelu_tanh" else "none"
        self.relu = activation == "relu"

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return self.proj(torch.relu(h) if self.relu else F.gelu(h, approximate=self.approximate))


class MoE(nn.Module):
    def __init__(self, spec: MoESpec, router: Router, ffn: int, kernels: Kernels,
                 residual: bool = False, activation: str = "gelu"):
        super().__init__()
        self.spec, self.router, self.kernels = spec, router, kernels
        self.experts = Experts(spec.num_experts, spec.hidden, ffn, activation)
        # Residual MoE (DeepSpeed PR-MoE): a dense MLP beside the experts, mixed by a learned gate.
        self.residual_mlp = MLP(spec.hidden, ffn, activation) if residual else None
        self.residual_coef = nn.Linear(spec.hidden, 2) if residual else None

    def forward(self, x_TD: Tensor, token_ids_T: Tensor, domain_ids_T: Tensor) -> tuple[Tensor, Routing]:
        routing = self.router(x_TD, token_ids_T=token_ids_T, domain_ids_T=domain_ids_T)
        x_ND, perm = self.kernels.permute(x_TD, routing.expert_ids_TK, self.spec.num_experts)
        y_ND = self.kernels.grouped_mlp(x_ND, perm.counts_E, self.experts.w1_EDF, self.experts.w2_EFD,
                                        self.experts.activation)
        out_TD = self.kernels.unpermute(y_ND, perm, routing.weights_TK).to(x_TD.dtype)
        if self.residual_mlp is not None:
            coef_T2 = torch.softmax(self.residual_coef(x_TD).float(), dim=-1).to(out_TD.dtype)
            out_TD = out_TD * coef_T2[:, :1] + self.residual_mlp(x_TD).to(out_TD.dtype) * coef_T2[:, 1:]
        return out_TD, routing

