"""``single``: one process, one device. The reference implementation of the engine interface that
every other backend (DDP, DeepSpeed, FairScale, Megatron) implements too."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from rapid import hookimpl
from rapid.errors import UserError
from rapid.types import Engine, MakeOptimizer, ParallelConfig, ParallelStrategy

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SingleEngine(Engine):
    def __init__(self, model: nn.Module, optimizer, scheduler, precision: str, clip: float, device):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.precision, self.clip, self.device = precision, clip, device
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> dict[str, float]:
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.clip if self.clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        skipped = not math.isfinite(grad_norm)   # the update is not applied, the schedule waits
        stats = {"lr": lr, "grad_norm": grad_norm, "skipped": skipped}
        if self.scaler:
            stats["loss_scale"] = self.scaler.get_scale()
            self.scaler.step(self.optimizer)      # skips the update itself on inf/nan gradients
            self.scaler.update()
        elif not skipped:
            self.optimizer.step()
        if not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class Single(ParallelStrategy):
    @dataclass
    class Config(ParallelConfig):
        pass

    capabilities = frozenset({"fp32", "bf16", "fp16"})

    def check(self, recipe) -> None:
        if self.config.precision not in self.capabilities:
            raise UserError(f"parallel strategy 'single' does not support precision {self.config.precision!r}")

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, clip: float) -> Engine:
        device = next(model.parameters()).device
        optimizer, scheduler = make_optimizer(model)
        return SingleEngine(model, optimizer, scheduler, self.config.precision, clip, device)


@hookimpl
def rapid_register_parallel():
    return {"single": Single}
