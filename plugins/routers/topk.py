"""GShard top-k routing (Lepikhin et al. 2020, "GShard", top-2; any k), matched to DeepSpeed's
``top2gating`` / ``topkgating`` (``deepspeed.moe.sharded_moe``) where they follow GShard.

fp32 softmax gate; each token's k highest-logit experts are its choices (slot 0 = first choice).
Capacity ``ceil(T * k / E * capacity_factor)`` per expert, floored at ``min_capacity`` (unbounded when
dropless), filled in GShard's order: every first choice takes a slot before any second choice, every
second before any third; inside one slot ``[model] drop_policy`` ranks the tokens (``position`` is
GShard's and DeepSpeed top2gating's cumsum order). DeepSpeed's topkgating (k > 2) ranks all slots of
an expert together instead; here the slot order holds for every k.

Choices after the first, in training (``second_policy``):
  sampling  GShard (Algorithm 1): choice i >= 2 is kept with probability min(1, k * g_i), g_i its gate
            normalised over the token's top k; for k = 2 that is GShard's ``2 * g2 > U(0, 1)``. The
            k > 2 rule is our generalisation (a choice of average weight is always kept).
            A choice left out takes no capacity slot.
  gumbel    DeepSpeed's ``top2_2nd_expert_sampling``: the first choice stays the argmax, the others
            are drawn without replacement from softmax(logits) by the Gumbel-max trick.
  all       every top-k choice competes for capacity.
At eval every top-k choice is kept (deterministic validation; DeepSpeed samples at eval as well).

Combine weights (k >= 2): a token's kept gate probabilities divided by their sum (``normalize =
"kept"``, DeepSpeed: a token whose second choice was dropped gets weight 1 on its first), or by the
sum over its top k before anything was dropped (``"topk"``, GShard / Mesh TensorFlow). With k = 1 the
weight is the gate probability, as DeepSpeed's top1gating (normalising a single choice gives 1 and
takes the gate out of the language-model gradient).

Losses, before any dropping, as DeepSpeed for the same k: ``load_balance = E * sum_e P_e * f_e`` with
P_e the mean gate probability and f_e the fraction of tokens whose FIRST choice is e for k <= 2
(top1gating, top2gating), and ``E / k * sum_e P_e * f_e`` with f_e the fraction of tokens having e
anywhere in their top k for k > 2 (topkgating); ``z_loss = mean(logsumexp(logits)^2)`` as top1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from rapid import hookimpl
from rapid.builtin.routers.top1 import gate_logits, z_loss
from rapid.errors import UserError
from rapid.moe import apply_capacity, drop_priority
from rapid.types import MoESpec, Router, Routing


def _uniform(shape, device) -> Tensor:   # module-level random draws, so tests can substitute theirs
    return torch.rand(shape, device=device)


def _gumbel(shape, device) -> Tensor:
    return -torch.log(-torch.log(torch.rand(shape, device=device).clamp(1e-20, 1 - 1e-7)))


def slot_major_priority(priority_TK: Tensor) -> Tensor:
    """A priority for ``apply_capacity`` that puts every slot-k assignment before any slot-(k+1) one
    and keeps the order of ``priority_TK`` inside a slot (long: exact for any T)."""
    T, K = priority_TK.shape
    order_TK = priority_TK.argsort(dim=0, descending=True, stable=True)
    rank_TK = torch.empty_like(order_TK).scatter_(
        0, order_TK, torch.arange(T, device=order_TK.device).unsqueeze(1).expand(T, K))
    return -(rank_TK + T * torch.arange(K, device=order_TK.device))


def topk_load_balance_loss(probs_TE: Tensor, top_TK: Tensor) -> Tensor:
    """DeepSpeed's l_aux: first choices only for k <= 2, all k choices (scaled by 1/k) for k > 2."""
    T, E = probs_TE.shape
    K = top_TK.shape[1]
    chosen = top_TK[:, 0] if K <= 2 else top_TK.reshape(-1)
    f_E = torch.bincount(chosen, minlength=E).float() / T
    return E / (1 if K <= 2 else K) * torch.sum(f_E * probs_TE.mean(dim=0))


class TopKRouter(Router):
    @dataclass
    class Config:
        second_policy: Literal["sampling", "gumbel", "all"] = "sampling"  # choices after the first, in training
        normalize: Literal["kept", "topk"] = "kept"   # combine weights over the kept choices, or over the top k

    def __init__(self, config: Config, spec: MoESpec):
        super().__init__(config, spec)
        if spec.top_k > spec.num_experts:
            raise UserError(f"router 'topk': [model] top_k={spec.top_k} is more than the layer's "
                            f"{spec.num_experts} experts", hint=f"set [model] top_k <= {spec.num_experts}")
        self.gate = nn.Linear(spec.hidden, spec.num_experts, bias=False)

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor, domain_ids_T: Tensor) -> Routing:
        return self.route(gate_logits(self.gate, x_TD))

    def route(self, logits_TE: Tensor) -> Routing:
        """Routing from fp32 logits (separate from ``forward`` so it can be checked in isolation)."""
        T, E = logits_TE.shape
        K = self.spec.top_k
        probs_TE = torch.softmax(logits_TE, dim=-1)
        policy = self.config.second_policy if self.training and K > 1 else "all"
        if policy == "gumbel":
            first_T1 = logits_TE.argmax(dim=-1, keepdim=True)
            noisy_TE = logits_TE.detach() + _gumbel(logits_TE.shape, logits_TE.device)
            noisy_TE = noisy_TE.scatter(1, first_T1, -torch.inf)
            top_TK = torch.cat([first_T1, noisy_TE.topk(K - 1, dim=-1).indices], dim=1)
        else:
            top_TK = logits_TE.topk(K, dim=-1).indices
        probs_TK = probs_TE.gather(1, top_TK)
        chosen_TK = top_TK
        if policy == "sampling":
            g_TK = probs_TK.detach() / probs_TK.detach().sum(-1, keepdim=True)
            keep_TK = K * g_TK > _uniform((T, K), logits_TE.device)
            keep_TK[:, 0] = True
            chosen_TK = torch.where(keep_TK, top_TK, -1)
        capacity = self.spec.capacity(T, self.training)
        if capacity is not None:
            priority_TK = slot_major_priority(drop_priority(self.spec.drop_policy, probs_TK))
            chosen_TK = apply_capacity(chosen_TK, priority_TK, E, capacity)
        kept_TK = chosen_TK >= 0
        weights_TK = probs_TK * kept_TK
        if K > 1:
            denom_T1 = (weights_TK if self.config.normalize == "kept" else probs_TK).sum(-1, keepdim=True)
            weights_TK = weights_TK / denom_T1.clamp_min(torch.finfo(torch.float32).eps)
        stats = {"capacity": float(capacity or 0)}
        if policy == "sampling":
            stats["sampled_out_frac"] = 1.0 - keep_TK.float().mean()
        return Routing(
            expert_ids_TK=chosen_TK,
            weights_TK=weights_TK,
            logits_TE=logits_TE,
            losses={"load_balance": topk_load_balance_loss(probs_TE, top_TK), "z_loss": z_loss(logits_TE)},
            stats=stats,
        )


@hookimpl
def rapid_register_routers():
    return {"topk": TopKRouter}
