"""BASE layers routing (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse
Models"; also CPM-2's MoE): a balanced linear assignment of tokens to experts in training, greedy
top-1 at evaluation.

Each expert e has a learned centroid c_e (``centroids_ED``, initialised orthogonal with gain 0.1 as in
fairseq's ``BaseLayer``). The token-expert affinity is a_te = h_t . c_e (fp32).

- Training: tokens are assigned so that every expert gets the same number of tokens and the total
  affinity sum_t a_{t, e(t)} is maximal (a linear assignment problem, each expert replicated T/E
  times). Solved by ``balanced_assignment``, an auction algorithm (below). When E does not divide T,
  every expert takes at most ceil(T/E) tokens and ``E * ceil(T/E) - T`` experts get one fewer
  (which ones is part of the optimisation: the problem is padded with dummy tokens of equal
  affinity to every expert).
- Evaluation: each token goes to its argmax-affinity expert (no balance, no capacity), as in the paper.
- Output: the expert's output is mixed by sigmoid(a_{t, e(t)}): the combine weight is that sigmoid,
  and the residual around the FFN is the transformer block's own, so the block computes
  h + sigmoid(h . c_e) f_e(LN(h)) as fairseq's ``BaseLayer`` does (alpha * (h + f(h)) + (1 - alpha) * h).
  The centroids learn only through this gate (the assignment is not differentiable).
- No auxiliary loss: balance is enforced, not encouraged. ``Routing.losses`` is empty, so the
  recipe's ``load_balance`` / ``z_loss`` terms add 0.

``honors_capacity = False``: BASE has its own rule (exactly balanced in training whatever
``capacity_factor`` says, unbounded greedy at evaluation), and it never drops a token, so
``capacity_factor``, ``eval_capacity_factor``, ``min_capacity``, ``drop_policy`` and ``dropless`` have
no effect. ``[model] top_k`` must be 1.

Faithfulness: the assignment, the greedy evaluation, the sigmoid gate and the centroid init follow the
paper and fairseq. Differences: the assignment is solved over the tokens this process routes (fairseq
all-gathers the tokens of every data-parallel worker and solves one global problem, after a random
shuffle of tokens across workers, which a single process does not need); each rank's tokens are
balanced exactly, so the global load is balanced too. The affinity uses the block's normalised hidden
state (the router's input), fairseq the un-normalised one. fairseq's auction is approximate (a
fixed eps of range/50, then a greedy finish after 100 rounds); this one is eps-optimal (see below)
within a budget of ``max_rounds`` rounds per layer and step (default 500): when the budget runs out
it returns the last eps phase that completed (eps-optimal for that coarser eps) and logs
``auction_rounds`` and ``auction_eps`` (eps of the returned assignment over the affinity range). Non-
finite affinities (a diverged model) fall back to the argmax: the loss is not finite either, and the
training loop skips or stops as for any router.

The solver. scipy's Hungarian ``linear_sum_assignment`` is not a dependency of rapid and would need
the T x T expanded matrix and O(T^3) time on the host; a Sinkhorn relaxation would need a
temperature and a rounding step with no optimality bound. So: a vectorised auction (Bertsekas 1979,
with eps-scaling; experts bid for tokens, one round = one top-k over the [E, T] net values, like
fairseq's). Each round every expert short of its quota d bids for its d best tokens it does not hold,
raising each one's price to a - w + eps, where w is its (d+1)-th best net value a - price; each token
goes to its highest bidder. At the end every expert's held tokens are worth at least (best token it
does not hold) - eps, which bounds the total affinity: >= optimum - T * eps. eps ends at ``tolerance``
times the affinity range, so the mean affinity is within ``tolerance * range`` of the optimum. The
loop syncs with the host once per round (the stopping test), as fairseq's does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor, nn

from rapid import hookimpl
from rapid.errors import UserError
from rapid.types import MoESpec, Router, Routing


@torch.no_grad()
def balanced_assignment(scores_TE: Tensor, tolerance: float = 1e-3, scaling: float = 8.0,
                        max_rounds: int = 10_000, info: dict | None = None) -> Tensor:
    """The expert of each token (long [T]) maximising sum_t scores[t, e(t)] with at most ceil(T/E)
    tokens per expert (exactly T/E when E divides T): within ``T * eps`` of the optimum. eps-scaling
    auction (see the module docstring): eps starts at range/4 and is divided by ``scaling`` per phase,
    prices carry over between phases, until eps = ``tolerance * range``. After ``max_rounds`` rounds
    in all, the last phase that completed is returned (its eps is coarser); if none did, a greedy
    finish. ``info`` (a dict) receives ``rounds`` and ``eps`` (of the returned assignment, over the
    range of the scores)."""
    T, E = scores_TE.shape
    if E == 1 or T == 0:
        return scores_TE.new_zeros(T, dtype=torch.long)
    C = math.ceil(T / E)
    a_EN = scores_TE.detach().float().t()
    lo, hi = a_EN.min(), a_EN.max()
    if E * C > T:   # dummy tokens worth the same to every expert: the experts that take one hold one fewer
        a_EN = torch.cat([a_EN, lo.expand(E, E * C - T)], 1)
    N = E * C
    span = float(hi - lo)
    if not math.isfinite(span):
        raise ValueError("balanced_assignment: scores are not finite")
    if span == 0:                                      # all equal: every balanced assignment is optimal
        if info is not None:
            info.update(rounds=0, eps=0.0)
        return torch.arange(T, device=scores_TE.device) % E
    final = span * max(tolerance, 1e-6)                # fp32 prices: finer steps would not register
    eps = max(span / 4, final)
    price_N = a_EN.new_zeros(N)
    experts_E1 = torch.arange(E, device=a_EN.device)[:, None]
    rounds, best, best_eps = 0, None, math.inf
    while True:
        owner_N = torch.full((N,), -1, dtype=torch.long, device=a_EN.device)
        deficit_E = torch.full((E,), C, dtype=torch.long, device=a_EN.device)
        while (k := int(deficit_E.max())) > 0 and rounds < max_rounds:
            net_EN = (a_EN - price_N).masked_fill_(owner_N == experts_E1, -math.inf)
            vals_EK, idx_EK = net_EN.topk(k + 1, dim=1)
            w_E1 = vals_EK.gather(1, deficit_E[:, None])               # (d+1)-th best net value
            bidding = torch.arange(k + 1, device=a_EN.device) < deficit_E[:, None]
            offer_EK = (a_EN.gather(1, idx_EK) - w_E1 + eps).masked_fill_(~bidding, -math.inf)
            best_N, winner_N = torch.full_like(net_EN, -math.inf).scatter_(1, idx_EK, offer_EK).max(0)
            won = best_N > -math.inf
            price_N = torch.where(won, best_N, price_N)
            owner_N = torch.where(won, winner_N, owner_N)
            deficit_E = C - torch.bincount(owner_N.clamp_min(0), weights=(owner_N >= 0).float(), minlength=E).long()
            rounds += 1
        if k == 0:                                    # this phase completed: eps-optimal for its eps
            best, best_eps = owner_N, eps
        if rounds >= max_rounds or eps <= final:
            break
        eps = max(eps / scaling, final)
    if best is None:
        best = _greedy_finish(a_EN, owner_N, C)
    if info is not None:
        info.update(rounds=rounds, eps=best_eps / span)
    return best[:T]


def _greedy_finish(a_EN: Tensor, owner_N: Tensor, C: int) -> Tensor:
    """Assign the tokens still unassigned: each to its best expert with room, an expert over-asked
    keeping its best bidders (at most E + 1 passes: each fills an expert or places every token)."""
    from rapid.moe import apply_capacity
    E = a_EN.shape[0]
    while bool((owner_N < 0).any()):
        deficit_E = C - torch.bincount(owner_N.clamp_min(0), weights=(owner_N >= 0).float(), minlength=E).long()
        choice_N = a_EN.masked_fill(deficit_E[:, None] <= 0, -math.inf).argmax(0)
        ids_N1 = torch.where(owner_N < 0, choice_N, -1)[:, None]
        kept_N = apply_capacity(ids_N1, a_EN.gather(0, choice_N[None]).t(), E, deficit_E)[:, 0]
        owner_N = torch.where(kept_N >= 0, kept_N, owner_N)
    return owner_N


class BaseRouter(Router):
    honors_capacity = False

    @dataclass
    class Config:
        tolerance: Annotated[float, Field(gt=0, le=0.1)] = 1e-3   # auction: mean affinity within this x range of optimal
        max_rounds: Annotated[int, Field(gt=0)] = 500             # auction rounds per layer and step (then the last complete phase)

    def __init__(self, config: Config, spec: MoESpec):
        super().__init__(config, spec)
        if spec.top_k != 1:
            raise UserError(f"router 'base' routes each token to one expert; [model] top_k={spec.top_k}",
                            hint="set [model] top_k = 1")
        self.centroids_ED = nn.Parameter(torch.empty(spec.num_experts, spec.hidden))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.centroids_ED.device.type != "meta":
            nn.init.orthogonal_(self.centroids_ED, gain=0.1)     # fairseq BaseLayer

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor, domain_ids_T: Tensor) -> Routing:
        with torch.autocast(x_TD.device.type, enabled=False):
            affinity_TE = x_TD.float() @ self.centroids_ED.float().t()
        return self.route(affinity_TE)

    def route(self, affinity_TE: Tensor) -> Routing:
        """Routing from fp32 affinities (separate from ``forward`` so it can be checked in isolation)."""
        info, stats = {}, {}
        if not bool(torch.isfinite(affinity_TE).all()):    # a diverged model: the loss is not finite either,
            expert_T = torch.nan_to_num(affinity_TE.detach()).argmax(dim=-1)   # and the loop skips or stops
        elif self.training:
            expert_T = balanced_assignment(affinity_TE, self.config.tolerance, max_rounds=self.config.max_rounds,
                                           info=info)
            stats = {"auction_rounds": float(info.get("rounds", 0)), "auction_eps": float(info.get("eps", 0.0))}
        else:
            expert_T = affinity_TE.detach().argmax(dim=-1)
        expert_ids_T1 = expert_T[:, None]
        return Routing(expert_ids_TK=expert_ids_T1,
                       weights_TK=torch.sigmoid(affinity_TE.gather(1, expert_ids_T1)),
                       logits_TE=affinity_TE, stats=stats)


@hookimpl
def rapid_register_routers():
    return {"base": BaseRouter}
