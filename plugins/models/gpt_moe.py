"""GPT-MoE: a pre-norm GPT decoder whose FFN is an MoE block every ``moe_every`` layers.

Read top to bottom: Config -> Attention -> Block -> GPTMoE. Parallelization lives elsewhere
(plugins/parallel); this file only defines the model. It is built on the meta device, parallelized,
materialised and then initialised by ``reset_parameters`` (see the ``rapid_register_models`` hook).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from rapid import hookimpl
from rapid.errors import UserError
from rapid.kernels import Kernels
from rapid.moe import MLP, Experts, MoE
from rapid.types import (Batch, DropPolicy, Fraction, ModelOutput, MoESpec, NonNegative, Positive, Router,
                         Routing)


@dataclass
class Config:
    vocab_size: Positive = 8000
    seq_len: Positive = 256
    hidden: Positive = 256
    layers: Positive = 4
    heads: Positive = 4
    ffn_mult: Positive = 4                 # d_ff = ffn_mult * hidden
    moe_every: NonNegative = 2             # layer i (0-based) is MoE when (i + 1) % moe_every == 0; 0 = dense
    experts: Positive | list[Positive] = 8  # one count, or one per MoE layer (pyramid MoE)
    residual: bool = False                 # residual MoE: dense MLP + routed expert (DeepSpeed PR-MoE)
    top_k: Positive = MoESpec.top_k
    capacity_factor: Annotated[float, Field(gt=0)] = MoESpec.capacity_factor
    eval_capacity_factor: Annotated[float, Field(gt=0)] = MoESpec.eval_capacity_factor
    min_capacity: NonNegative = MoESpec.min_capacity
    drop_policy: DropPolicy = MoESpec.drop_policy
    dropless: bool = MoESpec.dropless      # never drop: capacity = whatever the busiest expert needs
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu"
    dropout: Fraction = 0.0
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        for e in self.experts_per_moe_layer():
            if self.top_k > e:
                raise ValueError(f"top_k={self.top_k} is larger than the expert count {e}")

    def moe_layers(self) -> list[int]:
        if self.moe_every <= 0:
            return []
        return [i for i in range(self.layers) if (i + 1) % self.moe_every == 0]

    def experts_per_moe_layer(self) -> list[int]:
        n = len(self.moe_layers())
        if isinstance(self.experts, int):
            return [self.experts] * n
        if len(self.experts) != n:
            raise ValueError(
                f"experts lists {len(self.experts)} counts but layers={self.layers} with "
                f"moe_every={self.moe_every} gives {n} MoE layers {self.moe_layers()}: "
                "give one expert count per MoE layer, or a single int")
        return list(self.experts)

    def spec(self, num_experts: int) -> MoESpec:
        return MoESpec(self.hidden, num_experts, self.top_k, self.capacity_factor,
                       self.eval_capacity_factor, self.min_capacity, self.drop_policy, self.dropless)


class Attention(nn.Module):
    """Causal self-attention. The fused projection's output is laid out head by head ([H, 3, d]),
    so a tensor-parallel split of it into contiguous chunks gives each rank whole heads; ``heads`` is
    the number of heads this module computes (H / tensor_parallel under tensor parallelism)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.heads, self.head_dim, self.dropout = cfg.heads, cfg.hidden // cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)

    def forward(self, x_BSD: Tensor) -> Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, self.heads, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        y_BHSd = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y_BHSd.transpose(1, 2).reshape(B, S, self.heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: Config, moe: MoE | None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.moe = moe
        self.mlp = None if moe is not None else MLP(cfg.hidden, cfg.ffn_mult * cfg.hidden, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: Tensor, token_ids_T: Tensor, domain_ids_T: Tensor) -> tuple[Tensor, Routing | None]:
        x_BSD = x_BSD + self.drop(self.attn(self.ln1(x_BSD)))
        h_BSD = self.ln2(x_BSD)
        if self.moe is None:
            return x_BSD + self.drop(self.mlp(h_BSD)), None
        B, S, D = h_BSD.shape
        prev_T = None
        if self.moe.router.needs_previous_tokens:     # each token's predecessor, -1 at a sequence start
            prev_T = torch.cat([token_ids_T.new_full((B, 1), -1), token_ids_T.view(B, S)[:, :-1]], 1).reshape(-1)
        y_TD, routing = self.moe(h_BSD.reshape(B * S, D), token_ids_T, domain_ids_T, prev_T)
        return x_BSD + self.drop(y_TD.view(B, S, D)), routing


MakeRouter = Callable[[int, MoESpec], Router]


class GPTMoE(nn.Module):
    Config = Config

    def __init__(self, cfg: Config, make_router: MakeRouter, kernels: Kernels):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.hidden)
        counts = iter(cfg.experts_per_moe_layer())
        blocks = []
        for i in range(cfg.layers):
            moe = None
            if i in cfg.moe_layers():
                spec = cfg.spec(next(counts))
                moe = MoE(spec, make_router(sum(b.moe is not None for b in blocks), spec), cfg.ffn_mult * cfg.hidden, kernels,
                          cfg.residual, cfg.activation)
            blocks.append(Block(cfg, moe))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter and buffer (after materialisation: ``to_empty`` leaves them
        uninitialised and unties shared weights, so the tie is made here). Experts draw from
        generators seeded by their global id; other modules with a ``reset_parameters`` (layer norms,
        routers) initialise themselves."""
        if self.cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.layers)  # GPT-2: scale residual projections
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_out = name.endswith(("attn.proj", "mlp.proj"))
                nn.init.normal_(module.weight, std=out_std if is_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                module.reset_parameters(std, out_std)
            elif module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()             # LayerNorm, a router's own parameters or buffers

    def forward(self, batch: Batch) -> ModelOutput:
        tokens_BS = batch.tokens_BS
        B, S = tokens_BS.shape
        if S > self.cfg.seq_len:
            raise UserError(f"sequence length {S} exceeds [model] seq_len={self.cfg.seq_len}")
        out = ModelOutput(logits_BSV=None)
        x_BSD = self.tok_emb(tokens_BS) + self.pos_emb(torch.arange(S, device=tokens_BS.device))
        token_ids_T, domain_ids_T = tokens_BS.reshape(-1), batch.domain_ids_BS.reshape(-1)
        moe_index = 0
        for block in self.blocks:
            x_BSD, routing = block(x_BSD, token_ids_T, domain_ids_T)
            if routing is not None:
                for name, value in routing.losses.items():
                    out.aux.setdefault(name, []).append(value)
                for name, value in routing.stats.items():    # averaged over layers, and per layer
                    out.stats.setdefault(name, []).append(value)
                    out.stats[f"moe{moe_index}/{name}"] = [value]
                moe_index += 1
        out.logits_BSV = self.head(self.ln_f(x_BSD))
        return out


@hookimpl
def rapid_register_models():
    return {"gpt_moe": GPTMoE}
