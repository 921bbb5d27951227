"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"): the
experts choose their tokens instead of the tokens choosing experts.

Scores S = softmax(x W_g) over the experts (fp32, the gate has no bias). Each expert takes the C
tokens of the routed batch with the highest score for it, C = ceil(T * top_k / E * capacity_factor)
floored at ``min_capacity`` and capped at T, so ``top_k * capacity_factor`` is the mean number of
experts per token (the paper's capacity factor c: ``[model] capacity_factor = 2`` with ``top_k = 1``
is its EC-CF2). Evaluation uses the same C rule (``eval_capacity_factor`` is not used): the capacity
factor sets the compute per token, and validation should measure the model as it trains. A token is taken by any number of experts,
from none to all; its output is the sum of the chosen experts' outputs weighted by its scores for
them. Perfect balance holds by construction (every expert processes exactly C tokens), so there is
no load-balance loss; the ``z_loss`` term (ST-MoE's router z-loss) is offered as for top-1.

Routing layout: one column per expert, ``expert_ids_TK[t, e] = e`` when expert e took token t, else -1
(K = E: ``slots_per_token``). Statistics per layer: ``dropped_frac`` is the fraction of tokens no
expert took (their FFN output is 0: only the residual carries them), ``experts_per_token`` the mean
number of experts a token got.

``honors_capacity = False`` (its own rule: exactly C per expert, never fewer, ignoring
``drop_policy``); ``dropless`` is refused (unbounded capacity means every expert takes every token).

Faithfulness: the gate, the top-C selection per expert and the score-weighted combine follow the
paper. Caveat from the paper itself: the choice looks at every token of the batch, future positions
included, so in a causal LM a token's routing depends on later tokens of the batch (the paper
evaluates on a batch too); generation token by token would route differently. The paper's optional
capped variant (at most k experts per token, solved as an entropy-regularised LP) is not built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rapid import hookimpl
from rapid.builtin.routers.top1 import gate_logits, z_loss
from rapid.errors import UserError
from rapid.types import MoESpec, Router, Routing


class ExpertChoiceRouter(Router):
    honors_capacity = False

    @dataclass
    class Config:
        pass

    def __init__(self, config: Config, spec: MoESpec):
        super().__init__(config, spec)
        if spec.dropless:
            raise UserError("router 'expert_choice' needs a capacity: with [model] dropless = true every expert "
                            "would take every token", hint="set [model] dropless = false and choose capacity_factor")
        self.gate = nn.Linear(spec.hidden, spec.num_experts, bias=False)

    @property
    def slots_per_token(self) -> int:
        return self.spec.num_experts

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor, domain_ids_T: Tensor) -> Routing:
        return self.route(gate_logits(self.gate, x_TD))

    def route(self, logits_TE: Tensor) -> Routing:
        """Routing from fp32 logits (separate from ``forward`` so it can be checked in isolation)."""
        T, E = logits_TE.shape
        probs_TE = torch.softmax(logits_TE, dim=-1)
        C = min(T, self.spec.capacity(T, training=True))       # the same rule in evaluation
        token_EC = probs_TE.detach().t().topk(C, dim=1).indices            # each expert's C best tokens
        taken_TE = torch.zeros(T, E, dtype=torch.bool, device=logits_TE.device)
        taken_TE.scatter_(0, token_EC.t(), True)
        experts_1E = torch.arange(E, device=logits_TE.device)[None, :]
        expert_ids_TE = torch.where(taken_TE, experts_1E, -1)
        per_token_T = taken_TE.sum(1)
        return Routing(
            expert_ids_TK=expert_ids_TE,
            weights_TK=probs_TE * taken_TE,
            logits_TE=logits_TE,
            losses={"z_loss": z_loss(logits_TE)},
            stats={"capacity": float(C), "dropped_frac": (per_token_T == 0).float().mean(),
                   "experts_per_token": per_token_T.float().mean()},
        )


@hookimpl
def rapid_register_routers():
    return {"expert_choice": ExpertChoiceRouter}
