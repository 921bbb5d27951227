"""``fsdp``: torch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over all
ranks, each block its own unit (gathered for its forward and backward, resharded after), each
``Experts`` module one too, sharded before it is materialised.

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
from rapid.moe import expert_modules
from rapid.types import Engine, MakeOptimizer


class FSDPEngine(DistributedEngine):
    def sync_gradients(self, enabled: bool) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(enabled)


class FSDP2(ExpertParallelStrategy):
    """torch FSDP2. fp32/bf16/fp16 (autocast, loss scaling), expert parallelism, activation
    checkpointing; one process works too (nothing to shard)."""
    capabilities = frozenset({"fp32", "bf16", "fp16", "multiprocess", "expert_parallel", "activation_checkpoint"})

    def check(self, recipe) -> None:
        super().check(recipe)
        if self.config.precision == "fp16" and self.config.expert_parallel > 1:
            from rapid.errors import UserError
            raise UserError("fsdp with expert_parallel > 1 does not support fp16: torch's GradScaler cannot unscale "
                            "sharded (DTensor) and expert (plain) gradients together",
                            hint="use precision = \"bf16\" (no loss scaling needed), or parallel.name=torch for fp16")

    def memory_plan(self, counts: dict[str, int]) -> dict[str, int]:
        ep, world = self.config.expert_parallel, self.world_size
        experts = counts["params_expert"] // ep if ep > 1 else counts["params_expert"] // world
        n = counts["params_dense"] // world + experts
        return {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n}

    mesh = None

    def parallelize(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Without expert parallelism the experts (almost all of an MoE model's parameters) are
        sharded here, on the meta device, so no rank ever materialises them whole; each rank then
        initialises only its rows of them (per global expert, see ``rapid.moe.Experts``). The dense
        rest is initialised whole, like one process does, and sharded in ``wrap``."""
        model = super().parallelize(model, device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            self.mesh = init_device_mesh(device.type, (dist.get_world_size(),))
            if self.ep is None:
                for _, experts in expert_modules(model):
                    fully_shard(experts, mesh=self.mesh)
        return model

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, clip: float) -> Engine:
        device = next(model.parameters()).device
        if self.mesh is not None:
            from torch.distributed.fsdp import fully_shard
            raw = dict(model.named_parameters())
            ignored = {raw[n] for n in self.expert_param_names(model)} or None
            for block in model.blocks:
                fully_shard(block, mesh=self.mesh, ignored_params=ignored)
            fully_shard(model, mesh=self.mesh, ignored_params=ignored)
        optimizer, scheduler = make_optimizer(model)
        return FSDPEngine(model, model, optimizer, scheduler, self.config, clip, device, ep=self.ep)


@hookimpl
def rapid_register_parallel():
    return {"fsdp": FSDP2}
