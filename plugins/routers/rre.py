"""Random Routed Experts (PanGu-Sigma, Ren et al. 2023, "PanGu-Sigma: Towards Trillion Parameter
Language Model with Sparse Heterogeneous Computing"): two-level routing without a gate. Level 1:
the token's domain selects its group of experts; level 2: inside the group, a fixed, balanced
random token-id -> expert table. Gate weight 1, no auxiliary loss, no learned parameters.

``[router.groups]`` maps every declared domain (``[data] domains``) to its number of experts; the
groups occupy consecutive expert ids in the declared domain order. Empty (the default): the layer's
experts split evenly over the domains, the remainder to the first ones. The group sizes must add up
to the layer's expert count or to a divisor of it: a layer with m times as many experts (a pyramid
``[model] experts``) gives each domain m times its count. More experts than the layer has, a
domain left out, an undeclared domain or a group of 0 experts is an error.

The table is a persistent buffer ``expert_DV`` (global expert id of every (domain, token) pair, so
the forward is one gather), drawn per domain and layer (a generator seeded by one draw of the torch
RNG plus ``spec.layer``): a random permutation of the vocabulary dealt round-robin over the group, so
the group's experts get token-id counts that differ by at most one; redrawn by
``reset_parameters()``. ``subset`` gives the experts and table of some domains only, renumbered: what
``rapid extract`` (PanGu-Sigma's sub-model extraction) writes.

Capacity is per group (``honors_capacity = False``: not the layer-wide rule): each expert of domain
d's group keeps at most ceil(T_d / |G_d| * capacity_factor) tokens (floored at ``min_capacity``),
T_d the tokens of domain d in the routed batch, so a batch whose domain mix differs from the group
sizes does not overflow the busier groups (with the layer-wide rule, a quarter to a third of the
tokens of the tiny recipe were dropped). It also makes a domain's capacity independent of the
other domains' tokens, so an extracted sub-model drops exactly what the full model drops (for the
``position`` and ``probs`` policies; ``random`` draws differ).

Faithfulness: as in the paper, level 1 is the domain (the paper's groups are per task or language,
sized by the authors: here by the recipe) and level 2 a randomly initialised, fixed token -> expert
table that spreads the vocabulary uniformly (dealing a permutation makes it exact). The paper
routes every token; ``[model] dropless = true`` gives that behaviour. One expert per token
(``top_k`` = 1).

``--set 'router.groups={news = 3, review = 1}'`` overrides the whole table (``--set
router.groups.news=3`` does not work: ``--set`` takes ``table.key``, and ``groups.news`` is not a key).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from rapid import hookimpl
from rapid.builtin.routers.hash import balanced_table
from rapid.errors import UserError
from rapid.moe import apply_capacity, drop_priority
from rapid.types import MoESpec, Positive, Router, Routing


def group_sizes(groups: dict[str, int], domains: tuple[str, ...], experts: int, layer: int) -> list[int]:
    """Experts of each domain (in ``domains`` order) for a layer of ``experts``, or a UserError."""
    where = f"[router.groups] (MoE layer {layer}, {experts} experts)"
    if not domains:
        raise UserError("router 'rre' routes by domain and no domains are declared",
                        hint='declare them in the recipe, e.g. [data] domains = ["news", "review"]')
    if not groups:
        if experts < len(domains):
            raise UserError(f"router 'rre': MoE layer {layer} has {experts} experts for {len(domains)} domains; "
                            "every domain needs at least one", hint="raise [model] experts")
        return [experts // len(domains) + (i < experts % len(domains)) for i in range(len(domains))]
    unknown = [d for d in groups if d not in domains]
    missing = [d for d in domains if d not in groups]
    if unknown or missing:
        what = f"names undeclared domains {unknown}" if unknown else f"leaves out the domains {missing}"
        raise UserError(f"router 'rre': {where} {what}",
                        hint=f"give every [data] domain an expert count: {', '.join(domains)}")
    empty = [d for d, n in groups.items() if n <= 0]
    if empty:
        raise UserError(f"router 'rre': {where} gives {empty[0]!r} {groups[empty[0]]} experts",
                        hint="every domain needs at least one expert")
    total = sum(groups.values())
    if experts % total:
        raise UserError(f"router 'rre': {where} asks for {total} experts in all, which "
                        f"{'exceeds' if total > experts else 'does not divide'} the layer's {experts}",
                        hint="the counts must add up to the layer's experts (or a divisor of it: "
                             "a layer with m times as many gives each domain m times its count)")
    return [groups[d] * (experts // total) for d in domains]


class RRERouter(Router):
    honors_capacity = False        # per group (module docstring)

    @dataclass
    class Config:
        groups: dict[str, Positive] = field(default_factory=dict)   # domain -> experts; {} = even split

    def __init__(self, config: Config, spec: MoESpec):
        super().__init__(config, spec)
        if spec.top_k != 1:
            raise UserError(f"router 'rre' sends each token to one expert; [model] top_k={spec.top_k}",
                            hint="set [model] top_k = 1")
        if spec.vocab_size <= 0:
            raise UserError("router 'rre' needs the vocabulary size (MoESpec.vocab_size)",
                            hint="build the model with rapid.recipe.build_model")
        self.sizes = group_sizes(dict(config.groups), spec.domains, spec.num_experts, spec.layer)
        self.register_buffer("expert_DV", torch.zeros(len(self.sizes), spec.vocab_size, dtype=torch.long))
        self.domain_E = [d for d, n in enumerate(self.sizes) for _ in range(n)]   # each expert's domain
        self.reset_parameters()

    def group(self, domain: str) -> range:
        """The expert ids of ``domain``'s group."""
        d = self.spec.domains.index(domain)
        return range(sum(self.sizes[:d]), sum(self.sizes[:d + 1]))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw every domain's table (a generator seeded by one draw of the global RNG + the layer)."""
        base = int(torch.randint(0, 2**62, (1,), device="cpu"))
        if self.expert_DV.device.type == "meta":
            return
        gen = torch.Generator().manual_seed(base + self.spec.layer)
        for d, name in enumerate(self.spec.domains):
            ids = self.group(name)
            self.expert_DV[d].copy_(ids.start + balanced_table(self.spec.vocab_size, len(ids), gen))

    def subset(self, expert_DV: Tensor, domains: list[str]) -> tuple[Tensor, Tensor]:
        """(old ids of the experts kept, in their new order; the kept domains' rows of ``expert_DV``
        with those ids renumbered 0..n-1) for ``domains`` in declared order."""
        keep = [d for d in self.spec.domains if d in domains]
        kept_E = torch.tensor([e for d in keep for e in self.group(d)], dtype=torch.long)
        new_of_old = torch.full((self.spec.num_experts,), -1, dtype=torch.long)
        new_of_old[kept_E] = torch.arange(len(kept_E))
        rows = torch.tensor([self.spec.domains.index(d) for d in keep], dtype=torch.long)
        return kept_E, new_of_old[expert_DV[rows]]

    def capacity(self, domain_ids_T: Tensor) -> Tensor | None:
        """Each expert's capacity [E]: ceil(T_d / |G_d| * factor) of its domain d, floored at min_capacity."""
        spec = self.spec
        if spec.dropless:
            return None
        factor = spec.capacity_factor if self.training else spec.eval_capacity_factor
        tokens_D = torch.bincount(domain_ids_T, minlength=len(self.sizes)).double()
        sizes_D = torch.tensor(self.sizes, dtype=torch.float64, device=tokens_D.device)
        cap_D = torch.ceil(tokens_D / sizes_D * factor).long().clamp_min(spec.min_capacity)
        return cap_D[torch.tensor(self.domain_E, device=cap_D.device)]

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor, domain_ids_T: Tensor) -> Routing:
        expert_T1 = self.expert_DV[domain_ids_T, token_ids_T][:, None]
        ones_T1 = torch.ones(expert_T1.shape, device=x_TD.device, dtype=torch.float32)
        expert_ids_T1 = apply_capacity(expert_T1, drop_priority(self.spec.drop_policy, ones_T1),
                                       self.spec.num_experts, self.capacity(domain_ids_T))
        return Routing(expert_ids_TK=expert_ids_T1, weights_TK=ones_T1 * (expert_ids_T1 >= 0))


@hookimpl
def rapid_register_routers():
    return {"rre": RRERouter}
