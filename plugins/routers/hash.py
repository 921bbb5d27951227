"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): a fixed, unlearned
token-id -> expert table; the routed expert's output enters with gate weight 1.

Variants (``[router] variant``), each a table in a persistent buffer (saved with the model), drawn
independently for every MoE layer (a generator seeded by one draw of the torch RNG plus
``spec.layer``) and drawn again by ``reset_parameters()``:

- ``random``: a random permutation of the vocabulary dealt round-robin to the experts, so expert
  loads (in token ids) differ by at most one: the paper's "Random Hash" with its balance made exact.
- ``frequency``: the paper's "Balanced assignment": token ids in order of decreasing frequency in the
  training data, each to the expert with the least total frequency so far (ties: fewer ids, then a
  random per-layer order of the experts); ids that never occur go to the experts with the fewest
  ids. Needs the corpus's token counts in ``spec.token_counts`` (filled by the training loop);
  without them the router refuses to be materialised (``rapid plan`` builds on the meta device and
  does not need them).
- ``bigram``: the paper's "Bigram Hash" of (previous, current) token: random 31-bit words per current
  and per previous id (tabulation), XORed and mixed by a multiplication modulo the prime 2^31 - 1,
  then reduced mod E. A random function of the pair: which tokens share an expert changes with the
  previous token, and each previous token deals the vocabulary uniformly in expectation (not to
  within one id, as ``random`` does). A sequence start has its own word. The paper does not specify
  its hash function.

Faithfulness: one expert per token (``top_k`` = 1, as in the paper). The paper routes every token
(no capacity); here capacity is honoured like every rapid router (``[model] dropless = true`` gives
the paper's behaviour) with the recipe's drop policy (``probs`` reduces to ``position``: all weights
are 1). No gate, no logits, no auxiliary loss, no learned parameters.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rapid import hookimpl
from rapid.errors import UserError
from rapid.moe import apply_capacity, drop_priority
from rapid.types import MoESpec, Router, Routing


def balanced_table(vocab: int, experts: int, gen: torch.Generator) -> Tensor:
    """A random permutation of ``range(vocab)`` dealt round-robin: ids per expert differ by <= 1."""
    table = torch.empty(vocab, dtype=torch.long)
    table[torch.randperm(vocab, generator=gen)] = torch.arange(vocab) % experts
    return table


def frequency_table(counts_V: Tensor, experts: int, gen: torch.Generator) -> Tensor:
    """Greedy balanced assignment: most frequent id first (equal counts in random order), to the
    expert with the least total count (ties: fewer ids, then a random order of the experts); ids
    that never occur go to the experts with the fewest ids."""
    V = counts_V.numel()
    perm = torch.randperm(V, generator=gen)
    order = perm[torch.argsort(counts_V[perm], descending=True, stable=True)].tolist()
    rank = torch.randperm(experts, generator=gen).tolist()
    table, counts = [0] * V, counts_V.tolist()
    seen = [t for t in order if counts[t] > 0]
    heap = sorted((0, 0, rank[e], e) for e in range(experts))    # (total count, ids, tie-break, expert)
    for t in seen:
        load, n, r, e = heapq.heappop(heap)
        table[t] = e
        heapq.heappush(heap, (load + counts[t], n + 1, r, e))
    heap = sorted((n, r, e) for _, n, r, e in heap)
    for t in order[len(seen):]:
        n, r, e = heapq.heappop(heap)
        table[t] = e
        heapq.heappush(heap, (n + 1, r, e))
    return torch.tensor(table, dtype=torch.long)


_PRIME, _MULT = 2**31 - 1, 0x5BD1E995        # bigram mixing: a 31-bit word times a 31-bit odd constant mod a prime


class HashRouter(Router):
    @dataclass
    class Config:
        variant: Literal["random", "frequency", "bigram"] = "random"

    def __init__(self, config: Config, spec: MoESpec):
        super().__init__(config, spec)
        if spec.top_k != 1:
            raise UserError(f"router 'hash' sends each token to one expert; [model] top_k={spec.top_k}",
                            hint="set [model] top_k = 1")
        if spec.vocab_size <= 0:
            raise UserError("router 'hash' needs the vocabulary size (MoESpec.vocab_size)",
                            hint="build the model with rapid.recipe.build_model")
        self.needs_previous_tokens = config.variant == "bigram"
        V = spec.vocab_size
        if self.needs_previous_tokens:   # words of current and previous ids (index prev + 1: 0 is a start)
            self.register_buffer("word_V", torch.zeros(V, dtype=torch.long))
            self.register_buffer("word_V1", torch.zeros(V + 1, dtype=torch.long))
        else:
            self.register_buffer("table_V", torch.zeros(V, dtype=torch.long))
        self.reset_parameters()

    def token_counts(self) -> Tensor:
        """The training data's count of every token id (``spec.token_counts``), or a UserError."""
        counts = self.spec.token_counts
        if counts is None:
            raise UserError("router 'hash' variant 'frequency' needs token counts of the training data and none "
                            "are available here", hint="train it with `rapid run` (which counts the corpus), or "
                            "use variant = \"random\"")
        counts = torch.as_tensor(counts).reshape(-1).to("cpu", torch.long)
        V = self.spec.vocab_size
        if counts.numel() > V or bool((counts < 0).any()):
            raise UserError(f"router 'hash': token_counts has {counts.numel()} entries for a vocabulary of {V}, "
                            "or negative counts")
        return torch.cat([counts, counts.new_zeros(V - counts.numel())])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw this layer's table (a generator seeded by one draw of the global RNG + the layer)."""
        base = int(torch.randint(0, 2**62, (1,), device="cpu"))
        if next(self.buffers()).device.type == "meta":   # built to be planned or materialised later
            return
        gen = torch.Generator().manual_seed(base + self.spec.layer)
        V, E = self.spec.vocab_size, self.spec.num_experts
        if self.needs_previous_tokens:
            self.word_V.copy_(torch.randint(0, 2**31, (V,), generator=gen))
            self.word_V1.copy_(torch.randint(0, 2**31, (V + 1,), generator=gen))
        elif self.config.variant == "frequency":
            self.table_V.copy_(frequency_table(self.token_counts(), E, gen))
        else:
            self.table_V.copy_(balanced_table(V, E, gen))

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor, domain_ids_T: Tensor,
                prev_token_ids_T: Tensor | None = None) -> Routing:
        if self.needs_previous_tokens:
            if prev_token_ids_T is None:
                raise UserError("router 'hash' variant 'bigram' needs each token's previous token "
                                "(prev_token_ids_T), and the model did not pass it")
            mixed_T = (self.word_V[token_ids_T] ^ self.word_V1[prev_token_ids_T + 1]) * _MULT % _PRIME  # < 2**62
            expert_T = mixed_T % self.spec.num_experts
        else:
            expert_T = self.table_V[token_ids_T]
        ones_T1 = torch.ones(expert_T.shape[0], 1, device=x_TD.device, dtype=torch.float32)
        capacity = self.spec.capacity(expert_T.shape[0], self.training)
        expert_ids_T1 = apply_capacity(expert_T[:, None], drop_priority(self.spec.drop_policy, ones_T1),
                                       self.spec.num_experts, capacity)
        return Routing(expert_ids_TK=expert_ids_T1, weights_TK=ones_T1 * (expert_ids_T1 >= 0))


@hookimpl
def rapid_register_routers():
    return {"hash": HashRouter}
