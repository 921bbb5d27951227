"""Large-margin routing: Switch top-1 routing plus a margin loss on the router's decision boundaries.

A RECONSTRUCTION. Alibaba PAI's GPT-MoE reports lower validation loss than top-1 with a
"large-margin" router but has not published its loss; this is the formulation of Elsayed et al.
2018, "Large Margin Deep Networks for Classification", applied to the linear router (the paper's
linear case, where the first-order distance is exact).

Logits z_i = w_i . h (the gate has no bias); y = argmax_i z_i is the chosen expert. For a competitor
j, the l_p distance from h to the boundary {z_y = z_j} is

    d_j = (z_y - z_j) / ||w_y - w_j||_q,   q the dual norm of p  (p = 2 -> q = 2;  p = inf -> q = 1)

(``norm = "l2"`` / ``"linf"``), or the raw logit margin d_j = z_y - z_j (``margin = "raw"``, ``norm``
unused). The competitors of a token are the ``competitors`` = m experts j != y whose boundaries are
``nearest`` (smallest d_j; with m = 1 this is the exact distance from h to the edge of y's routing
region, the paper's ``max`` aggregation over classes) or the ``runner_up`` experts by logit (the
same for the raw margin). The loss term ``large_margin`` is

    mean over tokens of  sum over the m competitors of  max(0, gamma - d_j)

(the paper's ``sum`` aggregation over the chosen classes), weighted by ``[loss] large_margin``
(0.01 unless the recipe sets it; 0 turns it off); its
gradient reaches the gate weights and, through h, the layers below (the paper's margin is also
enforced on hidden representations). Scale of ``gamma``: h is post-LayerNorm, so normalised l2
distances are O(1); l-inf distances are about sqrt(hidden) times smaller, raw margins are in logits.

Routing itself is the ``top1`` router's (Switch: fp32 softmax, argmax, capacity and drop policy,
combine weight = gate probability, ``load_balance`` and ``z_loss`` terms, ``jitter`` and
``gate_weights`` options), so the Switch load-balance loss combines with the margin loss. Statistics
per layer: ``margin_mean`` (mean d of each token's first competitor) and ``margin_within_frac`` (the
fraction of tokens with some competitor closer than gamma, i.e. a non-zero margin loss).

Caution: unlike the paper's classifier, y is the router's own choice, not a label, so the margin
loss alone is best satisfied by moving every boundary away from the data, i.e. sending all tokens to
one expert. On recipes/gpt_moe_tiny.toml (30 steps) ``large_margin = 0.01`` with ``load_balance =
0.01`` collapsed each layer onto one expert, while ``load_balance = 0.1`` kept loads balanced (busiest
expert 1.37x the mean): give the Switch load-balance loss enough weight and watch ``load_max_mean``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from rapid import hookimpl
from rapid.builtin.routers.top1 import Top1Router
from rapid.errors import UserError
from rapid.types import MoESpec, Positive, RouterLoss, Routing


def margin_distances(logits_TE: Tensor, weight_ED: Tensor, chosen_T: Tensor, norm: str = "l2",
                     margin: str = "normalised") -> Tensor:
    """[T, E] distance from each token to its boundary with every expert j (``inf`` at the chosen
    expert): (z_y - z_j) / ||w_y - w_j||_q, or z_y - z_j for the raw margin."""
    d_TE = logits_TE.gather(1, chosen_T[:, None]) - logits_TE
    if margin == "normalised":
        pair_EE = torch.cdist(weight_ED[None], weight_ED[None], p=2.0 if norm == "l2" else 1.0)[0]
        d_TE = d_TE / pair_EE[chosen_T].clamp_min(1e-12)
    return d_TE.scatter(1, chosen_T[:, None], torch.inf)


class LargeMarginRouter(Top1Router):
    default_losses = {"large_margin": 0.01}

    @dataclass
    class Config(Top1Router.Config):
        gamma: Annotated[float, Field(gt=0)] = 1.0      # the margin, in the units of ``margin``/``norm``
        norm: Literal["l2", "linf"] = "l2"               # p of the l_p distance (dual q = 2 / 1)
        margin: Literal["normalised", "raw"] = "normalised"  # distance to the boundary, or logit difference
        competitors: Positive = 1                        # m: competing experts per token
        competitor: Literal["nearest", "runner_up"] = "nearest"  # nearest boundaries, or highest logits

    def __init__(self, config: Config, spec: MoESpec):
        if spec.top_k != 1:
            raise UserError(f"router 'large_margin' routes each token to one expert; [model] top_k={spec.top_k}",
                            hint="set [model] top_k = 1")
        if config.competitors >= spec.num_experts:
            raise UserError(f"router 'large_margin': [router] competitors={config.competitors} needs at least "
                            f"{config.competitors + 1} experts; MoE layer {spec.layer} has {spec.num_experts}",
                            hint=f"set [router] competitors <= {spec.num_experts - 1}")
        super().__init__(config, spec)

    def route(self, logits_TE: Tensor) -> Routing:
        routing = super().route(logits_TE)
        c = self.config
        with torch.autocast(logits_TE.device.type, enabled=False):
            d_TE = margin_distances(logits_TE.float(), self.gate.weight.float(), logits_TE.argmax(-1), c.norm, c.margin)
            if c.competitor == "nearest":
                d_TM = d_TE.topk(c.competitors, dim=-1, largest=False).values
            else:
                others_TE = logits_TE.detach().scatter(1, logits_TE.argmax(-1, keepdim=True), -torch.inf)
                d_TM = d_TE.gather(1, others_TE.topk(c.competitors, dim=-1).indices)
            short_TM = torch.relu(c.gamma - d_TM)
        routing.losses["large_margin"] = short_TM.sum(-1).mean()
        routing.stats.update(margin_mean=d_TM[:, 0].detach().mean(),
                             margin_within_frac=(short_TM.detach() > 0).any(-1).float().mean())
        return routing


@hookimpl
def rapid_register_routers():
    return {"large_margin": LargeMarginRouter}


@hookimpl
def rapid_register_losses():
    return {"large_margin": RouterLoss("large_margin")}
