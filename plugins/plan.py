"""The memory planner: ``rapid plan`` (parameter counts and per-device memory of a layout, computed
on the meta device: nothing is allocated, so a 16B model plans in a second), and the check that stops
``rapid run`` before allocating when the layout does not fit, naming one that would."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import typer

from rapid import hookimpl
from rapid.errors import UserError
from rapid.moe import count_params

GiB = 1024**3

# bytes per parameter: (weights, gradients, optimizer states) for AdamW
#   fp32: fp32 weights and grads, fp32 m and v
#   bf16/fp16 (DeepSpeed / Megatron mixed precision): 16-bit weights and grads, fp32 master + m + v
BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}


def zero_memory(params: int, precision: str, stage: int, dp: int) -> dict[str, int]:
    """Per-device bytes for model states under ZeRO ``stage`` over ``dp`` data-parallel ranks."""
    w, g, o = BYTES[precision]
    return {"params": params * w // (dp if stage >= 3 else 1),
            "grads": params * g // (dp if stage >= 2 else 1),
            "optimizer": params * o // (dp if stage >= 1 else 1)}


def activation_bytes(cfg, micro_batch: int, precision: str, checkpointing: bool = False) -> int:
    """Rough activation memory of one micro-batch (Korthikanti et al. 2022: ~34*S*B*D bytes per
    layer in 16-bit, plus the attention scores), plus fp32 logits. With activation checkpointing a
    layer keeps only its fp32 input, and one layer at a time is recomputed in full."""
    s, b, d, h = cfg.seq_len, micro_batch, cfg.hidden, cfg.heads
    per_layer = (s * b * d * 34 + 5 * h * s * s * b) * (2 if precision == "fp32" else 1)
    layers = cfg.layers * 4 * s * b * d + per_layer if checkpointing else cfg.layers * per_layer
    return layers + 2 * 4 * b * s * cfg.vocab_size


@dataclass
class Plan:
    params_total: int
    params_dense: int
    params_expert: int
    params_active: int
    precision: str
    world_size: int
    zero_dp: int                               # data-parallel size of the ZeRO table
    memory_planned: dict[str, int]             # this recipe's strategy, per device
    memory_by_zero_stage: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def layout_memory(recipe, registry, counts: dict, name: str, world: int, **switches) -> dict[str, int]:
    """Per-device bytes of strategy ``name`` on ``world`` processes with ``switches`` (other
    [parallel] keys as in the recipe)."""
    import dataclasses
    cls = registry.get("parallel", name)
    keys = {f.name for f in dataclasses.fields(cls.Config)}
    shared = {k: v for k, v in dataclasses.asdict(recipe.parallel).items() if k in keys}
    strategy = registry.strategy(name, cls.Config(**{**shared, **switches}), world)
    strategy.check(recipe)
    planned = strategy.memory_plan(counts)
    planned["activations"] = activation_bytes(recipe.model, strategy.config.micro_batch, strategy.config.precision,
                                              strategy.config.activation_checkpoint)
    planned["total"] = sum(planned.values())
    return planned


def meta_counts(recipe, registry) -> dict[str, int]:
    """Parameter counts of the recipe's model, built on the meta device (nothing allocated)."""
    from rapid.recipe import build_model
    try:
        with torch.device("meta"):
            model = build_model(recipe, registry)
    except (RuntimeError, OverflowError, MemoryError) as exc:   # sizes no tensor can have
        raise UserError(f"{recipe.path}: the model cannot be built with these sizes: {str(exc).splitlines()[0]}",
                        hint="check [model] vocab_size, seq_len, hidden, layers and experts") from None
    return count_params(model, getattr(recipe.model, "top_k", 1))


def make_plan(recipe, registry, world: int = 1, dp: int | None = None) -> Plan:
    """The plan of the recipe's strategy on ``world`` processes; ``dp`` sets the data-parallel size
    of the ZeRO table (default: ``world``)."""
    from rapid.recipe import build_model

    counts = meta_counts(recipe, registry)
    planned = layout_memory(recipe, registry, counts, recipe.names["parallel"], world)
    by_stage = {}
    for prec in ("fp32", "bf16"):
        for stage in range(4):
            mem = zero_memory(counts["params_total"], prec, stage, dp or world)
            by_stage[f"{prec}/zero{stage}"] = {**mem, "total": sum(mem.values())}
    return Plan(**counts, precision=recipe.parallel.precision, world_size=world, zero_dp=dp or world,
                memory_planned=planned, memory_by_zero_stage=by_stage)


def suggest_layout(recipe, registry, budget: int) -> str | None:
    """The smallest multi-process layout of the builtin strategies (with and without activation
    checkpointing) whose plan fits ``budget`` bytes per device, as ``rapid run`` options; None if
    none up to 512 devices does."""
    from rapid.errors import UserError
    counts = meta_counts(recipe, registry)
    experts = recipe.model.experts_per_moe_layer() if hasattr(recipe.model, "experts_per_moe_layer") else [1]
    for world in (2**i for i in range(10)):
        for name in ("fsdp", "torch"):
            for ep in sorted((d for d in range(1, world + 1) if world % d == 0), reverse=True):
                for ac in (False, True):
                    if any(e % ep for e in experts) or name not in registry.entries("parallel"):
                        continue
                    try:
                        need = layout_memory(recipe, registry, counts, name, world, expert_parallel=ep,
                                             activation_checkpoint=ac)["total"]
                    except UserError:
                        continue
                    if need <= budget:
                        return (f"--nproc {world} --set parallel.name={name} --set parallel.expert_parallel={ep}"
                                + (" --set parallel.activation_checkpoint=true" if ac else "")
                                + f" ({fmt_bytes(need)} per device)")
    return None


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return psutil.virtual_memory().available


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


def fmt_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


@hookimpl
def rapid_check_run(recipe, registry, world_size, device):
    """Stop before allocating when the layout's plan does not fit the device."""
    plan = make_plan(recipe, registry, world_size)
    need, have = plan.memory_planned["total"], available_memory(device)
    if need > have:
        fits = suggest_layout(recipe, registry, have if device.type == "cuda" else 80 * 10**9)
        raise UserError(
            f"this recipe needs about {fmt_bytes(need)} per device ({plan.params_total / 1e9:.2f}B parameters, "
            f"{plan.precision}, {recipe.names['parallel']} on {world_size} process(es)) but {device.type} has "
            f"{fmt_bytes(have)} available; stopped before allocating",
            hint=(f"a layout that fits {'this' if device.type == 'cuda' else 'an 80 GB'} device: {fits}; "
                  if fits else "") + "`rapid plan RECIPE --nproc N --set parallel....` shows any layout")


@hookimpl
def rapid_add_commands(app):
    from rich.console import Console
    from rich.table import Table

    @app.command()
    def plan(ctx: typer.Context,
             recipe: Path = typer.Argument(..., metavar="RECIPE", help="recipe TOML file"),
             set_: Optional[List[str]] = typer.Option(None, "--set", help="override a recipe key: table.key=value"),
             nproc: int = typer.Option(1, "--nproc", min=1, help="plan for N processes (devices)"),
             dp: Optional[int] = typer.Option(None, "--dp", min=1, help="data-parallel size for the ZeRO table"),
             as_json: bool = typer.Option(False, "--json", help="print JSON")):
        """Parameter counts (total, dense, active per token) and per-device memory estimates."""
        from rapid.recipe import load_recipe

        registry = ctx.obj
        p = make_plan(load_recipe(recipe, set_ or [], registry), registry, nproc, dp)
        if as_json:
            typer.echo(json.dumps(p.to_dict(), indent=2))
            return
        console = Console()
        t = Table(title=f"{recipe}: parameters")
        t.add_column("kind"), t.add_column("count", justify="right")
        for key in ("params_total", "params_dense", "params_expert", "params_active"):
            t.add_row(key, fmt_count(getattr(p, key)))
        console.print(t)
        m = Table(title=f"memory per device (planned: world size {p.world_size}; ZeRO rows: {p.zero_dp} "
                        "data-parallel ranks)")
        for col in ("layout", "params", "grads", "optimizer", "activations", "total"):
            m.add_column(col, justify="right")
        mp, cols = p.memory_planned, ("params", "grads", "optimizer", "activations", "total")
        m.add_row(f"planned ({p.precision})", *(fmt_bytes(mp[k]) for k in cols))
        for name, mem in p.memory_by_zero_stage.items():
            m.add_row(name, *(fmt_bytes(mem[k]) if k in mem else "" for k in cols))
        console.print(m)
