"""``megatron``: tensor parallelism with megatron-core (``parallel_state`` and its column/row-parallel
linear layers), combined with data parallelism and rapid's expert parallelism.

Layout (megatron's rank order, tensor-parallel fastest): rank = t + tp * d. The ``tp`` ranks of a
tensor-parallel group read the same data; the ``world / tp`` groups are data-parallel replicas.

- Attention and the dense MLPs are split Megatron-style: the fused qkv projection and ``fc`` become
  ``ColumnParallelLinear`` (each rank computes ``heads / tp`` whole heads: the model lays qkv out
  head by head), the output projections ``RowParallelLinear`` (partial outputs all-reduced over the
  tensor-parallel group). The experts are not split: rapid's MoE layer runs on every rank of the
  group (megatron-core's MoE layer needs CUDA); with ``expert_parallel`` they are spread over the
  data-parallel ranks instead (``ep`` must divide ``world / tp``).
- Initialisation equals one process's: the loop initialises the whole model on every rank; ``wrap``
  hands each full weight to megatron as its master weight, which megatron splits (its CPU
  initialisation path, ``use_cpu_initialization``), so each rank holds its slice of those values.
- Gradients of everything but the experts are averaged over the data-parallel group by torch DDP
  over megatron's data-parallel group (megatron-core's own DistributedDataParallel allocates its
  buffers on CUDA: "AssertionError: Torch not compiled with CUDA enabled"); experts as under
  ``torch``. The global gradient norm sums the squares of tensor-parallel shards over the group and
  counts replicated gradients once; every rank then takes the largest of the ranks' norms, so all
  clip by the same factor and skip a non-finite step alike.
- Random streams: the ranks of a tensor-parallel group share one (its first rank's), as they
  compute the replicated parts (dropout outside attention, random token drops) together.
- Checkpoints are layout-free: split weights and their optimizer states are presented under their
  original names as DTensors of their full shape (column-parallel ``Shard(0)``, row-parallel
  ``Shard(1)``), so a TP=2 checkpoint resumes in one process or under ``torch`` and the reverse.
- Mixed precision is autocast over fp32 weights. megatron's linear autograd function declares its
  autocast behaviour for CUDA only (``custom_fwd(device_type="cuda")``): under CPU autocast its
  backward fails ("expected m1 and m2 to have the same dtype, but got: c10::BFloat16 != float"),
  so on CPU the input and weight are cast to the autocast dtype before it, as autocast would.

Refused before launch: a ``tensor_parallel`` that does not divide the world size or the model's
heads and hidden; ``expert_parallel`` that does not divide the data-parallel size (TP=2 with EP=2
needs 4 processes); ``sequence_parallel`` and ``rng_tracker`` (megatron's CUDA RNG tracker,
``model_parallel_cuda_manual_seed``) on CPU, where megatron allocates their buffers and states on
CUDA; on CUDA too, since this backend does not implement them yet (sequence parallelism needs the
model's non-parallel regions split along the sequence; the tracker needs the attention dropout
forked and replayed under activation checkpointing).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from rapid import hookimpl
from rapid.builtin.parallel.ddp import DDPEngine, ExpertParallelStrategy
from rapid.builtin.parallel.expert import ExpertParallel, check_layout
from rapid.builtin.parallel.single import apply_activation_checkpointing
from rapid.errors import UserError
from rapid.moe import MLP
from rapid.types import Engine, MakeOptimizer, ParallelConfig


@dataclass
class Config(ParallelConfig):
    sequence_parallel: bool = False   # megatron's sequence parallelism (CUDA only; not implemented)
    rng_tracker: bool = False         # megatron's CUDA RNG tracker for dropout in split regions (CUDA only)


def _megatron():
    """megatron.core's parallel_state and tensor_parallel (imported on first use; its notice that
    Transformer Engine / Apex are missing and it falls back to torch is expected here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core import parallel_state, tensor_parallel
    return parallel_state, tensor_parallel


@functools.cache
def _layers():
    """megatron's column/row-parallel linears as drop-in ``nn.Linear``s: forward returns the output
    (megatron returns ``(output, bias)``); under CPU autocast the matmul's operands are cast first."""
    _, tp = _megatron()

    def forward_impl(self, input, weight, *args, **kwargs):
        if input.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            input, weight = input.to(dtype), weight.to(dtype)
        return super(type(self), self)._forward_impl(input, weight, *args, **kwargs)

    def forward(self, x):
        return super(type(self), self).forward(x)[0]

    members = {"_forward_impl": forward_impl, "forward": forward}
    return (type("ColumnParallel", (tp.ColumnParallelLinear,), members),
            type("RowParallel", (tp.RowParallelLinear,), members))


class TPExpertParallel(ExpertParallel):
    """Expert parallelism over the data-parallel ranks: rank = t + tp * (o * ep + i), the ``ep``
    ranks that share (t, o) hold one copy of the experts between them; tensor-parallel peers hold
    the same experts and see the same tokens (their duplicate gradients are summed with the other
    replicas' and divided by the world size, which counts them as often)."""

    def __init__(self, ep: int, tp: int, device_type: str):
        from torch.distributed.device_mesh import DeviceMesh
        self.world, self.rank, self.ep = dist.get_world_size(), dist.get_rank(), ep
        self.replicas, self.ep_rank = self.world // ep, (self.rank // tp) % ep
        grid = torch.arange(self.world).view(self.world // tp // ep, ep, tp).permute(2, 0, 1).reshape(-1, ep)
        self.mesh = DeviceMesh(device_type, grid, mesh_dim_names=("expert_replicas", "ep"))
        self.ep_group, self.replica_group = self.mesh.get_group("ep"), self.mesh.get_group("expert_replicas")


class MegatronEngine(DDPEngine):
    """DDP over the data-parallel group, plus what tensor parallelism changes: the gradient norm,
    the checkpoint views of split weights and a random stream shared by the tensor-parallel group."""

    def __init__(self, *args, tp_mesh=None, **kw):
        super().__init__(*args, **kw)
        self.tp_mesh = tp_mesh
        self.tp_group = tp_mesh.get_group("tp") if tp_mesh else None
        # megatron marks the parameters it split: tensor_model_parallel, partition_dim
        self.tp_dims = {name: p.partition_dim for p, name in self.names.items()
                        if getattr(p, "tensor_model_parallel", False)}
        self._rng_shared = tp_mesh is None

    def forward(self, batch):
        if not self._rng_shared:   # after a resume's reseeding: adopt the group's first rank's streams
            self._rng_shared = True
            states = [torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None]
            dist.broadcast_object_list(states, group=self.tp_group, group_src=0)
            torch.set_rng_state(states[0])
            if states[1] is not None:
                torch.cuda.set_rng_state(states[1])
        return super().forward(batch)

    def grad_norm_squared(self, params: list) -> torch.Tensor:
        experts = set(self.expert_params)
        local, split, expert = [torch.zeros((), device=self.device) for _ in range(3)]
        for p in params:
            square = p.grad.float().pow(2).sum()
            if getattr(p, "tensor_model_parallel", False):
                split += square
            elif p in experts:
                expert += square
            else:
                local += square
        if not dist.is_initialized():
            return local + split + expert
        dist.all_reduce(split, group=self.tp_group)
        if self.ep:
            dist.all_reduce(expert, group=self.ep.ep_group)
        total = local + split + expert
        dist.all_reduce(total, op=dist.ReduceOp.MAX)   # one norm everywhere: same clipping, same skip
        return total

    def global_view(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        dim = self.tp_dims.get(name)
        if dim is None:
            return super().global_view(name, tensor)
        from torch.distributed.tensor import DTensor, Replicate, Shard
        shape = list(tensor.shape)
        shape[dim] *= self.tp_mesh.size(1)
        return DTensor.from_local(tensor, self.tp_mesh, [Replicate(), Shard(dim)], run_check=False,
                                  shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())


class Megatron(ExpertParallelStrategy):
    """megatron-core tensor parallelism (attention and dense MLPs) with data and expert parallelism.
    fp32/bf16/fp16 (autocast over fp32 weights, loss scaling), activation checkpointing."""
    Config = Config
    capabilities = frozenset({"fp32", "bf16", "fp16", "multiprocess", "tensor_parallel", "expert_parallel",
                              "activation_checkpoint"})
    presets = {"megatron_tp2": {"tensor_parallel": 2}}
    requires = ("megatron.core", "megatron")
    tp_params = 0             # parameters tensor parallelism splits (from the recipe's model, in check)
    tp_mesh = None

    def check(self, recipe) -> None:
        super(ExpertParallelStrategy, self).check(recipe)   # capabilities; the EP layout is checked below
        c, world, model = self.config, self.world_size, recipe.model
        tp, ep = c.tensor_parallel, c.expert_parallel
        for key in ("sequence_parallel", "rng_tracker"):
            if getattr(c, key):
                cuda = self.device(recipe.run.device).type == "cuda"
                why = ("this backend does not implement it yet" if cuda else
                       "megatron-core allocates its buffers and RNG states on CUDA and this run is on the CPU")
                raise UserError(f"megatron: [parallel] {key} = true is not supported: {why}",
                                hint=f"set [parallel] {key} = false; tensor_parallel works without it")
        if world % tp:
            raise UserError(f"[parallel] tensor_parallel={tp} does not divide the world size {world}",
                            hint=f"use --nproc as a multiple of {tp}")
        if tp > 1:
            if not all(hasattr(model, k) for k in ("heads", "hidden", "layers", "ffn_mult")):
                raise UserError(f"megatron: tensor parallelism splits attention heads and MLPs; the model "
                                f"{recipe.names['model']!r} has no heads / hidden / ffn_mult",
                                hint="use the gpt_moe model, or tensor_parallel = 1")
            if model.heads % tp or model.hidden % tp:
                raise UserError(f"[parallel] tensor_parallel={tp} must divide [model] heads={model.heads} and "
                                f"hidden={model.hidden} (each rank computes whole heads)",
                                hint="use a tensor_parallel that divides the number of heads")
            moe = model.moe_layers()
            mlps = model.layers - len(moe) + (len(moe) if getattr(model, "residual", False) else 0)
            self.tp_params = model.layers * 4 * model.hidden ** 2 + mlps * 2 * model.hidden ** 2 * model.ffn_mult
        dp = world // tp
        if dp % ep:
            raise UserError(f"[parallel] expert_parallel={ep} must divide the data-parallel size world / "
                            f"tensor_parallel = {world} / {tp} = {dp}: experts are spread over ranks that see "
                            "different data", hint=f"use --nproc {tp * ep} (or a multiple), or expert_parallel "
                                                   "that divides the data-parallel size")
        experts = model.experts_per_moe_layer() if hasattr(model, "experts_per_moe_layer") else []
        check_layout(ep, dp, experts)

    def data_parallel(self) -> tuple[int, int]:
        from rapid.dist import env
        tp = self.config.tensor_parallel
        return env().rank // tp, self.world_size // tp

    def memory_plan(self, counts: dict[str, int]) -> dict[str, int]:
        c = self.config
        n = (counts["params_dense"] - self.tp_params + self.tp_params // c.tensor_parallel
             + counts["params_expert"] // c.expert_parallel)
        return {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n}

    def parallelize(self, model: nn.Module, device: torch.device) -> nn.Module:
        c = self.config
        if dist.is_initialized():
            from torch.distributed.device_mesh import DeviceMesh
            ps, _ = _megatron()
            if ps.model_parallel_is_initialized():   # left over by an earlier run in this process
                ps.destroy_model_parallel()
            ps.initialize_model_parallel(tensor_model_parallel_size=c.tensor_parallel,
                                         create_gloo_process_groups=False)
            rank, tp = dist.get_rank(), c.tensor_parallel
            if (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()) != (rank % tp, rank // tp):
                raise RuntimeError(f"megatron placed rank {rank} at tp rank {ps.get_tensor_model_parallel_rank()}, "
                                   f"dp rank {ps.get_data_parallel_rank()}; rapid expects rank = t + tp * d")
            self.tp_mesh = DeviceMesh(device.type, torch.arange(self.world_size).view(-1, tp),
                                      mesh_dim_names=("dp", "tp"))
            if c.expert_parallel > 1:
                self.ep = TPExpertParallel(c.expert_parallel, tp, device.type)
                self.ep.shard(model)
        if c.activation_checkpoint:
            apply_activation_checkpointing(model)
        return model

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, clip: float) -> Engine:
        device = next(model.parameters()).device
        module = model
        if self.tp_mesh is not None:
            ps, _ = _megatron()
            if self.config.tensor_parallel > 1:
                self._split(model, device)
            if ps.get_data_parallel_world_size() > 1:
                ignored = self.expert_param_names(model)
                if ignored:
                    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
                module = nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None,
                    process_group=ps.get_data_parallel_group(), forward_sync_buffers=False,
                    find_unused_parameters=False, gradient_as_bucket_view=True)
        optimizer, scheduler = make_optimizer(model)
        return MegatronEngine(model, module, optimizer, scheduler, self.config, clip, device, ep=self.ep,
                              tp_mesh=self.tp_mesh)

    @torch.no_grad()
    def _split(self, model: nn.Module, device: torch.device) -> None:
        """Replace attention's qkv/proj and every dense MLP's fc/proj by megatron's parallel linears
        holding this rank's slice of the (initialised, full) weights."""
        from megatron.core.model_parallel_config import ModelParallelConfig
        tp = self.config.tensor_parallel
        config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                     perform_initialization=True, params_dtype=torch.float32)
        column, row = _layers()
        rank = _megatron()[0].get_tensor_model_parallel_rank()
        if device.type == "cpu":   # advice for CUDA streams, given at every forward
            warnings.filterwarnings("ignore", message="When using async grad allreduce")

        def split(linear: nn.Linear, parallel: str) -> nn.Module:
            full = linear.weight.detach()
            master = lambda w: w.copy_(full)   # noqa: E731  megatron splits the master weight itself
            common = dict(bias=linear.bias is not None, config=config, init_method=master)
            sizes = linear.in_features, linear.out_features
            new = (column(*sizes, gather_output=False, **common) if parallel == "column"
                   else row(*sizes, input_is_parallel=True, skip_bias_add=False, **common))
            if linear.bias is not None:   # column-parallel: a slice; row-parallel: whole (added after the sum)
                new.bias.copy_(linear.bias.chunk(tp)[rank] if parallel == "column" else linear.bias)
            return new.to(device)

        split_any = False
        for module in model.modules():
            if isinstance(module, MLP):
                module.fc, module.proj = split(module.fc, "column"), split(module.proj, "row")
            elif hasattr(module, "qkv") and hasattr(module, "heads"):   # fused qkv laid out [heads, 3, head_dim]
                module.qkv, module.proj = split(module.qkv, "column"), split(module.proj, "row")
                module.heads //= tp
                split_any = True
        if not split_any:
            raise UserError("megatron: the model has no attention module with a fused `qkv` and `heads` to split",
                            hint="use the gpt_moe model, or tensor_parallel = 1")

    def close(self) -> None:
        """Reset megatron's global parallel state (the run is over)."""
        if self.tp_mesh is not None:
            _megatron()[0].destroy_model_parallel()
            self.tp_mesh = None


@hookimpl
def rapid_register_parallel():
    return {"megatron": Megatron}
