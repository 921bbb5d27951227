"""``deepspeed``: DeepSpeed's engine behind rapid's switches.

ZeRO stage 0/1/2 (optimizer states, then gradients, sharded over the data-parallel ranks) and 3
(parameters too: only for models without MoE layers, DeepSpeed refuses MoE with ZeRO-3); fp32, and
bf16 / fp16 in DeepSpeed's own mixed precision (16-bit module weights, fp32 master weights in the
optimizer, dynamic loss scaling for fp16); optimizer offload to host memory (the torch AdamW runs on
the host copies); activation checkpointing through ``deepspeed.checkpointing`` (reentrant, per
block). Expert parallelism goes through rapid's own dispatcher (``rapid.builtin.parallel.expert``),
not DeepSpeed's MoE layer: expert parameters are marked as DeepSpeed marks its own
(``allreduce = False``, ``group_name``), grouped with ``split_params_into_different_moe_groups_for_optimizer``
and reduced by ZeRO over DeepSpeed's expert-data-parallel groups, which are laid out like rapid's (with
ZeRO 1 or 2 only: DeepSpeed's non-ZeRO path averages expert gradients over their replicas and clips
with a norm averaged across ranks, which is refused).

The switches (micro_batch, grad_accum, zero_stage, offload, precision, the [optim] clip) own their
DeepSpeed keys (offload = false too: no optimizer offload); ``[parallel] config = "ds.json"`` adds
everything else from a DeepSpeed JSON, and a JSON key that contradicts a switch is refused, every
conflict named. rapid's [optim] table builds the optimizer (a torch AdamW, which also avoids
compiling FusedAdam) and the LR schedule, so the JSON may not have "optimizer" or "scheduler" blocks.
Checkpoints are rapid's layout-free format: fp32 master weights and Adam states per parameter,
gathered from ZeRO's flat partitions with DeepSpeed's ``safe_get_full_*`` and set back with
``safe_set_full_*`` (without ZeRO: the parameters' fp32 masters, DeepSpeed's copies in bf16/fp16), so
a DeepSpeed run resumes under torch DDP and the reverse. A step with non-finite gradients is skipped
on every rank, without ZeRO in fp32 too (where DeepSpeed itself would apply it).

On the CPU: DeepSpeed needs a process group even in one process (rapid creates a 1-process gloo
group: without RANK/WORLD_SIZE/MASTER_* DeepSpeed looks for mpi4py), and its first
``init_distributed`` compiles a shared-memory all-reduce op used only by inference kernels (~30 s);
rapid skips building it. ``close`` resets DeepSpeed's module globals and those variables.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rapid import hookimpl
from rapid.builtin.parallel.ddp import DistributedEngine, ExpertParallelStrategy
from rapid.builtin.parallel.single import persistent_buffers
from rapid.builtin.parallel.expert import ExpertParallel
from rapid.errors import UserError
from rapid.moe import MoE, is_expert_param
from rapid.types import Batch, Engine, MakeOptimizer, ModelOutput, ParallelConfig


# rapid's defaults for keys no switch owns (a user's JSON may change them)
DEFAULTS = {"zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,   # torch AdamW, offload too
            "steps_per_print": 2**62, "wall_clock_breakdown": False}


def ds_config(c, clip: float) -> dict:
    """The DeepSpeed keys the switches (and [optim] clip) own."""
    zero = {"stage": c.zero_stage, "offload_optimizer": {"device": "cpu" if c.offload else "none"}}
    return {"train_micro_batch_size_per_gpu": c.micro_batch, "gradient_accumulation_steps": c.grad_accum,
            "gradient_clipping": clip, "zero_optimization": zero,
            "bf16": {"enabled": c.precision == "bf16"},
            "fp16": {"enabled": c.precision == "fp16", "loss_scale": 0}}      # 0: dynamic loss scaling


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _merge(user: dict, own: dict, where: str, prefix: str = "") -> dict:
    """The switches' keys over the user's, block by block (where the switches have a block, so must the user)."""
    merged = dict(user)
    for key, value in own.items():
        if isinstance(value, dict):
            theirs = user.get(key, {})
            if not isinstance(theirs, dict):
                raise UserError(f"{where}: {prefix}{key} must be a JSON object (a block of settings), not "
                                f"{type(theirs).__name__} {json.dumps(theirs)}",
                                hint=f"write it as DeepSpeed's config reference does, e.g. \"{key}\": {{...}}")
            value = _merge(theirs, value, where, f"{prefix}{key}.")
        merged[key] = value
    return merged


def merged_config(c, clip: float, world: int) -> dict:
    """The switches' config plus the user's JSON (``c.config``); contradictions are refused."""
    own = ds_config(c, clip)
    own["train_batch_size"] = c.micro_batch * c.grad_accum * world
    if not c.config:
        return {**DEFAULTS, **own}
    path = Path(c.config)
    try:
        user = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"[parallel] config {c.config!r} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise UserError(f"[parallel] config {c.config!r} is not valid JSON: {exc}") from None
    if not isinstance(user, dict):
        raise UserError(f"[parallel] config {c.config!r} must hold a JSON object, not {type(user).__name__}")
    for block in ("optimizer", "scheduler"):
        if block in user:
            raise UserError(f"[parallel] config {c.config!r} has a {block!r} block; rapid's [optim] table sets the "
                            "optimizer and the LR schedule", hint=f"remove {block!r} from the JSON")
    mine, theirs = _flat(own), _flat(user)
    conflicts = [f"{k} = {theirs[k]!r} (the switches say {mine[k]!r})" for k in theirs if k in mine and theirs[k] != mine[k]]
    if conflicts:
        raise UserError(f"[parallel] config {c.config!r} contradicts the switches: {'; '.join(conflicts)}",
                        hint="leave these keys out of the JSON: [parallel] and [optim] set them")
    merged = _merge({**DEFAULTS, **user}, own, f"[parallel] config {c.config!r}")
    if "cpu_offload" in merged["zero_optimization"]:     # DeepSpeed's old spelling of offload_optimizer
        raise UserError(f"[parallel] config {c.config!r} has zero_optimization.cpu_offload; the offload switch owns "
                        "optimizer offload", hint="leave it out of the JSON and set [parallel] offload")
    return merged


class _DeepSpeedCheckpointed(nn.Module):
    """A block recomputed in backward by ``deepspeed.checkpointing`` (reentrant): the router's loss
    terms and statistics leave the checkpointed function as tensors, so they get gradients."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self._checkpoint_wrapped_module = block          # the name torch's wrapper uses: same parameter names

    def forward(self, x_BSD: Tensor, token_ids_T: Tensor, domain_ids_T: Tensor):
        import deepspeed
        from rapid.types import Routing
        keys: list = []

        def run(x):
            y, routing = self._checkpoint_wrapped_module(x, token_ids_T, domain_ids_T)
            if routing is None:
                return (y,)
            keys[:] = [("loss", k) for k in routing.losses] + [("stat", k) for k in routing.stats]
            return (y, *routing.losses.values(), *(torch.as_tensor(v, dtype=torch.float32) for v in routing.stats.values()))

        out = deepspeed.checkpointing.checkpoint(run, x_BSD)
        y, *rest = out if isinstance(out, tuple) else (out,)
        if not keys:
            return y, None
        losses = {k: v for (kind, k), v in zip(keys, rest) if kind == "loss"}
        stats = {k: v for (kind, k), v in zip(keys, rest) if kind == "stat"}
        return y, Routing(None, None, losses=losses, stats=stats)


# DeepSpeed's flat fp32 partitions, which its optimizers hand the torch AdamW: ZeRO-3, ZeRO 1/2, BF16_Optimizer
FLAT_FP32 = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")
# fp16's dynamic loss scaler (ZeRO: DynamicLossScaler; without: FP16_UnfusedOptimizer's LossScaleConfig, no hysteresis)
SCALER_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def scaler_state(scaler) -> dict:
    return {k: getattr(scaler, k) for k in SCALER_KEYS if hasattr(scaler, k)}


def load_scaler_state(scaler, state: dict) -> None:
    for key, value in state.items():
        setattr(scaler, key, value)


@torch.no_grad()
def _zero_adam_state(optimizer, tensors) -> None:
    """AdamW's state, zeros, for the fp32 tensors it has not stepped yet (a resume), as torch's AdamW
    (rapid's [optim]) creates it, so that a checkpoint loads in place. Not LocalEngine's fake step:
    DeepSpeed keeps gradient buffers on its partitions (offload), which that step's zero_grad would
    drop, and ZeRO-3 hands the optimizer its partitions only inside its own step."""
    for t in tensors:
        if not optimizer.state.get(t):
            optimizer.state[t] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(t),
                                  "exp_avg_sq": torch.zeros_like(t)}


class DeepSpeedEngine(DistributedEngine):
    """rapid's engine interface over a ``deepspeed.DeepSpeedEngine`` (which owns mixed precision,
    gradient reduction, clipping, loss scaling and the optimizer step)."""

    def __init__(self, model, ds, optimizer, scheduler, config, clip, device, ep=None):
        super().__init__(model, ds, optimizer, scheduler, config, clip, device, ep=ep)
        self.ds, self.scaler, self._template = ds, None, None
        opt = ds.optimizer          # DeepSpeed's wrapper of ``optimizer`` (the torch AdamW), or that itself
        # where the AdamW's fp32 weights live: flat partitions under ZeRO; without, one per parameter: the
        # parameter itself in fp32, DeepSpeed's fp32 copy in bf16/fp16 (FP16_UnfusedOptimizer's fp32_groups)
        self._flats = next((getattr(opt, a) for a in FLAT_FP32 if hasattr(opt, a)), None)
        self._masters = None
        if self._flats is None and opt is optimizer:
            self._masters = {p: p for p in self.names}
        elif self._flats is None:
            self._masters = {lp: hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
            # FP16_UnfusedOptimizer created the AdamW's state with a step on zero gradients (weight decay
            # applied to the masters, a step counted): undo it, as if the first step were the first
            opt.refresh_fp32_params()
            optimizer.state.clear()

    def autocast(self):
        import contextlib
        return contextlib.nullcontext()      # DeepSpeed casts the module itself

    def forward(self, batch: Batch) -> ModelOutput:
        return self.ds(batch)

    def backward(self, loss: Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)        # the loop already divided by grad_accum
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()                                 # DeepSpeed counts micro-steps in step()

    def step(self) -> dict[str, float]:
        lr = self.optimizer.param_groups[0]["lr"]
        skipped_before, opt = self.ds.skipped_steps, self.ds.optimizer
        # without ZeRO DeepSpeed keeps no norm in fp32: the gradients are whole, reduced and local here
        own = None if self.config.zero_stage else self.grad_norm_squared([p for p in self.names if p.grad is not None])
        bare = opt is self.optimizer
        if bare:
            # no ZeRO, fp32: DeepSpeed steps the bare AdamW whatever its gradients. It skips the schedule and
            # counts a skipped step when its optimizer reports an overflow (as its fp16/bf16 wrappers do):
            # report one when the norm is not finite on some rank, and make that step a no-op
            dist.all_reduce(own, op=dist.ReduceOp.MAX)
            opt.overflow = not torch.isfinite(own).item()
            if opt.overflow:
                opt.step = lambda closure=None: None
        try:
            self.ds.step()
        finally:
            if bare:
                vars(opt).pop("step", None)
        norm = self.ds.get_global_grad_norm() if own is None else own.sqrt()
        norm = float(norm) if norm is not None else float("nan")
        stats = {"lr": lr, "grad_norm": norm, "skipped": self.ds.skipped_steps > skipped_before}
        if self.config.precision == "fp16":
            stats["loss_scale"] = float(opt.loss_scale)
        return stats

    # ---- checkpoints: fp32 master weights and Adam states per parameter (gathered from ZeRO's partitions)
    def _loss_scaler(self):
        opt = self.ds.optimizer
        return opt.loss_scaler if hasattr(opt, "loss_scaler") else opt.loss_scale_config

    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        tensors, opt, state = persistent_buffers(self.inner), self.ds.optimizer, self.optimizer.state
        if self._masters is not None:      # no ZeRO (nor expert parallelism): the masters and states, in place
            _zero_adam_state(self.optimizer, self._masters.values())
            for p, name in self.names.items():
                master = self._masters[p]
                tensors[f"model.{name}"] = master
                tensors.update({f"optim.{name}.{key}": value for key, value in state[master].items()})
        else:
            _zero_adam_state(self.optimizer, self._flats)
            if hasattr(opt, "_hp_optimizer_states_linked"):
                # ZeRO 1/2 link each parameter's fragment of the states once, after the step of the first
                # parameter group (before the others have state) and not before a first step: link again
                opt._hp_optimizer_states_linked = False
                opt._lazy_init_hp_params_optimizer_state()
            step = next(s["step"] for s in state.values() if "step" in s).float().cpu()
            for p, name in self.names.items():    # gathered (collective), held on the host until a load
                tensors[f"model.{name}"] = self.global_view(name, safe_get_full_fp32_param(p).float().cpu())
                for key in ("exp_avg", "exp_avg_sq"):
                    full = safe_get_full_optimizer_state(p, key).float().cpu()
                    tensors[f"optim.{name}.{key}"] = self.global_view(name, full)
                tensors[f"optim.{name}.step"] = step.clone()
            self._template = tensors
        return tensors, {**self.schedule_state(),
                         "ds_scale": scaler_state(self._loss_scaler()) if self.config.precision == "fp16" else None}

    @torch.no_grad()
    def load_extra_state(self, extra: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        opt = self.ds.optimizer
        if self._masters is not None:      # the module's 16-bit weights from their masters, as after a step
            for p, master in self._masters.items():
                if p is not master:
                    p.copy_(master)
        elif self._template is not None:
            local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
            for p, name in self.names.items():
                safe_set_full_fp32_param(p, local(self._template[f"model.{name}"]))
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, local(self._template[f"optim.{name}.{key}"]), key)
            step = self._template[f"optim.{next(iter(self.names.values()))}.step"]
            for state in self.optimizer.state.values():
                state["step"].copy_(step)
            if hasattr(opt, "update_lp_params"):      # ZeRO 1/2, BF16_Optimizer: copy and gather the partitions
                opt.update_lp_params()
            else:                                    # ZeRO-3: the partitions, then its gathered small parameters
                opt.checkpoint_event_prologue()
                for lp, hp in zip(opt.fp16_partitioned_groups_flat, self._flats):
                    lp.copy_(hp)
                opt.checkpoint_event_epilogue()
            self._template = None
        if extra.get("ds_scale") and self.config.precision == "fp16":
            load_scaler_state(self._loss_scaler(), extra["ds_scale"])
        super().load_extra_state(extra)


class DeepSpeed(ExpertParallelStrategy):
    """DeepSpeed (ZeRO 0-3, fp32/bf16/fp16 with dynamic loss scaling, optimizer offload, expert
    parallelism through rapid's dispatcher, activation checkpointing through deepspeed.checkpointing)."""

    @dataclass
    class Config(ParallelConfig):
        config: str = ""      # a DeepSpeed JSON merged with the switches (which own their keys)

    capabilities = frozenset({"fp32", "bf16", "fp16", "multiprocess", "zero1", "zero2", "zero3", "offload",
                              "expert_parallel", "activation_checkpoint"})
    presets = {"deepspeed_zero1": {"zero_stage": 1}, "deepspeed_zero2": {"zero_stage": 2},
               "deepspeed_zero2_offload": {"zero_stage": 2, "offload": True},
               "deepspeed_zero3": {"zero_stage": 3}}
    requires = ("deepspeed", "deepspeed")
    autocast_weights = False          # its bf16/fp16 modes hold 16-bit weights (and fp32 masters)
    _environ: dict | None = None     # what wrap changed in os.environ: the values before

    def check(self, recipe) -> None:
        super().check(recipe)
        c = self.config
        moe = recipe.model.moe_layers() if hasattr(recipe.model, "moe_layers") else []
        if c.zero_stage == 3 and moe:
            raise UserError("DeepSpeed does not support MoE layers with ZeRO-3 (its engine refuses them)",
                            hint="zero_stage = 2 (gradients and optimizer states sharded), or parallel.name=fsdp "
                                 "to shard parameters too")
        if c.precision == "fp16" and not torch.cuda.is_available():
            raise UserError("DeepSpeed's CPU accelerator does not support fp16 (DeepSpeed: \"Type fp16 is not "
                            "supported on your device\")", hint="use precision = \"bf16\" on the CPU")
        if c.expert_parallel > 1 and c.zero_stage == 0:
            raise UserError("DeepSpeed without ZeRO does not reduce sharded experts exactly: it averages expert "
                            "gradients over their replicas only and clips with a norm averaged across ranks "
                            "(deepspeed.runtime.utils.clip_grad_norm_), not the global one",
                            hint="use zero_stage = 1 or 2 with expert_parallel (measured equal to one process)")
        if c.offload and c.zero_stage == 0:
            raise UserError("DeepSpeed offloads optimizer states only with ZeRO (zero_stage 1, 2 or 3)",
                            hint="set [parallel] zero_stage = 2 with offload = true")
        merged_config(c, recipe.optim.clip, self.world_size)   # the JSON: readable, an object, no conflicts

    def memory_plan(self, counts: dict[str, int]) -> dict[str, int]:
        """ZeRO (Rajbhandari et al.): 16-bit weights and gradients plus fp32 master + Adam (2+2+12 bytes
        per parameter) in mixed precision, 4+4+8 in fp32; stage 1 divides the optimizer states, 2 the
        gradients too, 3 the weights too, over the data-parallel ranks (experts: over their replicas,
        after expert parallelism divided them); offload moves the optimizer states to the host."""
        c, world = self.config, self.world_size
        w, g, o = (4, 4, 8) if c.precision == "fp32" else (2, 2, 12)
        dense, experts = counts["params_dense"], counts["params_expert"] // c.expert_parallel
        replicas = world // c.expert_parallel

        def part(n, dp, stage):
            return n // dp if c.zero_stage >= stage else n
        plan = {"params": w * (part(dense, world, 3) + part(experts, replicas, 3)),
                "grads": g * (part(dense, world, 2) + part(experts, replicas, 2)),
                "optimizer": 0 if c.offload else o * (part(dense, world, 1) + part(experts, replicas, 1))}
        return plan

    def parallelize(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.config.expert_parallel > 1:
            self.ep = ExpertParallel(self.config.expert_parallel, device.type)
            self.ep.shard(model)
        if self.config.activation_checkpoint:
            for i, block in enumerate(model.blocks):
                model.blocks[i] = _DeepSpeedCheckpointed(block)
        return model

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, clip: float) -> Engine:
        import importlib

        import deepspeed
        device = next(model.parameters()).device
        # an inference-only CPU all-reduce op (~30 s to compile) that training never uses; the module,
        # not `deepspeed.comm.torch`, which is the torch library imported in deepspeed.comm
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        self._environ = {}
        if not dist.is_initialized():             # one process: a 1-process group, without mpi4py discovery
            ours = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(_free_port())}
            self._environ = {key: os.environ.get(key) for key in ours}      # restored by close()
            os.environ.update(ours)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
        regroup = None
        if self.ep is not None:
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
            from deepspeed.utils import groups
            ep = self.config.expert_parallel
            if f"ep_size_{ep}" not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(ep)
            names = self.expert_param_names(model)
            for name, p in model.named_parameters():
                if name in names:   # ZeRO divides every gradient by the world size, experts too: the mean
                    p.allreduce, p.group_name = False, f"ep_size_{ep}"   # over all tokens, as in one process
            regroup = split_params_into_different_moe_groups_for_optimizer
        optimizer, scheduler = make_optimizer(model, regroup)
        engine_module = importlib.import_module("deepspeed.runtime.engine")
        ds_moe = engine_module.MoE
        if self.ep is not None:
            # DeepSpeed sets up expert-data-parallel reduction only when its engine finds a module of
            # its own MoE class (otherwise ZeRO fails: "TypeError: 'NoneType' object is not
            # subscriptable" in average_tensor); rapid's MoE blocks are shown to that one check
            engine_module.MoE = (ds_moe, MoE)
        try:
            ds, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler,
                config=merged_config(self.config, clip, dist.get_world_size()), dist_init_required=False)
        finally:
            engine_module.MoE = ds_moe
        return DeepSpeedEngine(model, ds, optimizer, scheduler, self.config, clip, device, ep=self.ep)

    def close(self) -> None:
        """DeepSpeed's module globals (its process groups, its communication backend) and the
        environment wrap set, as before: a next run in this process starts clean (the process
        group itself is the caller's to destroy)."""
        if self._environ is None:       # never wrapped
            return
        import importlib

        from deepspeed.utils import groups
        groups._release_process_group_references()          # what deepspeed.comm.destroy_process_group does
        importlib.import_module("deepspeed.comm.comm").cdb = None
        for key, value in self._environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._environ = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@hookimpl
def rapid_register_parallel():
    return {"deepspeed": DeepSpeed}
