"""The memory planner: ``rapid plan`` (parameter counts and per-device memory of a layout, computed
on the meta device: nothing is allocated, so a 16B model plans in a second), and the check that stops
``rapid run`` before allocating when the layout does not fit, naming one that would."""

from __future__ import annotations

import functools
import json
import os
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


def activation_bytes(cfg, micro_batch: int, precision: str, checkpointing: bool = False, tp: int = 1) -> int:
    """Activation memory of one micro-batch: what autograd keeps per token for backward, layer by
    layer (element size a = 4 in fp32, 2 for matmul outputs under bf16/fp16 autocast; the residual
    stream and layer norms stay fp32), plus the backward's largest transients.

    attention: qkv input, q, k, v, output, projection input = 6D (SDPA's fused kernels, CPU flash
      included, never hold the S x S scores; with attention dropout the math path holds 3 h S);
    dense block: 2 layer-norm inputs (fp32) + attention + the MLP's input, pre- and post-activation (D + 2F);
    MoE block: attention + router input + per routed row (k, or k * capacity_factor when that is
      smaller) the expert input, pre-activation and output (2D + F), as the reference kernels save;
      plus the dense MLP of a residual MoE;
    head: final norm and head inputs, logits and log-probabilities (fp32, 2V); backward: their
      gradients (2V) and one layer's gradients. Activation checkpointing keeps each block's input
      and one block's activations (recomputed). Tensor parallelism (``tp``) splits q, k, v, the
      attention output and the dense MLP's hidden activations over its ranks."""
    T, D, V = micro_batch * cfg.seq_len, cfg.hidden, cfg.vocab_size
    F, a = cfg.ffn_mult * cfg.hidden, 4 if precision == "fp32" else 2
    attn = 2 * D + (4 * D + (3 * cfg.heads * cfg.seq_len if cfg.dropout > 0 else 0)) / tp
    rows = cfg.top_k * (1.0 if cfg.dropless else min(1.0, cfg.capacity_factor))
    dense = 8 * D + a * (attn + D + 2 * F / tp)
    moe = 8 * D + a * (attn + D + rows * (2 * D + F) + (D + 2 * F if cfg.residual else 0))
    moe_at = set(cfg.moe_layers())
    blocks = [moe if i in moe_at else dense for i in range(cfg.layers)]
    kept = cfg.layers * 4 * D + max(blocks) if checkpointing else sum(blocks)
    head = 4 * (D + 2 * V) + a * D
    backward = 4 * 2 * V + max(blocks)
    return int(T * (kept + head + backward))


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


# CPU: glibc's heap (rapid.cpu: freed memory kept, tcache off, trimmed when free chunks outgrow use)
# holds about this many bytes per byte of a step's allocation churn once a run has settled. Fitted on
# gpt_moe_tiny, 150 steps, started by `rapid run` (micro-batch 4: 519-533 MiB measured, 8: 580-598,
# 32: 954-1002; hidden 256, seq 64, micro-batch 96: 1,665), with the runtime probe measured fresh;
# see BENCHMARKS.md.
CPU_HEAP_PER_ACTIVATION_BYTE = 1.5

_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
import torch, torch.nn.functional as F
from rapid.cpu import keep_freed_memory
keep_freed_memory()
lin = torch.nn.Linear(64, 192)
q, k, v = lin(torch.randn(2, 32, 64)).chunk(3, -1)
opt = torch.optim.AdamW(lin.parameters())
F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
opt.step()
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """Names this installation of rapid (its files' sizes and times), the same in every process: a
    probe cached by an older checkout, which imported other modules, is measured again."""
    import hashlib
    import rapid
    import rapid.builtin
    h = hashlib.sha256()
    for root in sorted({Path(rapid.__file__).parent, Path(rapid.builtin.__file__).parent}):
        for f in sorted(root.rglob("*.py")):
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def runtime_bytes(modules: tuple[str, ...]) -> int:
    """Resident memory of a fresh worker before its model: the interpreter, torch, rapid and
    ``modules`` after one tiny training step (thread pools, kernels' workspaces). Measured once per
    interpreter, torch version and module set, cached under $RAPID_CACHE; 0 if it cannot be measured."""
    import subprocess
    import sys
    from rapid.builtin.data.corpus import cache_dir
    key = f"hwm|{sys.executable}|{torch.__version__}|{_code_version()}|{','.join(modules)}"
    path = cache_dir() / "runtime.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        try:
            out = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, timeout=120)
            known[key] = int(out.stdout.split()[-1])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return 0
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, path)
    return known[key]


_CORPUS_BYTES: dict[str, int] = {}


def corpus_bytes(recipe, registry) -> int:
    """Bytes of the recipe's prepared corpus in memory (0 before it is prepared, or when its source
    cannot tell); looked up once per data table and vocabulary in this process."""
    import dataclasses
    key = json.dumps([recipe.names["data"], dataclasses.asdict(recipe.data), recipe.model.vocab_size], default=str)
    if key not in _CORPUS_BYTES:
        try:
            source = registry.get("data", recipe.names["data"])(recipe.data)
            _CORPUS_BYTES[key] = getattr(source, "cached_bytes", lambda v: None)(recipe.model.vocab_size) or 0
        except UserError:                    # data not readable yet: `rapid run` will say why
            _CORPUS_BYTES[key] = 0
    return _CORPUS_BYTES[key]


def plan_device(recipe) -> str:
    """The device ``rapid run`` would train this recipe on here."""
    wanted = recipe.run.device
    return "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"


def layout_memory(recipe, registry, counts: dict, name: str, world: int, **switches) -> dict[str, int]:
    """Per-device bytes of strategy ``name`` on ``world`` processes with ``switches`` (other
    [parallel] keys as in the recipe): the strategy's model states; 16-bit copies of fp32 weights
    that autocast keeps until backward; activations; and on the CPU, where the peak is the process's
    resident memory, the heap's overhead on activations, the runtime (``runtime_bytes``) and the
    prepared corpus (when it is in the cache)."""
    import dataclasses
    cls = registry.get("parallel", name)
    keys = {f.name for f in dataclasses.fields(cls.Config)}
    shared = {k: v for k, v in dataclasses.asdict(recipe.parallel).items() if k in keys}
    strategy = registry.strategy(name, cls.Config(**{**shared, **switches}), world)
    strategy.check(recipe)
    c = strategy.config
    planned = strategy.memory_plan(counts)
    if c.precision != "fp32" and strategy.autocast_weights:
        planned["autocast_copies"] = planned["params"] // 2
    planned["activations"] = activation_bytes(recipe.model, c.micro_batch, c.precision, c.activation_checkpoint,
                                              c.tensor_parallel)
    if plan_device(recipe) == "cpu":
        # the heap's high-water follows a step's allocation churn, which activation checkpointing's
        # recomputation keeps at the non-checkpointed volume (measured: checkpointing saved nothing here)
        churn = activation_bytes(recipe.model, c.micro_batch, c.precision, False, c.tensor_parallel)
        planned["cpu_heap"] = int(churn * CPU_HEAP_PER_ACTIVATION_BYTE - planned["activations"])
        modules = ("rapid.train", "rapid.plugins", *((cls.requires[0],) if cls.requires else ()))
        planned["runtime"] = runtime_bytes(modules)
        planned["data"] = corpus_bytes(recipe, registry)
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
             grid: Optional[List[str]] = typer.Option(None, "--grid", help="plan every point of a sweep grid "
                                                      "(table.key=v1,v2; repeatable), as `rapid sweep` would run it"),
             as_json: bool = typer.Option(False, "--json", help="print JSON")):
        """Parameter counts (total, dense, active per token) and per-device memory estimates."""
        from rapid.recipe import load_recipe

        registry = ctx.obj
        if grid:
            from rapid.builtin.sweep import SweepConfig, expand, parse_grid
            points = expand(recipe, set_ or [], SweepConfig(grid=parse_grid(grid), nproc=nproc), registry)
            rows = [{"point": pt.key, "planned_bytes": pt.planned or None, "unsupported": pt.unsupported or None}
                    for pt in points]
            if as_json:
                typer.echo(json.dumps(rows, indent=2))
                return
            t = Table(title=f"{recipe}: planned memory per device, {nproc} process(es)")
            for col in (*(k.split(".", 1)[1] for k in parse_grid(grid)), "planned"):
                t.add_column(col)
            for pt in points:
                t.add_row(*(str(v).lower() for v in pt.switches.values()),
                          fmt_bytes(pt.planned) if not pt.unsupported else f"unsupported: {pt.unsupported}")
            Console().print(t)
            return
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
        other = {k: v for k, v in mp.items() if k not in cols}
        m.add_row(f"planned ({p.precision})", *(fmt_bytes(mp[k]) for k in cols))
        for name, mem in p.memory_by_zero_stage.items():
            m.add_row(name, *(fmt_bytes(mem[k]) if k in mem else "" for k in cols))
        console.print(m)
        if other:
            console.print("the planned total also holds " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in other.items()))
