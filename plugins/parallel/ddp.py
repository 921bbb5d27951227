"""``torch``: DistributedDataParallel, with expert parallelism and activation checkpointing.

Dense gradients are averaged by DDP (bucketed all-reduce overlapping backward, synchronised on the
last micro-batch of a step only). With ``expert_parallel`` > 1 the expert parameters are kept out of
DDP: each rank holds its share of the experts (``rapid.builtin.parallel.expert``) and their gradients
are reduced over the expert's replicas only. ``find_unused_parameters`` stays off: the reference
kernels give every expert a gradient, tokens or not, so every parameter is in the graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rapid import hookimpl
from rapid.builtin.parallel.expert import ExpertParallel, check_layout
from rapid.builtin.parallel.single import LocalEngine, apply_activation_checkpointing
from rapid.moe import is_expert_param
from rapid.types import Engine, MakeOptimizer, ParallelStrategy


class DistributedEngine(LocalEngine):
    """A LocalEngine whose gradients span processes: the global gradient norm counts replicated
    gradients once, sums the shards of sharded (DTensor) ones over all ranks and each expert once;
    expert gradients are reduced over their replicas; experts reach the checkpoint at their global
    index."""

    def __init__(self, *args, ep: ExpertParallel | None = None, **kw):
        super().__init__(*args, **kw)
        self.ep = ep
        self.expert_params = [p for p, n in self.names.items() if ep and is_expert_param(n, self.expert_names)]
        self._experts = _expert_modules_by_name(self.inner)
        self._checked, self.activation_checkpoint = False, self.config.activation_checkpoint

    def reduce_gradients(self) -> None:
        if self.ep:
            self.ep.reduce_expert_grads(self.expert_params)

    def forward(self, batch):
        if self.ep and self._micro == 0:   # count a step's all-to-alls from its first micro-batch on
            for d in self._dispatchers():
                d.bytes_sent = 0
        return super().forward(batch)

    def _dispatchers(self):
        return [m.dispatcher for m in self.inner.modules() if hasattr(m, "dispatcher")]

    def step(self) -> dict[str, float]:
        if not self._checked:   # DDP/FSDP need every parameter in the graph; say which are not
            self._checked = True
            idle = [n for p, n in self.names.items() if p.grad is None]
            if idle:
                from rapid.errors import UserError
                raise UserError(f"parameters that get no gradient: {', '.join(idle[:4])}; every parameter must "
                                "be in the graph under data parallelism",
                                hint="e.g. a router gate with gate_weights = \"one\" and no router loss: add "
                                     "load_balance or z_loss to [loss]")
        stats = super().step()
        if self.ep:   # payload sent to other ranks: forward all-to-alls and as much again in backward
            counted = sum(d.bytes_sent for d in self._dispatchers())   # recomputation included
            stats["all_to_all_bytes"] = int(counted * (1.5 if self.activation_checkpoint else 2))
        return stats

    def grad_norm_squared(self, params: list) -> Tensor:
        experts = set(self.expert_params)
        local, sharded, expert = [torch.zeros((), device=self.device) for _ in range(3)]
        for p in params:
            g = p.grad
            if hasattr(g, "to_local"):
                sharded += g.to_local().float().pow(2).sum()
            elif p in experts:
                expert += g.float().pow(2).sum()
            else:
                local += g.float().pow(2).sum()
        if dist.is_initialized():
            dist.all_reduce(sharded)
            if self.ep:
                dist.all_reduce(expert, group=self.ep.ep_group)
        return local + sharded + expert

    def global_view(self, name: str, tensor: Tensor) -> Tensor:
        if self.ep and is_expert_param(name, self.expert_names):
            return self.ep.global_view(tensor, self._experts[name.rsplit(".", 1)[0]])
        return tensor


def _expert_modules_by_name(model: nn.Module) -> dict:
    from rapid.builtin.parallel.single import canonical
    from rapid.moe import expert_modules
    return {canonical(n): m for n, m in expert_modules(model)}


class DDPEngine(DistributedEngine):
    def sync_gradients(self, enabled: bool) -> None:
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self.model.require_backward_grad_sync = enabled


class ExpertParallelStrategy(ParallelStrategy):
    """Shared by the builtin multi-process strategies: the layout check and ``parallelize``."""
    ep: ExpertParallel | None = None

    def check(self, recipe) -> None:
        super().check(recipe)
        experts = recipe.model.experts_per_moe_layer() if hasattr(recipe.model, "experts_per_moe_layer") else []
        check_layout(self.config.expert_parallel, self.world_size, experts)

    def parallelize(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.config.expert_parallel > 1:
            self.ep = ExpertParallel(self.config.expert_parallel, device.type)
            self.ep.shard(model)
        if self.config.activation_checkpoint:
            apply_activation_checkpointing(model)
        return model

    def expert_param_names(self, model: nn.Module) -> list[str]:
        """Raw names (as ``model.named_parameters`` gives them) of the parameters EP shards."""
        from rapid.builtin.parallel.single import canonical
        names = list(_expert_modules_by_name(model))
        return [n for n, _ in model.named_parameters() if self.ep and is_expert_param(canonical(n), names)]


class TorchDDP(ExpertParallelStrategy):
    """torch DistributedDataParallel. fp32/bf16/fp16 (autocast, loss scaling), expert parallelism,
    activation checkpointing; one process works too (no wrapper)."""
    capabilities = frozenset({"fp32", "bf16", "fp16", "multiprocess", "expert_parallel", "activation_checkpoint"})

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, clip: float) -> Engine:
        device = next(model.parameters()).device
        module = model
        if dist.is_initialized() and dist.get_world_size() > 1:
            ignored = self.expert_param_names(model)
            if ignored:
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
            module = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                forward_sync_buffers=False, find_unused_parameters=False, gradient_as_bucket_view=True)
        optimizer, scheduler = make_optimizer(model)
        return DDPEngine(model, module, optimizer, scheduler, self.config, clip, device, ep=self.ep)


@hookimpl
def rapid_register_parallel():
    return {"torch": TorchDDP}
