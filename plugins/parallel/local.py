"""``local``: Megatron-style "local" data parallelism, through megatron-core's DistributedDataParallel.

Every gradient lives in one contiguous buffer: megatron-core's ``DistributedDataParallel`` (no overlap, so
one bucket) gives each parameter a ``main_grad`` view into it, and a hook on each parameter's gradient
accumulator adds the fresh ``.grad`` into that view and frees it. Nothing is communicated during backward:
a step's micro-batches accumulate in the buffer, which is all-reduced once in ``step`` (each rank's part
divided by the data-parallel size first). The parameters' ``.grad`` then become the views, for the global
norm (computed on the flat buffer), clipping, loss scaling and the optimizer; after the update they are set
to None again (megatron's hooks need that) and the buffer is zeroed in place, so the views stay valid.
This is Megatron's ``--DDP-impl local``, the data parallelism of PAI's fastest 13B configuration.

With ``expert_parallel`` > 1 the expert parameters are marked ``allreduce = False``, megatron's own
convention: they get a buffer of their own, reduced over the expert's replicas only (rapid's
``ExpertParallel`` groups, handed to megatron in a ``ProcessGroupCollection``; megatron's global
``parallel_state`` is not used) and divided by the world size, so each expert's gradient is the mean over
all tokens, as in one process. Mixed precision is autocast over fp32 parameters (fp16 with loss scaling),
as with ``torch``; activation checkpointing wraps each block. A parameter that gets no gradient gets a zero
one (its slot in the buffer), as in Megatron: AdamW still decays it. One process needs no wrapper.

On CPU: megatron-core 0.16.1 allocates the buffer on ``torch.cuda.current_device()``, which a CPU-only torch
answers with ``AssertionError: Torch not compiled with CUDA enabled``; while the wrapper is built (and only
then) ``current_device`` names the CPU. The collectives run on gloo as they are.

Refused before launch (capabilities): ZeRO stages and offload (megatron's distributed optimizer is not
wired in: use ``deepspeed`` or ``fsdp``), tensor parallelism (the ``megatron`` strategy).
"""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rapid import hookimpl
from rapid.builtin.parallel.ddp import DistributedEngine, ExpertParallelStrategy
from rapid.types import Engine, MakeOptimizer


class LocalDDPEngine(DistributedEngine):
    """A DistributedEngine whose gradients accumulate in megatron's flat buffers (``ddp``; None in one
    process) and are reduced once per optimizer step."""

    def __init__(self, *args, ddp=None, **kw):
        super().__init__(*args, **kw)
        self.ddp = ddp

    def step(self) -> dict[str, float]:
        if self.ddp:
            self.ddp.finish_grad_sync()            # the step's one all-reduce per buffer (dense; experts)
            for p in self.ddp.params_with_grad:
                p.grad = p.main_grad               # views into the reduced buffer
        stats = super().step()                     # ends with zero_grad(set_to_none=True): views dropped
        if self.ddp:
            self.ddp.zero_grad_buffer()            # in place: every main_grad view stays valid
        return stats

    def reduce_gradients(self) -> None:
        """Nothing left to reduce: expert gradients travel in their own buffer in ``step``."""

    def grad_norm_squared(self, params: list) -> Tensor:
        """On the flat buffers: dense ones are reduced (the same on every rank); each rank's expert
        buffer holds its share of the experts, summed over the expert-parallel group."""
        if not self.ddp:
            return super().grad_norm_squared(params)

        def squares(buffers) -> Tensor:
            return sum((b.grad_data.float().pow(2).sum() for b in buffers), torch.zeros((), device=self.device))

        expert = squares(self.ddp.expert_parallel_buffers)
        if self.ep:
            dist.all_reduce(expert, group=self.ep.ep_group)
        return squares(self.ddp.buffers) + expert


class LocalDDP(ExpertParallelStrategy):
    """Megatron-style local DDP (megatron-core's DistributedDataParallel): one flat gradient buffer,
    all-reduced once per optimizer step. fp32/bf16/fp16, expert parallelism, activation checkpointing."""
    capabilities = frozenset({"fp32", "bf16", "fp16", "multiprocess", "expert_parallel", "activation_checkpoint"})
    requires = ("megatron.core", "megatron")

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, clip: float) -> Engine:
        device = next(model.parameters()).device
        ddp = self._megatron_ddp(model, device) if dist.is_initialized() else None
        optimizer, scheduler = make_optimizer(model)
        return LocalDDPEngine(model, ddp or model, optimizer, scheduler, self.config, clip, device, ep=self.ep,
                              ddp=ddp)

    def _megatron_ddp(self, model: nn.Module, device: torch.device) -> nn.Module:
        with warnings.catch_warnings():   # megatron falls back to torch kernels without TE/Apex, and says so
            warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
            from megatron.core.process_groups_config import ProcessGroupCollection
            from megatron.core.transformer.transformer_config import TransformerConfig
        alone, _ = dist.new_subgroups(group_size=1)   # no tensor or pipeline parallelism: this rank alone
        groups = ProcessGroupCollection()
        groups.dp, groups.tp, groups.pp = dist.group.WORLD, alone, alone
        # rapid's expert-parallel groups: the expert buffer is summed over each expert's replicas (expt_dp)
        groups.ep, groups.expt_dp = (self.ep.ep_group, self.ep.replica_group) if self.ep else (alone, dist.group.WORLD)
        raw = dict(model.named_parameters())
        for name in self.expert_param_names(model):   # empty without expert parallelism
            raw[name].allreduce = False
        # DDP reads one model setting: the loss is a mean, not a per-token sum, so both buffers are divided
        # by the world size before they are summed
        config = TransformerConfig(num_layers=1, hidden_size=1, num_attention_heads=1, calculate_per_token_loss=False,
                                   cuda_graph_scope=[])
        ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False,
                                                   check_for_nan_in_grad=False)   # non-finite steps are skipped
        on_cpu = mock.patch("torch.cuda.current_device", lambda: device) if device.type == "cpu" \
            else contextlib.nullcontext()
        with on_cpu:
            return DistributedDataParallel(config, ddp_config, model, pg_collection=groups)


@hookimpl
def rapid_register_parallel():
    return {"local": LocalDDP}
