"""Expert parallelism over torch.distributed, for every strategy that declares ``expert_parallel``.

Ranks form a grid of ``dp_experts x ep`` (rank = i * ep + j): the ``ep`` consecutive ranks of a row
share one copy of every expert, each holding ``E / ep`` of them (rank j: experts j*E/ep ..); the
ranks of a column hold the same experts and are that expert's data-parallel replicas. Tokens travel
to the rank that holds their expert and back through two all-to-alls with uneven splits
(``AllToAllDispatcher``). An expert's gradient is summed over its replicas and divided by the world
size: every rank's loss is a mean over its own tokens, so this is the gradient of the mean over all
tokens, the same a single process computes. Capacity stays per rank (each router sees its own
tokens), as in DeepSpeed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rapid.errors import UserError
from rapid.moe import Dispatcher, Experts, MoE


def check_layout(ep: int, world: int, experts_per_layer: list[int]) -> None:
    """Refuse (before launch) an expert-parallel size that cannot divide the world or a layer."""
    if world % ep:
        raise UserError(f"[parallel] expert_parallel={ep} does not divide the world size {world}",
                        hint=f"use --nproc as a multiple of {ep}, or an expert_parallel that divides {world}")
    bad = sorted({e for e in experts_per_layer if e % ep})
    if bad:
        raise UserError(f"[parallel] expert_parallel={ep} does not divide the expert count of every MoE layer "
                        f"({', '.join(map(str, bad))} experts)",
                        hint="expert_parallel must divide every entry of [model] experts")


class ExpertParallel:
    """The process groups of one expert-parallel layout (every rank builds all of them)."""

    def __init__(self, ep: int, device_type: str):
        from torch.distributed.device_mesh import DeviceMesh
        self.world, self.rank, self.ep = dist.get_world_size(), dist.get_rank(), ep
        self.replicas = self.world // ep
        self.ep_rank = self.rank % ep
        grid = torch.arange(self.world).view(self.replicas, ep)   # every rank builds every group
        self.mesh = DeviceMesh(device_type, grid, mesh_dim_names=("expert_replicas", "ep"))
        self.ep_group, self.replica_group = self.mesh.get_group("ep"), self.mesh.get_group("expert_replicas")

    def shard(self, model: nn.Module) -> None:
        """Keep this rank's experts in every MoE layer and route tokens to the others' (on meta)."""
        for module in model.modules():
            if isinstance(module, MoE):
                experts = module.experts
                count = experts.num_experts // self.ep
                experts.shard(self.ep_rank * count, count)
                module.dispatcher = AllToAllDispatcher(module.dispatcher.kernels, self)

    def reduce_expert_grads(self, params: list[Tensor]) -> None:
        """Sum each expert's gradient over its replicas, divide by the world size."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        if self.replicas > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.replica_group)
            for g, new in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(new)
        torch._foreach_div_(grads, float(self.world))

    def global_view(self, local: Tensor, experts: Experts):
        """An expert parameter (or its optimizer state) as a DTensor over all experts, for
        torch.distributed.checkpoint: keyed by name, each expert at its global index."""
        from torch.distributed.tensor import DTensor, Replicate, Shard
        shape = (experts.num_experts, *local.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, [Replicate(), Shard(0)], run_check=False, shape=shape,
                                  stride=stride)


class AllToAllDispatcher(Dispatcher):
    """permute by global expert -> all-to-all rows to the experts' ranks -> regroup by local expert;
    and back. Rows per expert travel as a tensor; the split sizes of the all-to-all are the one
    host synchronisation (as in DeepSpeed and Megatron)."""

    def __init__(self, kernels, ep: ExpertParallel):
        super().__init__(kernels)
        self.ep = ep
        self.bytes_sent = 0    # rows this rank sent to other ranks in forward all-to-alls (backward: as many)

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, experts: Experts, order=None):
        from torch.distributed._functional_collectives import all_to_all_single_autograd
        ep, group = self.ep.ep, self.ep.ep_group
        x_ND, perm = self.kernels.permute(x_TD, expert_ids_TK, experts.num_experts, order)
        send_RE = perm.counts_E.view(ep, experts.count)           # rows for each rank's experts
        recv_RE = torch.empty_like(send_RE)
        dist.all_to_all_single(recv_RE, send_RE, group=group)     # rows each rank sends my experts
        splits = send_RE.sum(1).tolist(), recv_RE.sum(1).tolist()
        x_recv = all_to_all_single_autograd(x_ND, splits[1], splits[0], group)
        # received rows are grouped by (source rank, local expert): regroup by (local expert, source)
        block = torch.repeat_interleave(torch.arange(recv_RE.numel(), device=x_ND.device), recv_RE.reshape(-1))
        order = torch.argsort((block % experts.count) * ep + block // experts.count, stable=True)
        row = x_ND.shape[1] * x_ND.element_size()
        me = self.ep.ep_rank
        self.bytes_sent += (sum(splits[0]) - splits[0][me] + sum(splits[1]) - splits[1][me]) * row  # there and back
        return x_recv.index_select(0, order), recv_RE.sum(0), (perm, order, splits)

    def combine(self, y_ND: Tensor, ctx, weights_TK: Tensor) -> Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd
        perm, order, (sent, received) = ctx
        y_recv = y_ND.index_select(0, torch.argsort(order))
        y_back = all_to_all_single_autograd(y_recv, sent, received, self.ep.ep_group)
        return self.kernels.unpermute(y_back, perm, weights_TK)
