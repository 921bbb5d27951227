"""``fsdp``: torch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over all
ranks, each block its own unit (gathered for its forward and backward, resharded after).

With ``expert_parallel`` > 1 the experts are sharded by expert parallelism instead: FSDP ignores them
(``ignored_params``), each rank keeps its ``E / ep`` experts whole and their gradients are reduced
over the expert's replicas. Mixed precision is autocast over fp32 shards, as with ``torch``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from rapid import hookimpl
from rapid.builtin.parallel.ddp import DistributedEngine, ExpertParallelStrategy
from rapid.types import Engine, MakeOptimizer


class FSDPEngine(DistributedEngine):
    def sync_gradients(self, enabled: bool) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(enabled)


class FSDP2(ExpertParallelStrategy):
    """torch FSDP2. fp32/bf16/fp16 (autocast, loss scaling), expert parallelism, activation
    checkpointing; one process works too (nothing to shard)."""
    capabilities = frozenset({"fp32", "bf16", "fp16", "multiprocess", "expert_parallel", "activation_checkpoint"})

    def memory_plan(self, counts: dict[str, int]) -> dict[str, int]:
        ep, world = self.config.expert_parallel, self.world_size
        experts = counts["params_expert"] // ep if ep > 1 else counts["params_expert"] // world
        n = counts["params_dense"] // world + experts
        return {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n}

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, clip: float) -> Engine:
        device = next(model.parameters()).device
        if dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
            raw = dict(model.named_parameters())
            ignored = {raw[n] for n in self.expert_param_names(model)} or None
            for block in model.blocks:
                fully_shard(block, mesh=mesh, ignored_params=ignored)
            fully_shard(model, mesh=mesh, ignored_params=ignored)
        optimizer, scheduler = make_optimizer(model)
        return FSDPEngine(model, model, optimizer, scheduler, self.config, clip, device, ep=self.ep)


@hookimpl
def rapid_register_parallel():
    return {"fsdp": FSDP2}
