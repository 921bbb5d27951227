"""``single``: one process, one device; and ``LocalEngine``, the engine every builtin strategy uses.

``LocalEngine`` owns what does not depend on how gradients travel: autocast, fp16 loss scaling,
gradient accumulation, clipping on the global norm, skipping non-finite steps, and the checkpoint
state keyed by parameter name. Strategies subclass it to synchronise gradients (DDP, FSDP) and to
present sharded tensors to the checkpoint (expert parallelism).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rapid import hookimpl
from rapid.moe import expert_modules
from rapid.types import Batch, Engine, MakeOptimizer, ModelOutput, ParallelStrategy

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_AC_PREFIX = "_checkpoint_wrapped_module."


def canonical(name: str) -> str:
    """A parameter's name without wrapper prefixes (activation checkpointing, DDP, compile)."""
    name = name.replace(_AC_PREFIX, "")
    return name.removeprefix("module.").replace("_orig_mod.", "")


def persistent_buffers(model: nn.Module) -> dict[str, Tensor]:
    """The model's persistent buffers (a hash router's table) keyed ``model.<name>``: replicated on
    every rank, saved and restored in place with the parameters."""
    return {f"model.{canonical(f'{mod_name}.{name}' if mod_name else name)}": buf
            for mod_name, module in model.named_modules() for name, buf in module.named_buffers(recurse=False)
            if buf is not None and name not in module._non_persistent_buffers_set}


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each of ``model.blocks`` in backward (torch.utils.checkpoint, non-reentrant)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


class LocalEngine(Engine):
    """Model + optimizer on this rank. ``module`` is what the forward runs through (the model, or a
    wrapper of it); ``model`` is the unwrapped model (parameter names, checkpoints)."""

    def __init__(self, model: nn.Module, module: nn.Module, optimizer, scheduler, config, clip: float,
                 device: torch.device):
        self.inner, self.model = model, module
        self.optimizer, self.scheduler = optimizer, scheduler
        self.config, self.clip, self.device = config, clip, device
        self.precision, self.grad_accum = config.precision, config.grad_accum
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
        self.expert_names = [canonical(n) for n, _ in expert_modules(model)]
        self.names = {p: canonical(n) for n, p in model.named_parameters()}
        self._micro = 0

    # ---- one micro-batch
    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def forward(self, batch: Batch) -> ModelOutput:
        self.sync_gradients(self._micro == self.grad_accum - 1)
        self._micro = (self._micro + 1) % self.grad_accum
        with self.autocast():
            return self.model(batch)

    def sync_gradients(self, enabled: bool) -> None:
        """Whether the coming backward synchronises gradients across ranks (only the last one of a
        step's micro-batches needs to)."""

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    # ---- the optimizer step
    def reduce_gradients(self) -> None:
        """Gradients a wrapper does not reduce itself (expert parallelism)."""

    def grad_norm_squared(self, params: list) -> Tensor:
        """Sum of squares of the whole model's gradient; here every gradient is whole and local."""
        if not params:
            return torch.zeros(())
        grads = [p.grad for p in params]
        if _plain(grads):                    # one fused pass (torch's foreach ops take no DTensor mix)
            return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).pow(2).sum()
        return torch.stack([g.float().pow(2).sum() for g in grads]).sum()

    def step(self) -> dict[str, float]:
        lr = self.optimizer.param_groups[0]["lr"]
        self.reduce_gradients()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.inner.parameters() if p.grad is not None]
        grad_norm = float(self.grad_norm_squared(params).sqrt())
        skipped = not math.isfinite(grad_norm)   # the update is not applied, the schedule waits
        if not skipped and self.clip > 0 and grad_norm > self.clip:
            grads, scale = [p.grad for p in params], self.clip / (grad_norm + 1e-6)
            if _plain(grads):
                torch._foreach_mul_(grads, scale)
            else:
                for g in grads:
                    g.mul_(scale)
        stats = {"lr": lr, "grad_norm": grad_norm, "skipped": skipped}
        if self.scaler:
            stats["loss_scale"] = self.scaler.get_scale()
            # GradScaler checks this rank's gradients only; every rank must skip (and back off) alike
            for found_inf in self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values():
                found_inf.fill_(float(skipped))
            self.scaler.step(self.optimizer)      # skips the update on inf/nan gradients
            self.scaler.update()
        elif not skipped:
            self.optimizer.step()
        if not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    # ---- checkpoints
    def global_view(self, name: str, tensor: Tensor) -> Tensor:
        """How a (local) tensor of parameter ``name`` is presented to the checkpoint."""
        return tensor

    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict]:
        _init_optimizer_state(self.optimizer)
        tensors = persistent_buffers(self.inner)
        for p, name in self.names.items():
            tensors[f"model.{name}"] = self.global_view(name, p.detach())
            for key, value in self.optimizer.state[p].items():
                if isinstance(value, Tensor):
                    view = value if value.dim() == 0 else self.global_view(name, value)
                    tensors[f"optim.{name}.{key}"] = view
        return tensors, {**self.schedule_state(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def schedule_state(self) -> dict:
        """The JSON-able learning-rate state every engine checkpoints (``load_extra_state`` reads it)."""
        return {"lr": [g["lr"] for g in self.optimizer.param_groups],
                "initial_lr": [g.get("initial_lr") for g in self.optimizer.param_groups],
                "scheduler": self.scheduler.state_dict()}

    def load_extra_state(self, extra: dict) -> None:
        # every group follows one schedule: a layout with other groups (DeepSpeed's MoE groups) takes the first
        n = len(self.optimizer.param_groups)
        fit = lambda values: values if len(values) == n else values[:1] * n  # noqa: E731
        for group, lr, initial in zip(self.optimizer.param_groups, fit(extra["lr"]), fit(extra["initial_lr"])):
            group["lr"], group["initial_lr"] = lr, initial
        sched = dict(extra["scheduler"])
        for key in ("base_lrs", "_last_lr", "lr_lambdas"):
            if isinstance(sched.get(key), list):
                sched[key] = fit(sched[key])
        self.scheduler.load_state_dict(sched)
        if self.scaler and extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])


@torch.no_grad()
def _init_optimizer_state(optimizer) -> None:
    """Create the optimizer's lazily built state where it is missing (one step on zero gradients at
    lr 0, the way torch.distributed.checkpoint does it), so a checkpoint can be loaded in place."""
    missing = [p for g in optimizer.param_groups for p in g["params"] if not optimizer.state.get(p)]
    if not missing:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for p in missing:                  # only these step: the others' state (step counts) stays as it is
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def dist_sum(t: Tensor, group=None) -> Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t


class Single(ParallelStrategy):
    """One process. fp32, bf16 and fp16 (with dynamic loss scaling), activation checkpointing."""
    capabilities = frozenset({"fp32", "bf16", "fp16", "activation_checkpoint"})

    def parallelize(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.config.activation_checkpoint:
            apply_activation_checkpointing(model)
        return model

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, clip: float) -> Engine:
        device = next(model.parameters()).device
        optimizer, scheduler = make_optimizer(model)
        return LocalEngine(model, model, optimizer, scheduler, self.config, clip, device)


@hookimpl
def rapid_register_parallel():
    return {"single": Single}


def _plain(tensors: list[Tensor]) -> bool:
    """Plain tensors on one device: torch's foreach ops apply (not to DTensors or a device mix)."""
    return all(type(t) is Tensor for t in tensors) and len({t.device for t in tensors}) <= 1
