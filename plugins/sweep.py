"""``rapid sweep``: throughput and memory across acceleration switches, as a table (PAI's way of
choosing a layout for GPT-MoE 13B), added to the CLI through the ``rapid_add_commands`` hook.

    rapid sweep RECIPE --grid parallel.name=torch,local --grid parallel.micro_batch=4,8 \\
        [--set ...] [--steps N] [--warmup W] [--nproc N] [--out DIR] [--max-memory SIZE] [--time-limit S]

or the same settings in the recipe's ``[sweep]`` table (``grid = {"parallel.micro_batch" = [4, 8]}``,
``steps``, ``warmup``, ``nproc``, ``max_memory``, ``time_limit``; options on the command line win).
The grid is the product of the values, first key slowest. Every point is first resolved as a recipe
(an unknown key or a wrong type stops the sweep before anything runs) and checked by its strategy (a
refused combination is recorded as ``unsupported``, with the reason), then planned (``rapid plan``'s
per-device estimate) and run as ``rapid run`` in fresh processes (``--nproc``), with a time limit.

Memory: on a GPU the budget is the device (a CUDA out-of-memory error marks the point ``oom``); on
the CPU it is ``--max-memory`` per process (default: none), checked twice: a point whose plan exceeds
it is not started (``oom``, predicted) and a process whose resident memory passes it is stopped
(``oom``, measured: the sweep samples every process of the point 10 times a second). A point that
fails otherwise is recorded with its error; the sweep goes on either way.

Per point (``DIR/results.jsonl``, one JSON object each; a rerun skips the points it holds, so an
interrupted sweep resumes and a grid can be extended; other steps, warm-up, processes or recipe
keys are refused, their results would not compare): median ms per iteration after ``warmup`` steps, tokens/s, samples/s,
peak memory (the fullest rank's peak RSS on the CPU, CUDA max reserved on a GPU, as
``metrics.jsonl`` reports it), the plan's estimate and its error against that peak, MFU on a GPU
whose peak FLOP/s is known, and routing balance (busiest expert over the mean, dropped fraction: a
throughput difference caused by skewed routing shows there; ``--set router.name=uniform`` removes it).
Also ``results.md`` (PAI's layout: one column per switch, then ms/iter, memory, OOM), ``results.csv``
and, with matplotlib installed (``rapidmoe[plot]``), ``results.png``: tokens/s against the
micro-batch, one line per combination of the other switches, OOM points marked. The fastest point
is printed as a ready ``rapid run`` line.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import typer

from rapid import hookimpl
from rapid.errors import UserError
from rapid.types import NonNegative, Positive

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# dense peak FLOP/s of GPUs by name (bf16/fp16 tensor cores, tf32 for fp32), for MFU
PEAK_FLOPS = {"H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12),
              "L40S": (362e12, 183e12), "A10": (125e12, 62.5e12), "V100": (125e12, 15.7e12)}


def parse_size(text: str, where: str = "--max-memory") -> int:
    """``"8GiB"``, ``"500 MB"``, ``"1.5g"``, ``"123456"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"{where} {text!r} is not a memory size", hint='e.g. "8GiB", "500MB", "1.5G"')
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: ``4,8`` -> [4, 8]; ``[1,2],[3]`` -> two lists."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    return [v.strip() for v in [*out, cur]]


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["parallel.micro_batch=4,8", ...]`` -> ``{"parallel.micro_batch": [4, 8], ...}`` (TOML values)."""
    from rapid.recipe import parse_override
    grid: dict[str, list] = {}
    for item in items:
        path, sep, values = item.partition("=")
        parts = [v for v in _split_values(values) if v]
        if not sep or "." not in path or not parts:
            raise UserError(f"--grid {item!r} is not table.key=value[,value...]", hint="e.g. --grid parallel.micro_batch=4,8")
        if path.strip() in grid:
            raise UserError(f"--grid {path.strip()} is given twice")
        grid[path.strip()] = [parse_override(f"{path}={v}")[2] for v in parts]
        if len({json.dumps(v, sort_keys=True) for v in grid[path.strip()]}) < len(parts):
            raise UserError(f"--grid {path.strip()} lists a value twice", hint="each value is one column of the table")
    return grid


@dataclass
class SweepConfig:
    grid: dict[str, list[Any]] = field(default_factory=dict)   # "table.key" -> values
    steps: Positive = 30            # steps per point (on the CPU the heap settles after about 20)
    warmup: NonNegative = 5         # first steps not timed
    nproc: Positive = 1             # processes per point
    max_memory: str = ""            # per process on the CPU, e.g. "8GiB"; "" = no budget
    time_limit: Positive = 900      # seconds per point

    def __post_init__(self):
        for key, values in self.grid.items():
            if "." not in key or not values:
                raise ValueError(f"grid key {key!r} needs the form \"table.key\" and at least one value")
        if self.warmup >= self.steps:
            raise ValueError(f"warmup={self.warmup} leaves no timed step of steps={self.steps}")
        if self.max_memory:
            parse_size(self.max_memory, "max_memory")


def _toml_value(value: Any) -> str:
    import tomli_w
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


@dataclass
class Point:
    index: int
    switches: dict[str, Any]
    sets: list[str]                 # --set arguments of this point (grid values)
    recipe: Any = None
    unsupported: str = ""           # the strategy's refusal
    planned: int = 0                # per-device bytes from the plan
    tokens_per_step: int = 0
    params_active: int = 0

    @property
    def key(self) -> str:
        return " ".join(self.sets)


def _plan_total(recipe, registry, nproc: int) -> tuple[int, int]:
    """(planned bytes per device, active parameters per token) of a point."""
    from rapid.builtin.plan import make_plan
    plan = make_plan(recipe, registry, nproc)
    return plan.memory_planned["total"], plan.params_active


def expand(recipe_path: Path, base_sets: list[str], cfg: SweepConfig, registry, before_planning=None) -> list[Point]:
    """Every grid point, resolved (a point that is not a valid recipe stops all), then checked by its
    strategy and planned (``before_planning()`` runs in between: the sweep prepares the data there)."""
    from rapid.recipe import load_recipe
    if not cfg.grid:
        raise UserError("the sweep has an empty grid", hint="give --grid table.key=v1,v2 or a [sweep] grid table")
    keys = list(cfg.grid)
    points = []
    for i, values in enumerate(itertools.product(*cfg.grid.values())):
        sets = [f"{k}={_toml_value(v)}" for k, v in zip(keys, values)]
        try:
            recipe = load_recipe(recipe_path, [*base_sets, *sets], registry)
        except UserError as exc:
            raise UserError(f"grid point {' '.join(sets)}: {exc}", hint=exc.hint) from None
        points.append(Point(i, dict(zip(keys, values)), sets, recipe))
    if before_planning:
        before_planning()
    for p in points:
        strategy = registry.strategy(p.recipe.names["parallel"], p.recipe.parallel, cfg.nproc)
        try:
            strategy.check(p.recipe)
            p.planned, p.params_active = _plan_total(p.recipe, registry, cfg.nproc)
        except UserError as exc:
            p.unsupported = f"{exc}" + (f" ({exc.hint})" if exc.hint else "")
        par = p.recipe.parallel
        p.tokens_per_step = par.micro_batch * par.grad_accum * p.recipe.model.seq_len * strategy.data_parallel()[1]
    return points


def _tree(pid: int):
    import psutil
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _rss(procs) -> list[int]:
    import psutil
    out = []
    for proc in procs:
        try:
            out.append(proc.memory_info().rss)
        except psutil.Error:
            pass
    return out


def run_point(p: Point, recipe_path: Path, base_sets: list[str], cfg: SweepConfig, out: Path) -> dict:
    """Run one point in fresh processes; the result record (see the module docstring)."""
    record: dict[str, Any] = {"point": p.key, "sets": p.sets, "switches": p.switches, "nproc": cfg.nproc,
                              "planned_bytes": p.planned or None}
    if p.unsupported:
        return {**record, "status": "unsupported", "error": p.unsupported}
    from rapid.builtin.plan import plan_device
    budget = parse_size(cfg.max_memory) if cfg.max_memory and plan_device(p.recipe) == "cpu" else 0   # CPU only
    if budget and p.planned > budget:
        return {**record, "status": "oom", "oom": "predicted",
                "error": f"planned {p.planned / 2**30:.2f} GiB per process > budget {budget / 2**30:.2f} GiB"}
    run_dir, log = out / "points" / f"{p.index:03d}", out / "logs" / f"{p.index:03d}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    fixed = [f"run.steps={cfg.steps}", "run.log_every=1", "run.eval_every=0", "run.eval_batches=0",
             "run.eval_at_start=false", "run.save_every=0", "run.save_final=false"]
    cmd = [sys.executable, "-m", "rapid.cli", "run", str(recipe_path), "--out", str(run_dir), "--overwrite",
           "--no-progress", *(a for s in [*base_sets, *p.sets, *fixed] for a in ("--set", s)),
           *(["--nproc", str(cfg.nproc), "--allow-oversubscribe"] if cfg.nproc > 1 else [])]
    t0, peak_sampled, stopped = time.monotonic(), 0, ""
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                rss = _rss(_tree(proc.pid))
                peak_sampled = max([peak_sampled, *rss])
                if budget and rss and max(rss) > budget:
                    stopped = f"a process reached {max(rss) / 2**30:.2f} GiB > budget {budget / 2**30:.2f} GiB"
                elif time.monotonic() - t0 > cfg.time_limit:
                    stopped = f"stopped after the time limit of {cfg.time_limit} s"
                if stopped:
                    break
                time.sleep(0.1)
        finally:              # stopped, or the sweep itself interrupted: no point keeps running
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    record.update(seconds=round(time.monotonic() - t0, 1), peak_rss_sampled=peak_sampled or None)
    text = log.read_text(errors="replace")
    if stopped:
        status = "oom" if "budget" in stopped else "timeout"
        return {**record, "status": status, "oom": "measured" if status == "oom" else None, "error": stopped}
    if proc.returncode:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
        guard = "stopped before allocating" in text                    # rapid run's plan vs the device
        oom = guard or re.search(r"out of memory|OutOfMemoryError", text, re.I)
        return {**record, "status": "oom" if oom else "failed",
                "oom": ("predicted" if guard else "cuda") if oom else None, "error": error[:500],
                "exit_code": proc.returncode}
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "tokens_per_s" in r and r["step"] > cfg.warmup]
    ms = statistics.median(1000 * p.tokens_per_step / r["tokens_per_s"] for r in timed)
    peak = max(r.get("peak_memory_bytes", 0) for r in timed)
    tps = 1000 * p.tokens_per_step / ms
    record.update(status="done", ms_per_iter=round(ms, 2), tokens_per_s=round(tps, 1),
                  samples_per_s=round(tps / p.recipe.model.seq_len, 2), peak_memory_bytes=peak,
                  plan_error=round(p.planned / peak - 1, 3) if peak and p.planned else None,
                  load_max_mean=round(statistics.mean(r.get("load_max_mean", 1.0) for r in timed), 3),
                  dropped_frac=round(statistics.mean(r.get("dropped_frac", 0.0) for r in timed), 4),
                  mfu=_mfu(p, tps, cfg.nproc))
    return record


def _mfu(p: Point, tokens_per_s: float, world: int) -> float | None:
    """Model FLOPs utilisation on a GPU of known peak: (6 N_active + 12 L D S) per token (PaLM)."""
    import torch
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peaks = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peaks is None:
        return None
    m = p.recipe.model
    flops = 6 * p.params_active + 12 * m.layers * m.hidden * m.seq_len
    peak = peaks[0] if p.recipe.parallel.precision != "fp32" else peaks[1]
    return round(tokens_per_s * flops / (peak * world), 4)


# ---------------------------------------------------------------- reports
def _fmt_bytes(n) -> str:
    return f"{n / 2**30:.2f} GiB" if n and n >= 2**30 / 10 else (f"{n / 2**20:.0f} MiB" if n else "")


def _short(key: str) -> str:
    return key.split(".", 1)[1]


def table_rows(keys: list[str], results: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = [*(_short(k) for k in keys), "ms/iter", "tokens/s", "max memory", "planned", "plan error", "load max/mean",
            "OOM / status"]
    rows = []
    for r in results:
        done = r["status"] == "done"
        status = {"done": "", "oom": f"OOM ({r.get('oom')})"}.get(r["status"], r["status"])
        rows.append([*(str(r["switches"][k]).lower() for k in keys),
                     f"{r['ms_per_iter']:.1f}" if done else "", f"{r['tokens_per_s']:,.0f}" if done else "",
                     _fmt_bytes(r.get("peak_memory_bytes")), _fmt_bytes(r.get("planned_bytes")),
                     f"{100 * r['plan_error']:+.0f}%" if r.get("plan_error") is not None else "",
                     f"{r['load_max_mean']:.2f}" if done else "", status])
    return head, rows


def write_reports(out: Path, keys: list[str], results: list[dict]) -> list[Path]:
    head, rows = table_rows(keys, results)
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    buf = io.StringIO()
    fields = ["point", *keys, "status", "oom", "ms_per_iter", "tokens_per_s", "samples_per_s", "peak_memory_bytes",
              "planned_bytes", "plan_error", "load_max_mean", "dropped_frac", "mfu", "seconds", "error"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in results:
        w.writerow({**r, **r["switches"]})
    (out / "results.csv").write_text(buf.getvalue())
    written = [out / "results.md", out / "results.csv"]
    if plot(out / "results.png", keys, results):
        written.append(out / "results.png")
    return written


def plot(path: Path, keys: list[str], results: list[dict]) -> bool:
    """tokens/s against the micro-batch (or the point), one line per combination of the other switches."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x_key = "parallel.micro_batch" if "parallel.micro_batch" in keys else None
    others = [k for k in keys if k != x_key]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series: dict[str, list[dict]] = {}
    for r in results:
        series.setdefault(", ".join(f"{_short(k)}={r['switches'][k]}" for k in others) or "all", []).append(r)
    for label, rs in series.items():
        xs = [r["switches"][x_key] if x_key else i for i, r in enumerate(rs)]
        done = [(x, r["tokens_per_s"]) for x, r in zip(xs, rs) if r["status"] == "done"]
        line, = ax.plot([x for x, _ in done], [y for _, y in done], marker="o", label=label)
        oom = [x for x, r in zip(xs, rs) if r["status"] == "oom"]
        ax.plot(oom, [0] * len(oom), "x", color=line.get_color(), markersize=10)
    ax.set_xlabel(_short(x_key) if x_key else "point")
    ax.set_ylabel("tokens/s")
    ax.set_title("rapid sweep (x on the axis: out of memory)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def best_line(recipe_path: Path, base_sets: list[str], results: list[dict]) -> str | None:
    done = [r for r in results if r["status"] == "done"]
    if not done:
        return None
    best = max(done, key=lambda r: r["tokens_per_s"])
    nproc = best.get("nproc", 1)
    sets = " ".join(f"--set {shlex.quote(s)}" for s in [*base_sets, *best["sets"]])
    return f"rapid run {shlex.quote(str(recipe_path))} {sets}" + (f" --nproc {nproc}" if nproc > 1 else "")


# ---------------------------------------------------------------- the command
def sweep(recipe_path: Path, grid_items: list[str], base_sets: list[str], registry, out: Path | None = None,
          live: bool = True, allow_oversubscribe: bool = False, **options) -> tuple[Path, list[str], list[dict]]:
    """Run the sweep (see the module docstring): (its directory, the grid keys, every point's record)."""
    from rapid.recipe import build_config, load_recipe
    base = load_recipe(recipe_path, base_sets, registry)
    table = dict(base.sweep)
    if grid_items:
        table["grid"] = parse_grid(grid_items)
    table.update({k: v for k, v in options.items() if v is not None})
    if options.get("max_memory") is not None:
        parse_size(options["max_memory"], "--max-memory")
    cfg = build_config(SweepConfig, table, f"{recipe_path} [sweep]", {})
    if cfg.nproc > (os.cpu_count() or 1) and not allow_oversubscribe and base.run.device != "cuda":
        raise UserError(f"nproc {cfg.nproc} is more than this machine's {os.cpu_count()} CPU cores",
                        hint="lower --nproc, or pass --allow-oversubscribe")
    # the data is prepared (and cached) once, here: no point's peak memory includes tokenizer training
    prepare = lambda: registry.get("data", base.names["data"])(base.data).corpus(base.model.vocab_size)  # noqa: E731
    points = expand(recipe_path, base_sets, cfg, registry, before_planning=prepare)
    out = Path(out or Path("runs") / f"sweep-{base.run.name}")
    out.mkdir(parents=True, exist_ok=True)
    # what makes two results comparable (not the grid: a sweep may be extended; not its limits)
    same = {k: v for k, v in dataclasses.asdict(cfg).items() if k in ("steps", "warmup", "nproc")}
    fingerprint = hashlib.sha256(json.dumps([{**base.to_dict(), "sweep": {}}, same], sort_keys=True,
                                            default=str).encode()).hexdigest()[:16]
    results_path = out / "results.jsonl"
    done: dict[str, dict] = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue              # a line cut short by an interruption: that point runs again
            if r.get("sweep") != fingerprint:
                raise UserError(f"--out {out} holds a sweep of another recipe or other settings",
                                hint="give a new --out, or delete its results.jsonl to start over")
            done[r["point"]] = r
    keys = list(cfg.grid)
    results: list[dict | None] = [done.get(p.key) for p in points]
    with _Live(keys, points, results, enabled=live) as view:
        for i, p in enumerate(points):
            if results[i] is not None:
                continue
            view.running(i)
            record = {"sweep": fingerprint, **run_point(p, recipe_path, base_sets, cfg, out)}
            results[i] = record
            with results_path.open("a+") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell():                 # a line cut short by an interruption is closed first
                    fh.seek(fh.tell() - 1)
                    last = fh.read(1)
                    fh.seek(0, os.SEEK_END)
                    if last != "\n":
                        fh.write("\n")
                fh.write(json.dumps(record) + "\n")
            view.update()
    final = [r for r in results if r is not None]
    write_reports(out, keys, final)
    return out, keys, final


class _Live:
    """A rich live table of the points: which one runs, and the results so far."""

    def __init__(self, keys, points, results, enabled: bool):
        self.keys, self.points, self.results, self.current = keys, points, results, None
        self.live = None
        if enabled:
            from rich.console import Console
            from rich.live import Live
            self.live = Live(self._table(), console=Console(stderr=True), refresh_per_second=2)

    def _table(self):
        from rich.table import Table
        head, _ = table_rows(self.keys, [])
        t = Table(title="rapid sweep")
        for col in head:
            t.add_column(col)
        for i, p in enumerate(self.points):
            r = self.results[i]
            if r is None:
                status = "running" if i == self.current else "pending"
                t.add_row(*(str(v).lower() for v in p.switches.values()), *[""] * (len(head) - len(self.keys) - 1),
                          status)
            else:
                t.add_row(*table_rows(self.keys, [r])[1][0])
        return t

    def running(self, i):
        self.current = i
        self.update()

    def update(self):
        if self.live:
            self.live.update(self._table())

    def __enter__(self):
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.stop()


@hookimpl
def rapid_add_commands(app):
    @app.command("sweep")
    def sweep_command(
            ctx: typer.Context,
            recipe: Path = typer.Argument(..., metavar="RECIPE", help="recipe TOML file (its [sweep] table is read)"),
            grid: Optional[List[str]] = typer.Option(None, "--grid", help="table.key=v1,v2,... (repeatable; "
                                                     "replaces the recipe's grid)"),
            set_: Optional[List[str]] = typer.Option(None, "--set", help="override a recipe key for every point"),
            steps: Optional[int] = typer.Option(None, "--steps", help="steps per point [sweep.steps: 30]"),
            warmup: Optional[int] = typer.Option(None, "--warmup", help="untimed first steps [sweep.warmup: 5]"),
            nproc: Optional[int] = typer.Option(None, "--nproc", help="processes per point [sweep.nproc: 1]"),
            out: Optional[Path] = typer.Option(None, "--out", help="sweep directory (default runs/sweep-<run.name>)"),
            max_memory: Optional[str] = typer.Option(None, "--max-memory", help="CPU budget per process, e.g. 8GiB"),
            time_limit: Optional[int] = typer.Option(None, "--time-limit", help="seconds per point [900]"),
            oversubscribe: bool = typer.Option(False, "--allow-oversubscribe", help="allow --nproc above the "
                                               "CPU count"),
            live: bool = typer.Option(True, "--live/--no-live", help="show the live table")):
        """Throughput and memory of every combination of the grid's switches (a table, CSV and plot)."""
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwind: the running point is stopped too
        where, keys, results = sweep(recipe, grid or [], set_ or [], ctx.obj, out, live, oversubscribe, steps=steps,
                                     warmup=warmup, nproc=nproc, max_memory=max_memory, time_limit=time_limit)
        typer.echo((where / "results.md").read_text())
        line = best_line(recipe, set_ or [], results)
        typer.echo(f"fastest: {line}" if line else "no point completed")
        typer.echo(f"results: {where}/results.jsonl, results.md, results.csv"
                   + (", results.png" if (where / "results.png").exists() else " (results.png needs matplotlib)"))
