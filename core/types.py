"""The types plugins implement or receive. Shape suffixes: B batch, S sequence, T tokens (B*S),
D hidden, E experts, K top-k slots, V vocabulary, N routed rows (kept token-slot pairs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, ClassVar, Literal

import numpy as np
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
    vocab_size: int = 0               # token ids are below this (hash tables)
    domains: tuple[str, ...] = ()     # domain id i is domains[i]: [data] domains, or the corpus's
    layer: int = 0                    # this layer's index among the model's MoE layers
    token_counts: Tensor | None = field(default=None, compare=False, repr=False)  # [V] of the training data

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
    expert_ids_TK: Tensor               # long [T, K] (K: Router.slots_per_token); -1: dropped / not taken
    weights_TK: Tensor                  # [T, K] combine weights (0 where dropped)
    logits_TE: Tensor | None = None     # router logits, None for routers without a gate (hash, RRE)
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, float | Tensor] = field(default_factory=dict)  # logged per layer and averaged
    order: object | None = None         # rapid.kernels.Permutation from Router.route_topk: permute skips its sort


class Router(nn.Module):
    """Base class of routers. Subclasses set ``Config`` (a dataclass) and implement ``forward``.

    ``honors_capacity``: no expert keeps more than ``spec.capacity(T, training)`` assignments (the
    contract tests check it; routers with their own balance rule, such as expert choice, say False).
    ``needs_previous_tokens``: ``forward`` also gets ``prev_token_ids_T``, each token's predecessor in
    its sequence (-1 at a sequence start). ``default_losses``: weights of the router's own loss terms
    (``Routing.losses``) when the recipe's ``[loss]`` does not set them. Parameters and persistent
    buffers are checkpointed with the model; ``reset_parameters()``, if defined, initialises them
    after materialisation."""
    honors_capacity: ClassVar[bool] = True
    needs_previous_tokens: ClassVar[bool] = False
    default_losses: ClassVar[dict[str, float]] = {}   # the router's own loss terms: weight unless [loss] sets one

    @dataclass
    class Config:
        pass

    def __init__(self, config, spec: MoESpec):
        super().__init__()
        self.config = config
        self.spec = spec

    @property
    def slots_per_token(self) -> int:
        """K of the ``Routing``: ``top_k``; one column per expert for expert-choice routers."""
        return self.spec.top_k

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor, domain_ids_T: Tensor) -> Routing:
        raise NotImplementedError

    kernels = None   # the owning MoE layer's rapid.kernels.Kernels (set by it); None: the builtin reference

    def route_topk(self, logits_TE: Tensor, top_k: int, capacity):
        """fp32 softmax + top-k + capacity (``spec.drop_policy`` picks who stays) through the fused
        ``route`` kernel: a ``rapid.kernels.RouteResult``. Put its ``order`` into ``Routing.order`` so
        dispatch does not sort again (only valid if the routing's expert ids are its ``expert_ids_TK``)."""
        if self.kernels is None:     # a router used on its own, outside an MoE layer
            from rapid.kernels import reference_kernels
            self.kernels = reference_kernels()
        return self.kernels.route(logits_TE, top_k, capacity, self.spec.drop_policy)


# ---------------------------------------------------------------- parallel strategies
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class ParallelConfig:
    """The acceleration switches every ``[parallel]`` table has (Rapidformer-style: one recipe, the
    switches pick how it is trained); strategies subclass it to add their own keys. A strategy
    refuses (before launch) a switch its ``capabilities`` do not list."""
    micro_batch: Positive = 8
    grad_accum: Positive = 1
    precision: Precision = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 0   # ZeRO: 1 shards optimizer states, 2 + gradients, 3 + parameters
    offload: bool = False                 # optimizer states (and their update) in host memory
    tensor_parallel: Positive = 1         # ranks that split each attention / dense MLP (Megatron-style)
    expert_parallel: Positive = 1         # ranks that share one copy of the experts (E / ep each)
    activation_checkpoint: bool = False   # recompute each block in backward


class Engine:
    """A wrapped model + optimizer, shaped after DeepSpeed's engine. ``model`` is what runs the
    forward (a DDP wrapper, an FSDP module); the loop runs every micro-batch through ``forward``."""

    model: nn.Module

    def autocast(self):
        """Context manager for a forward pass (mixed precision)."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> ModelOutput:
        """One training micro-batch; gradients are synchronised on the last of ``grad_accum``."""
        raise NotImplementedError

    def backward(self, loss: Tensor) -> None:
        raise NotImplementedError

    def step(self) -> dict[str, float]:
        """Reduce, clip (on the global norm), step optimizer and scheduler, zero grads. Returns
        metrics: ``lr`` (the rate this step used), ``grad_norm`` and ``skipped``: True when the
        gradients were not finite, in which case neither the parameters nor the LR schedule moved
        (fp16 loss scaling, divergence)."""
        raise NotImplementedError

    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors, extra): model and optimizer tensors keyed ``model.<name>`` (parameters and
        persistent buffers) and ``optim.<name>.<state>`` by full parameter name (sharded ones as DTensors over their global
        shape, experts at their global index), which a load fills in place; and JSON-able state."""
        raise NotImplementedError

    def load_extra_state(self, extra: dict) -> None:
        """Restore the JSON-able part, after the tensors of ``checkpoint_state`` were filled."""
        raise NotImplementedError


MakeOptimizer = Callable[[nn.Module], "tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]"]


CAPABILITIES = ("fp32", "bf16", "fp16", "multiprocess", "zero1", "zero2", "zero3", "offload", "tensor_parallel",
                "expert_parallel", "activation_checkpoint")


class ParallelStrategy:
    """How a model is spread over processes. ``capabilities`` (names from ``CAPABILITIES``) are
    checked against the switches before any process starts; ``presets`` name switch sets
    (``[parallel] preset = "..."``) that explicit keys override; ``requires`` names the library and
    the extra that installs it."""
    Config: ClassVar[type] = ParallelConfig
    capabilities: ClassVar[frozenset[str]] = frozenset()
    presets: ClassVar[dict[str, dict]] = {}
    requires: ClassVar[tuple[str, str] | None] = None   # (import name, pip extra)
    autocast_weights: ClassVar[bool] = True   # bf16/fp16 by autocast over fp32 weights (False: 16-bit weights)
    name: str = ""                                       # the registered name (set by the registry)

    def __init__(self, config, world_size: int = 1):
        self.config, self.world_size = config, world_size
        self.name = self.name or type(self).__name__
        self.peers: dict[str, frozenset[str]] = {}    # registered strategies' capabilities (for hints)

    def check(self, recipe) -> None:
        """Refuse impossible combinations before anything is built or launched (raise UserError)."""
        import importlib.util
        from rapid.errors import UserError
        name, c = self.name, self.config
        try:
            missing = bool(self.requires) and importlib.util.find_spec(self.requires[0]) is None
        except ModuleNotFoundError:      # a dotted name whose parent package is missing
            missing = True
        if missing:
            raise UserError(f"parallel strategy {name!r} needs {self.requires[0]}, which is not installed",
                            hint=f"pip install 'rapidmoe[{self.requires[1]}]'")
        wants = [(c.precision, f"precision {c.precision!r}"),
                 ("multiprocess" if self.world_size > 1 else None, f"{self.world_size} processes"),
                 (f"zero{c.zero_stage}" if c.zero_stage else None, f"zero_stage={c.zero_stage}"),
                 ("offload" if c.offload else None, "offload"),
                 ("tensor_parallel" if c.tensor_parallel > 1 else None, f"tensor_parallel={c.tensor_parallel}"),
                 ("expert_parallel" if c.expert_parallel > 1 else None, f"expert_parallel={c.expert_parallel}"),
                 ("activation_checkpoint" if c.activation_checkpoint else None, "activation_checkpoint")]
        for capability, what in wants:
            if capability and capability not in self.capabilities:
                able = sorted(n for n, caps in self.peers.items() if capability in caps)
                raise UserError(f"parallel strategy {name!r} does not support {what}",
                                hint=(f"strategies that do: {', '.join(able)}; " if able else "")
                                + "`rapid plugins --capabilities` shows what each strategy supports")

    def device(self, requested: str = "auto") -> torch.device:
        """The device this process trains on, from ``[run] device`` (a GPU per local rank)."""
        from rapid.dist import env
        from rapid.errors import UserError
        if requested == "cuda" and not torch.cuda.is_available():
            raise UserError("[run] device = 'cuda' but no CUDA device is available", hint='use device = "auto"')
        if requested in ("auto", "cuda") and torch.cuda.is_available():   # srun may bind one GPU per task
            return torch.device("cuda", env().local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) of this process among the ranks that see different data."""
        from rapid.dist import env
        return env().rank, self.world_size

    def memory_plan(self, counts: dict[str, int]) -> dict[str, int]:
        """Per-device bytes of model states from the parameter counts of ``rapid.plan``. Default:
        fp32 weights and gradients plus AdamW's two fp32 states, with bf16/fp16 through autocast
        (what ``single`` and torch DDP do); expert parameters divided by ``expert_parallel``."""
        n = counts["params_dense"] + counts["params_expert"] // self.config.expert_parallel
        return {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n}

    def parallelize(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Shard and rewire ``model`` (still on the meta device) before it is materialised."""
        return model

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, clip: float) -> Engine:
        """Wrap the materialised, initialised model and its optimizer into an Engine."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the strategy set up for the run (a library's global state); called when the run
        ends, before the process group goes."""


# ---------------------------------------------------------------- data
@dataclass
class Corpus:
    """What a data source hands the training loop: one token stream per split."""
    tokenizer_path: Path
    eod_id: int
    domains: list[str]
    train_tokens: np.ndarray   # int32 stream, documents separated by eod
    train_domains: np.ndarray  # int16 domain id of each token
    val_tokens: np.ndarray
    val_domains: np.ndarray
    duplicates_dropped: int = 0  # exact copies left out of both splits
    fingerprint: str = ""        # names the content (a resumed run refuses different data)


class DataSource:
    """Base of data sources: ``DataSource(config)`` with the ``[data]`` table's ``Config``, and
    ``corpus(vocab_size)``. Sources of documents subclass ``rapid.builtin.data.corpus.DocumentSource``,
    which tokenizes and caches them."""
    Config: ClassVar[type]

    def __init__(self, config):
        self.config = config

    def corpus(self, vocab_size: int) -> Corpus:
        raise NotImplementedError
