"""``fairscale``: fairscale 0.4's ZeRO: the OSS sharded optimizer with ShardedDataParallel (or torch
DDP), and FullyShardedDataParallel on CUDA.

- OSS (``fairscale.optim.OSS``) wraps rapid's torch AdamW: each parameter's optimizer state lives on
  one rank (a greedy partition by size); that rank updates the parameter and broadcasts it. The
  AdamW groups (weight decay on matrices only) and the LambdaLR schedule are rapid's, rebuilt over OSS.
- ``zero_stage`` picks how gradients travel. 0 (unset) and 2: ShardedDataParallel reduces each
  gradient to the rank owning its optimizer state and frees it on the others (ZeRO-2; no reduce
  buckets, which would keep every rank's gradients of the parameters in them). 1: torch DDP
  all-reduces whole gradients, only optimizer states are sharded (ZeRO-1). 3: FullyShardedDataParallel
  (``flatten_parameters=False``: each of ``model.blocks`` and the rest one unit each), parameters
  sharded too; CUDA only (on CPU its wrapping and checkpoints are tested, not its training). Presets:
  ``fairscale_oss`` (1), ``fairscale_oss_sdp`` (2), ``fairscale_fsdp`` (3).
- The global gradient norm and clipping are fairscale's (``OSS.clip_grad_norm``: each rank's own
  gradients, all-reduced; FSDP's ``clip_grad_norm_``), so the skip of a step with a non-finite norm
  is the same on every rank. Gradient accumulation: the wrapper's ``no_sync()`` on every micro-batch
  but the last. fp16: fairscale's ShardedGradScaler (found-inf all-reduced over ranks).
- Activation checkpointing: fairscale's ``checkpoint_wrapper`` on each of ``model.blocks``.
- Checkpoints are layout-free like every strategy's: model tensors replicated under their full
  names, each rank giving the optimizer state of the parameters it owns (FSDP: shards gathered into
  whole tensors, and scattered back on load), so a fairscale run resumes under torch DDP or one
  process, and the reverse.

Refused before launch: one process (nothing to shard: use ``single``); ``expert_parallel`` > 1 (OSS
partitions and broadcasts parameters that every rank holds, expert-parallel experts differ per
rank); tensor parallelism; offload; and on CPU: ``zero_stage = 3`` (fairscale's FSDP gathers
parameters on CUDA streams: its forward fails with ``KeyError: 'all_gather'`` in
``_rebuild_full_params``) and fp16 (ShardedGradScaler disables itself without CUDA and all-reduces
its found-inf flag through ``.cuda()``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from rapid import hookimpl
from rapid.builtin.parallel.single import LocalEngine, _init_optimizer_state, canonical, persistent_buffers
from rapid.types import Engine, MakeOptimizer, ModelOutput, ParallelStrategy


class CheckpointedBlock(nn.Module):
    """A block under fairscale's ``checkpoint_wrapper``, which differentiates only the tensors a
    forward returns at the top level of a tuple: a MoE block's router losses sit inside its
    ``Routing``, so this forward returns them flat and a forward hook puts them back. The block is
    the child ``_checkpoint_wrapped_module`` (the prefix ``canonical`` drops, as torch's wrapper's)."""

    def __init__(self, block: nn.Module):
        from fairscale.nn.checkpoint import checkpoint_wrapper
        super().__init__()
        self._checkpoint_wrapped_module = block
        checkpoint_wrapper(self)                 # self.forward now recomputes in backward
        self.register_forward_hook(_regroup)

    def forward(self, *args):
        x_BSD, routing = self._checkpoint_wrapped_module(*args)
        if routing is None:
            return x_BSD, None
        losses, routing.losses = routing.losses, {}
        return (x_BSD, routing, tuple(losses), *losses.values())


def _regroup(module, args, out):
    """CheckpointedBlock's forward hook: the router losses back into the Routing."""
    x_BSD, routing, *rest = out
    if routing is not None:
        routing.losses = dict(zip(rest[0], rest[1:]))
    return x_BSD, routing


def apply_checkpoint_wrapper(model: nn.Module) -> None:
    """Recompute each of ``model.blocks`` in backward (fairscale's checkpoint_wrapper)."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = CheckpointedBlock(block)


class _AsDict(nn.Module):
    """The model with its output as a dict: FSDP hooks the backward of the output tensors it can see
    (in dicts, lists and tuples, not in dataclasses) to gather its parameters again."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return vars(self.model(batch))


class _AsOutput(nn.Module):
    """The FSDP root's dict as the ModelOutput the loop expects."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root = root

    def forward(self, batch):
        return ModelOutput(**self.root(batch))


class FairScaleEngine(LocalEngine):
    """``wrapper`` is what ``no_sync()`` and the global clip come from (ShardedDataParallel or DDP
    with OSS's clip, or the FSDP root); ``local`` is the optimizer holding this rank's state (OSS's
    shard optimizer, or AdamW over FSDP's shards). ``names`` are the parameter names before wrapping;
    ``shapes`` (FSDP) the whole shape of each sharded parameter."""

    def __init__(self, model, module, optimizer, scheduler, config, clip, device, *, wrapper, names, shapes=None):
        super().__init__(model, module, optimizer, scheduler, config, clip, device)
        self.wrapper, self.names, self.shapes = wrapper, names, shapes
        self.local = getattr(optimizer, "optim", optimizer)
        if config.precision == "fp16":
            from fairscale.optim.grad_scaler import ShardedGradScaler
            self.scaler = ShardedGradScaler()
        self._deferred = contextlib.ExitStack()     # no_sync() from a micro-batch's forward to its backward
        self._checked, self._shards = False, []

    def sync_gradients(self, enabled: bool) -> None:
        if not enabled:
            self._deferred.enter_context(self.wrapper.no_sync())

    def backward(self, loss: Tensor) -> None:
        super().backward(loss)
        self._deferred.close()

    def _owned(self) -> list:
        return [p for g in self.local.param_groups for p in g["params"]]

    def _check_every_param_has_grad(self) -> None:
        """Under data parallelism every parameter must be in the graph; every rank names the same ones."""
        idle = [self.names[p] for p in self._owned() if p.grad is None]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, idle)
        idle = sorted(n for part in everyone for n in part)
        if idle:
            from rapid.errors import UserError
            raise UserError(f"parameters that get no gradient: {', '.join(idle[:4])}; every parameter must "
                            "be in the graph under data parallelism",
                            hint="e.g. a router gate with gate_weights = \"one\" and no router loss: add "
                                 "load_balance or z_loss to [loss]")

    def step(self) -> dict[str, float]:
        if not self._checked:
            self._checked = True
            self._check_every_param_has_grad()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)       # its found-inf flag is all-reduced over ranks
        max_norm = self.clip if self.clip > 0 else math.inf
        clip_grad_norm = self.wrapper.clip_grad_norm_ if self.shapes is not None else self.optimizer.clip_grad_norm
        grad_norm = float(clip_grad_norm(max_norm))    # global: every rank skips alike
        skipped = not math.isfinite(grad_norm)         # the update is not applied, the schedule waits
        stats = {"lr": lr, "grad_norm": grad_norm, "skipped": skipped}
        if self.scaler:
            stats["loss_scale"] = self.scaler.get_scale()
            self.scaler.step(self.optimizer)           # skips the update on inf/nan gradients
            self.scaler.update()
        elif not skipped:
            self.optimizer.step()                      # OSS: each rank its shard, then broadcasts
        if not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    # ---- checkpoints
    def _whole(self, p, t: Tensor) -> Tensor:
        """FSDP: this rank's flat (padded) shard ``t`` of parameter ``p``'s tensor -> the whole tensor,
        remembered to be scattered back after a load."""
        if self.shapes is None or t.dim() == 0:
            return t
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        whole = torch.cat(parts)[: self.shapes[p].numel()].view(self.shapes[p])
        self._shards.append((t, whole))
        return whole

    @torch.no_grad()
    def _scatter(self) -> None:
        """FSDP: shard r of a tensor is chunk r of it flattened, padded to ceil(numel / world)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        for t, whole in self._shards:
            n = t.numel()
            t.copy_(F.pad(whole.flatten(), (0, n * world - whole.numel()))[rank * n:(rank + 1) * n].view_as(t))

    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict]:
        _init_optimizer_state(self.local)
        self._shards = []
        tensors = {**persistent_buffers(self.inner),
                   **{f"model.{name}": self._whole(p, p.detach()) for p, name in self.names.items()}}
        for p in self._owned():
            for key, value in self.local.state[p].items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{self.names[p]}.{key}"] = self._whole(p, value)
        return tensors, {**self.schedule_state(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_extra_state(self, extra: dict) -> None:
        self._scatter()
        super().load_extra_state(extra)


class FairScale(ParallelStrategy):
    """fairscale: OSS + ShardedDataParallel (zero_stage 0 or 2), OSS + torch DDP (1), FSDP (3, CUDA).
    fp32/bf16 (autocast), fp16 on CUDA (ShardedGradScaler), activation checkpointing."""
    capabilities = frozenset({"fp32", "bf16", "fp16", "multiprocess", "zero1", "zero2", "zero3",
                              "activation_checkpoint"})
    presets = {"fairscale_oss": {"zero_stage": 1}, "fairscale_oss_sdp": {"zero_stage": 2},
               "fairscale_fsdp": {"zero_stage": 3}}
    requires = ("fairscale", "fairscale")

    def check(self, recipe) -> None:
        super().check(recipe)
        from rapid.errors import UserError
        c = self.config
        if self.world_size < 2:
            raise UserError(f"parallel strategy {self.name!r} shards the optimizer over processes; one process "
                            "has nothing to shard", hint="run with --nproc 2 or more, or use parallel.name=single")
        if self.device(recipe.run.device).type == "cuda":
            return
        if c.zero_stage == 3:
            raise UserError("fairscale's FullyShardedDataParallel (zero_stage=3) needs CUDA: it gathers parameters "
                            "on CUDA streams (on CPU its forward fails with KeyError: 'all_gather')",
                            hint="zero_stage = 2 (OSS + ShardedDataParallel) runs on CPU; parallel.name=fsdp "
                                 "(torch FSDP2) shards parameters on CPU")
        if c.precision == "fp16":
            raise UserError("fairscale's ShardedGradScaler needs CUDA for fp16: without it it disables loss scaling "
                            "and all-reduces its found-inf flag through .cuda()",
                            hint="use precision = \"bf16\" (no loss scaling needed), or parallel.name=torch for fp16")

    def memory_plan(self, counts: dict[str, int]) -> dict[str, int]:
        """fp32 weights and gradients and AdamW's two fp32 states (autocast), divided as the stage
        divides them (OSS's partition is by whole parameters: about 1 / world each)."""
        n, world, stage = counts["params_dense"] + counts["params_expert"], self.world_size, self.config.zero_stage
        return {"params": 4 * n // (world if stage == 3 else 1),
                "grads": 4 * n // (world if stage != 1 else 1),
                "optimizer": 8 * n // world}

    def parallelize(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.config.activation_checkpoint:
            apply_checkpoint_wrapper(model)
        return model

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, clip: float) -> Engine:
        device = next(model.parameters()).device
        names = {p: canonical(n) for n, p in model.named_parameters()}
        args = (self.config, clip, device)
        if self.config.zero_stage == 3:
            from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP
            # flatten_parameters=False shards each parameter in place: rapid's AdamW groups stay valid
            optimizer, scheduler = make_optimizer(model)
            shapes = {p: p.shape for p in model.parameters()}
            for i, block in enumerate(model.blocks):
                model.blocks[i] = FSDP(block, flatten_parameters=False)
            root = FSDP(_AsDict(model), flatten_parameters=False)
            return FairScaleEngine(model, _AsOutput(root), optimizer, scheduler, *args, wrapper=root, names=names,
                                   shapes=shapes)
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim import OSS
        base, schedule = make_optimizer(model)   # rapid's AdamW groups and LR schedule, rebuilt over OSS
        groups = [{**{k: v for k, v in g.items() if k != "initial_lr"}, "lr": g["initial_lr"]}
                  for g in base.param_groups]    # every group carries all of AdamW's settings
        optimizer = OSS(groups, optim=type(base))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_lambdas)
        if self.config.zero_stage == 1:
            module = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
            # (not static_graph: under the reentrant checkpoint it all-reduced before every gradient was in)
        else:
            # its wait for the reduces is queued from the first gradient hook, the final norm's or head's:
            # outside the checkpointed blocks, so it runs at the end of the whole backward
            module = ShardedDataParallel(model, optimizer, broadcast_buffers=False, reduce_buffer_size=0,
                                         warn_on_trainable_params_changed=False)
        return FairScaleEngine(model, module, optimizer, scheduler, *args, wrapper=module, names=names)


@hookimpl
def rapid_register_parallel():
    return {"fairscale": FairScale}
