"""The types plugins implement or receive. Shape suffixes: B batch, S sequence, T tokens (B*S),
D hidden, E experts, K top-k slots, V vocabulary, N routed rows (kept token-slot pairs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Callable, ClassVar, Iterator, Literal

import torch
from pydantic import Field
from torch import Tensor, nn


# ---------------------------------------------------------------- annotations for Config fields
Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


# ---------------------------------------------------------------- data flowing through a step
@dataclass
class Batch:
    tokens_BS: Tensor                 # long, model input
    targets_BS: Tensor                # long, next tokens
    domain_ids_BS: Tensor             # long, domain of the document each token came from
    loss_mask_BS: Tensor | None = None  # float, 1 where the token counts for the lm loss

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) if t is not None else None for t in
                       (self.tokens_BS, self.targets_BS, self.domain_ids_BS, self.loss_mask_BS)))


@dataclass
class ModelOutput:
    logits_BSV: Tensor
    aux: dict[str, list[Tensor]] = field(default_factory=dict)   # router loss terms, one per MoE layer
    stats: dict[str, list] = field(default_factory=dict)  # router statistics (float or 0-dim tensor), one per MoE layer


LossTerm = Callable[[ModelOutput, Batch], Tensor]


class RouterLoss:
    """A loss term that sums the router term ``name`` over all MoE layers (as DeepSpeed and
    Megatron add each layer's auxiliary loss to the total)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor:
        terms = out.aux.get(self.name, [])
        if not terms:
            return out.logits_BSV.new_zeros((), dtype=torch.float32)
        return torch.stack([t.float() for t in terms]).sum()


# ---------------------------------------------------------------- routers
DropPolicy = Literal["random", "position", "probs"]


@dataclass(frozen=True)
class MoESpec:
    """What a router of one MoE layer needs to know about that layer (from ``[model]``, whose MoE
    defaults are these)."""
    hidden: int
    num_experts: int
    top_k: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_policy: DropPolicy = "random"
    dropless: bool = False

    def capacity(self, num_tokens: int, training: bool) -> int | None:
        """Rows per expert, ``ceil(tokens * k / experts * factor)`` floored at ``min_capacity``;
        None when dropless."""
        if self.dropless:
            return None
        factor = self.capacity_factor if training else self.eval_capacity_factor
        cap = math.ceil(num_tokens * self.top_k / self.num_experts * factor)
        return max(cap, self.min_capacity)


@dataclass
class Routing:
    expert_ids_TK: Tensor               # long [T, K]; -1 marks an assignment dropped by capacity
    weights_TK: Tensor                  # [T, K] combine weights (0 where dropped)
    logits_TE: Tensor | None = None     # router logits, None for routers without a gate (hash, RRE)
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, float | Tensor] = field(default_factory=dict)  # logged, averaged over layers


class Router(nn.Module):
    """Base class of routers. Subclasses set ``Config`` (a dataclass) and implement ``forward``."""

    @dataclass
    class Config:
        pass

    def __init__(self, config, spec: MoESpec):
        super().__init__()
        self.config = config
        self.spec = spec

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor, domain_ids_T: Tensor) -> Routing:
        raise NotImplementedError


# ---------------------------------------------------------------- parallel strategies
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class ParallelConfig:
    """Keys every ``[parallel]`` table has; strategies subclass it to add their switches."""
    micro_batch: Positive = 8
    grad_accum: Positive = 1
    precision: Precision = "fp32"


class Engine:
    """A wrapped model + optimizer, shaped after DeepSpeed's engine."""

    model: nn.Module
    world_size: int = 1
    rank: int = 0

    def autocast(self):
        """Context manager for the forward pass (mixed precision)."""
        raise NotImplementedError

    def backward(self, loss: Tensor) -> None:
        raise NotImplementedError

    def step(self) -> dict[str, float]:
        """Clip, step optimizer and scheduler, zero grads. Returns metrics: ``lr`` (the rate this
        step used), ``grad_norm`` and ``skipped``: True when the gradients were not finite, in which
        case neither the parameters nor the LR schedule moved (fp16 loss scaling, divergence)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


MakeOptimizer = Callable[[nn.Module], "tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]"]


class ParallelStrategy:
    Config: ClassVar[type] = ParallelConfig
    capabilities: ClassVar[frozenset[str]] = frozenset()
    world_size: int = 1

    def __init__(self, config):
        self.config = config

    def check(self, recipe) -> None:
        """Refuse impossible combinations before anything is built (raise UserError)."""

    def device(self, requested: str = "auto") -> torch.device:
        """The device this process trains on, from ``[run] device``."""
        from rapid.errors import UserError
        if requested == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if requested == "cuda" and not torch.cuda.is_available():
            raise UserError("[run] device = 'cuda' but no CUDA device is available", hint='use device = "auto"')
        return torch.device(requested)

    def memory_plan(self, params: int) -> dict[str, int]:
        """Per-device bytes of model states. Default: fp32 weights and gradients plus AdamW's two
        fp32 states, with bf16/fp16 through autocast (what ``single`` and torch DDP do)."""
        return {"params": 4 * params, "grads": 4 * params, "optimizer": 8 * params}

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, clip: float) -> Engine:
        """Wrap the model (already on ``device()``) and its optimizer into an Engine."""
        raise NotImplementedError


# ---------------------------------------------------------------- data
@dataclass
class Document:
    text: str
    domain: str = "default"


@dataclass
class DataConfig:
    """Keys every ``[data]`` table has; data sources subclass it to add their own."""
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.02  # documents held out for validation
    tokenizer: str = ""               # path to a sentencepiece model; "" trains one (cached)
    character_coverage: Annotated[float, Field(gt=0, le=1)] = 0.9995  # rarer characters fall back to bytes
    max_documents: NonNegative = 0    # 0 = all
    dedup: bool = True                # drop exact copies (same NFKC, whitespace-collapsed text)


class DataSource:
    Config: ClassVar[type] = DataConfig

    def __init__(self, config):
        self.config = config

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A string that changes whenever ``documents()`` would (used as a cache key)."""
        raise NotImplementedError
