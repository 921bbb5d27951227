"""The MoE feed-forward block: router -> dispatch -> experts -> combine (+ residual MLP).

``Dispatcher`` is the seam a parallel strategy replaces: the local one permutes rows by expert and
back; an expert-parallel one (``rapid.builtin.parallel.expert``) also sends them to the ranks that
hold those experts. ``Experts`` holds only this rank's experts (global id = local id + ``first``),
each initialised from its own generator seeded by its global id, so a shard holds exactly the values
a single process would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rapid.kernels import Kernels
from rapid.types import MoESpec, Router, Routing


def apply_capacity(expert_ids_TK: Tensor, priority_TK: Tensor, num_experts: int,
                   capacity: int | Tensor | None) -> Tensor:
    """Keep at most ``capacity`` assignments per expert (an int, or a long tensor [E] of each
    expert's own), those with the highest priority; the others become -1 (entries that are already
    -1 stay -1 and take no slot). Two stable sorts, linear memory: no [T, E, C] tensors."""
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
    if isinstance(capacity, Tensor):                                      # slot E: the dropped ones
        capacity = torch.cat([capacity.to(key.device), capacity.new_zeros(1)])[key[order]]
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
    """Experts ``first .. first + count - 1`` of ``num_experts`` FFNs, stacked on dim 0 (one grouped
    matmul per projection). Every parameter of an ``Experts`` module is an expert parameter."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, kernels: Kernels, activation: str = "gelu",
                 first: int = 0, count: int | None = None):
        super().__init__()
        self.num_experts, self.first = num_experts, first
        self.count = num_experts - first if count is None else count
        self.kernels, self.activation = kernels, activation
        self.w1_EDF = nn.Parameter(torch.empty(self.count, hidden, ffn))
        self.w2_EFD = nn.Parameter(torch.empty(self.count, ffn, hidden))

    def shard(self, first: int, count: int) -> None:
        """Keep only experts ``first .. first + count - 1`` (cheap on the meta device)."""
        for name in ("w1_EDF", "w2_EFD"):
            w = getattr(self, name).detach()
            setattr(self, name, nn.Parameter(w[first - self.first:][:count].clone()))
        self.first, self.count = first, count

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Expert g draws from a generator seeded by (one draw of the global RNG, g): the same values
        whichever rank holds it. Rows of a dim-0 sharded (FSDP) parameter are handled too."""
        base = int(torch.randint(0, 2**62, (1,), device="cpu"))
        if self.w1_EDF.device.type == "meta":
            return
        for w, s in ((self.w1_EDF, std), (self.w2_EFD, out_std)):
            local, offset = _local_rows(w)
            for i in range(local.shape[0]):
                gen = torch.Generator(local.device).manual_seed(base + self.first + offset + i)
                local[i].normal_(0.0, s, generator=gen)

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """Rows grouped by local expert (``counts_E`` rows each) -> each expert's FFN of its rows."""
        return self.kernels.grouped_mlp(x_ND, counts_E, self.w1_EDF, self.w2_EFD, self.activation)


def _local_rows(w: Tensor) -> tuple[Tensor, int]:
    """The locally held rows of ``w`` and the index of the first one (DTensor sharded on dim 0)."""
    if hasattr(w, "to_local"):
        from torch.distributed.tensor import Shard
        mesh, local = w.device_mesh, w.to_local()
        chunk = -(-w.shape[0] // mesh.size())                # torch.chunk's split of dim 0
        assert [p for p in w.placements] == [Shard(0)], w.placements
        return local, chunk * mesh.get_local_rank()
    return w, 0


def expert_modules(model: nn.Module):
    """(qualified name, module) of every ``Experts`` module."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Experts)]


def count_params(model: nn.Module, top_k: int) -> dict[str, int]:
    """params_total / _dense / _expert / _active (per token, with ``top_k`` experts)."""
    experts = [p for _, m in expert_modules(model) for p in m.parameters()]
    total = sum(p.numel() for p in model.parameters())   # parameters() yields tied weights once
    expert = sum(p.numel() for p in experts)
    active = total - expert + sum(p.numel() // p.shape[0] * top_k for p in experts)
    return {"params_total": total, "params_dense": total - expert, "params_expert": expert, "params_active": active}


def is_expert_param(name: str, expert_names: list[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in expert_names)


def routing_stats(routing: Routing, num_experts: int) -> dict[str, Tensor]:
    """What every router's routing is measured by (0-dim tensors: no host sync): the busiest
    expert's load over the mean load, the fraction of assignments dropped, and the router's entropy
    (nats) where it has logits."""
    ids = routing.expert_ids_TK.reshape(-1)
    kept = (ids >= 0).float()
    load_E = torch.bincount(ids.clamp_min(0), weights=kept, minlength=num_experts)
    stats = {"load_max_mean": load_E.max() / load_E.mean().clamp_min(1e-9), "dropped_frac": 1.0 - kept.mean()}
    if routing.logits_TE is not None:
        logp = torch.log_softmax(routing.logits_TE.detach().float(), dim=-1)
        stats["router_entropy"] = -(logp.exp() * logp).sum(-1).mean()
    return stats


class Dispatcher:
    """Local dispatch: rows grouped by expert and scattered back. ``dispatch`` returns the rows for
    this rank's experts, grouped by local expert, their per-expert counts (a tensor) and a context
    for ``combine``."""

    def __init__(self, kernels: Kernels):
        self.kernels = kernels

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, experts: Experts, order=None):
        x_ND, perm = self.kernels.permute(x_TD, expert_ids_TK, experts.num_experts, order)
        return x_ND, perm.counts_E, perm

    def combine(self, y_ND: Tensor, perm, weights_TK: Tensor) -> Tensor:
        return self.kernels.unpermute(y_ND, perm, weights_TK)


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
        self.spec, self.router = spec, router
        router.kernels = kernels
        self.dispatcher = Dispatcher(kernels)
        self.experts = Experts(spec.num_experts, spec.hidden, ffn, kernels, activation)
        # Residual MoE (DeepSpeed PR-MoE): a dense MLP beside the experts, mixed by a learned gate.
        self.residual_mlp = MLP(spec.hidden, ffn, activation) if residual else None
        self.residual_coef = nn.Linear(spec.hidden, 2) if residual else None

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    def forward(self, x_TD: Tensor, token_ids_T: Tensor, domain_ids_T: Tensor,
                prev_token_ids_T: Tensor | None = None) -> tuple[Tensor, Routing]:
        extra = {"prev_token_ids_T": prev_token_ids_T} if self.router.needs_previous_tokens else {}
        routing = self.router(x_TD, token_ids_T=token_ids_T, domain_ids_T=domain_ids_T, **extra)
        routing.stats = {**routing_stats(routing, self.spec.num_experts), **routing.stats}
        x_ND, counts_E, ctx = self.dispatcher.dispatch(x_TD, routing.expert_ids_TK, self.experts, routing.order)
        y_ND = self.experts(x_ND, counts_E)
        out_TD = self.dispatcher.combine(y_ND, ctx, routing.weights_TK).to(x_TD.dtype)
        if self.residual_mlp is not None:
            coef_T2 = torch.softmax(self.residual_coef(x_TD).float(), dim=-1).to(out_TD.dtype)
            out_TD = out_TD * coef_T2[:, :1] + self.residual_mlp(x_TD).to(out_TD.dtype) * coef_T2[:, 1:]
        return out_TD, routing
