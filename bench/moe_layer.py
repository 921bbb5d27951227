"""MoE layer forward+backward: rapid vs a dense FFN of the same shape over the same tokens (the
ideal: same FLOPs, no routing) vs deepspeed.moe.layer.MoE (k=1), all measured in this run.

    python bench/moe_layer.py                      # T = 4096 and 16384, fp32 and bf16
    python bench/moe_layer.py --tokens 4096 --dtypes fp32 --iters 3
    python bench/moe_layer.py --tokens 4096 --dtypes fp32 --experts 8 32 128 --layers dense floor rapid
    python bench/moe_layer.py --tokens 4096 --dtypes fp32 --experts 32 --layers dense floor rapid --reserve 3000

``floor`` is the GEMM floor: the layer's six matrix products alone at rapid's per-expert shapes of
the same round (``GemmFloor``); ``x floor`` is each layer's time over it, and GFLOP/s is the dense
FFN's FLOPs over each layer's time (the floor's: its own FLOPs).

Every iteration draws fresh random inputs and output gradients, so per-expert token counts change
as they do in training. Layers are timed round-robin (one iteration each in turn) so machine noise
hits all of them alike; the median is reported, as a ratio to the dense FFN.

Host memory: by default the whole process runs as ``rapid run`` does on the CPU: started with glibc's
tcache off (``rapid.cpu.TUNABLES``; the script re-executes itself) and with
``rapid.cpu.keep_freed_memory()``, so no layer pays page faults for re-allocating large tensors;
``--system-malloc`` measures glibc's default behaviour instead.

Memory: peak bytes allocated during one forward+backward (inputs and parameters already exist;
gradients start as None, as after ``zero_grad(set_to_none=True)``), from every allocation and free
that torch.profiler records. The MoE layers' parameter gradients are 8x the dense FFN's (8 experts):
that is part of what they pay.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

D_MODEL, D_FF, EXPERTS, CF = 512, 2048, 8, 1.25
_SENTINEL = None   # --reserve: the allocation that keeps the reserved heap below it
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DenseFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D_MODEL, D_FF, bias=False)
        self.proj = nn.Linear(D_FF, D_MODEL, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class RapidMoE(nn.Module):
    def __init__(self):
        super().__init__()
        from rapid.builtin.routers.top1 import Top1Router
        from rapid.kernels import Kernels
        from rapid.moe import MoE
        from rapid.plugins import Registry, make_plugin_manager
        from rapid.types import MoESpec

        spec = MoESpec(D_MODEL, EXPERTS, 1, CF, CF, 4, "random", False)
        kernels = Kernels(Registry(make_plugin_manager(autoload=False)), "auto")
        self.moe = MoE(spec, Top1Router(Top1Router.Config(), spec), D_FF, kernels)
        self.moe.experts.reset_parameters(0.02, 0.02)
        self.token_ids = torch.zeros(1, dtype=torch.long)

    def forward(self, x):
        ids = self.token_ids.expand(x.shape[0])
        out, routing = self.moe(x, ids, ids)
        kept = routing.expert_ids_TK[routing.expert_ids_TK >= 0]
        GemmFloor.counts = torch.bincount(kept, minlength=EXPERTS).tolist()   # the floor's shapes
        return out + 0 * sum(routing.losses.values())


class GemmFloor(nn.Module):
    """The physical limit of the MoE layer here: its six matrix products alone (two forward, four
    backward) at the per-expert row counts of rapid's layer in the same round, with ``torch.mm`` into
    outputs allocated once (no allocator or page-fault cost), plus one write of the experts' weight
    gradients (the products write them; experts without rows get zeros). No routing, gather,
    scatter or activation."""

    counts: list[int] | None = None

    def __init__(self):
        super().__init__()
        self.w1_EDF = nn.Parameter(torch.randn(EXPERTS, D_MODEL, D_FF) * 0.02)
        self.w2_EFD = nn.Parameter(torch.randn(EXPERTS, D_FF, D_MODEL) * 0.02)

    def flops(self) -> int:
        return 6 * 2 * sum(self.counts) * D_MODEL * D_FF

    @torch.no_grad()
    def floor_step(self, x_TD, g_TD, dtype) -> None:
        counts = self.counts or [x_TD.shape[0] // EXPERTS] * EXPERTS
        N = sum(counts)
        x, g = x_TD[:N].to(dtype), g_TD[:N].to(dtype)
        w1, w2 = self.w1_EDF.to(dtype), self.w2_EFD.to(dtype)
        if getattr(self, "_buffers_for", None) != (x.dtype, x_TD.shape[0]):
            T = x_TD.shape[0]
            self._bufs = (x.new_empty(T, D_FF), x.new_empty(T, D_MODEL), x.new_empty(T, D_FF),
                          x.new_empty(T, D_MODEL), torch.empty_like(w1), torch.empty_like(w2))
            self._buffers_for = (x.dtype, T)
        h, y, dh, dx, gw1, gw2 = self._bufs
        start = 0
        for e, n in enumerate(counts):
            if not n:
                gw1[e].zero_(), gw2[e].zero_()
                continue
            r = slice(start, start + n)
            start += n
            torch.mm(x[r], w1[e], out=h[r])
            torch.mm(h[r], w2[e], out=y[r])
            torch.mm(h[r].t(), g[r], out=gw2[e])
            torch.mm(g[r], w2[e].t(), out=dh[r])
            torch.mm(x[r].t(), dh[r], out=gw1[e])
            torch.mm(dh[r], w1[e].t(), out=dx[r])


class DeepSpeedMoE(nn.Module):
    def __init__(self):
        super().__init__()
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE

        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
        self.moe = MoE(hidden_size=D_MODEL, expert=DenseFFN(), num_experts=EXPERTS, ep_size=1, k=1,
                       capacity_factor=CF, eval_capacity_factor=CF, min_capacity=4, drop_tokens=True, use_rts=True)

    def forward(self, x):
        out, l_aux, _ = self.moe(x[None])
        return out[0] + 0 * l_aux


def make_layers(names):
    ctors = {"dense": DenseFFN, "rapid": RapidMoE, "floor": GemmFloor, "deepspeed": DeepSpeedMoE}
    layers = {}
    order = sorted(names, key=lambda n: n == "floor" and "rapid" in names)   # the floor after rapid: its shapes
    for name in order:
        try:
            torch.manual_seed(0)
            layers[name] = ctors[name]()
        except ImportError as exc:
            print(f"# skipping {name}: {exc}")
    return layers


def step(layer, x, g, dtype):
    if isinstance(layer, GemmFloor):
        return layer.floor_step(x, g, dtype)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with ctx:
        out = layer(x)
    out.float().backward(g)


def peak_bytes(layer, x, g, dtype) -> int:
    layer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(layer, x, g, dtype)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # every allocation (+) and free (-) in order
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def bench(T: int, dtype_name: str, iters: int, warmup: int, layers: dict) -> dict:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(T)

    def fresh():
        x = torch.randn(T, D_MODEL, generator=gen).requires_grad_()
        return x, torch.randn(T, D_MODEL, generator=gen)

    times = {name: [] for name in layers}
    for it in range(iters + warmup):
        for name, layer in layers.items():
            x, g = fresh()
            layer.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(layer, x, g, dtype)
            if it >= warmup:
                times[name].append(time.perf_counter() - t0)
    x, g = fresh()
    res = {name: {"ms": 1e3 * statistics.median(t),
                  "peak_mib": peak_bytes(layers[name], x, g, dtype) / 2**20 if name != "floor" else float("nan")}
           for name, t in times.items()}
    dense_flops = 6 * 2 * T * D_MODEL * D_FF
    for name, r in res.items():
        r["time_x"] = r["ms"] / res["dense"]["ms"]
        r["mem_x"] = r["peak_mib"] / res["dense"]["peak_mib"]
        r["gflops"] = (layers[name].flops() if name == "floor" else dense_flops) / r["ms"] / 1e6
        if "floor" in res:
            r["floor_x"] = r["ms"] / res["floor"]["ms"]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", nargs="+", default=["dense", "floor", "rapid", "deepspeed"])
    ap.add_argument("--experts", type=int, nargs="+", default=[8],
                    help="experts per layer (a sweep: 8 32 128); the FLOPs stay those of one dense FFN")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc malloc as it is (default: rapid.cpu.keep_freed_memory, for every layer)")
    ap.add_argument("--processes", type=int, default=1,
                    help="repeat the whole measurement in N fresh processes and report the median ratio and "
                         "its range (on noisy machines the dense baseline alone varies +-15%% between processes)")
    ap.add_argument("--mlock", action="store_true",
                    help="mlockall: keep this process's memory resident (on VMs whose kernel reclaims idle pages, "
                         "e.g. DAMON, freed buffers are otherwise paged out between rounds and faulted back in)")
    ap.add_argument("--reserve", type=int, default=0, metavar="MIB",
                    help="grow the heap by MIB first (allocate, touch, free; with keep_freed_memory it stays mapped): "
                         "glibc's heap otherwise grows by fragmentation every round with many experts, and each round "
                         "page-faults the new part in; what a caching allocator (jemalloc, tcmalloc) avoids")
    ap.add_argument("--json", help="also write results here")
    args = ap.parse_args()
    if not args.system_malloc:        # as the rapid command does: glibc started with rapid.cpu.TUNABLES
        from rapid.cpu import reexec_tuned
        reexec_tuned()
    if args.processes > 1:
        return run_processes(args)
    torch.set_num_threads(args.threads)
    if args.mlock:
        import ctypes
        import ctypes.util
        MCL_CURRENT, MCL_FUTURE = 1, 2
        if ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
            raise SystemExit(f"mlockall failed (errno {ctypes.get_errno()}): raise RLIMIT_MEMLOCK or run without --mlock")
    if not args.system_malloc:
        from rapid.cpu import keep_freed_memory
        keep_freed_memory()
    if args.reserve:
        if args.system_malloc:
            raise SystemExit("--reserve keeps freed heap memory: it needs keep_freed_memory (not --system-malloc)")
        block = torch.ones(args.reserve << 20, dtype=torch.uint8)            # touched ...
        global _SENTINEL   # ... and freed below a live allocation: not the heap's top, so never trimmed
        _SENTINEL = torch.ones(64 << 20, dtype=torch.uint8)
        del block
    global EXPERTS
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"d_model {D_MODEL}, d_ff {D_FF}, top-1, capacity factor {CF}, median of {args.iters}, "
          f"malloc: {'system' if args.system_malloc else 'keep_freed_memory, ' + os.environ.get('GLIBC_TUNABLES', '')}"
          f"{', mlockall' if args.mlock else ''}"
          f"{f', heap reserve {args.reserve} MiB' if args.reserve else ''}")
    print(HEADER)
    out = []
    for E in args.experts:
        EXPERTS = E
        layers = make_layers(args.layers)
        for T in args.tokens:
            for dt in args.dtypes:
                for name, r in bench(T, dt, args.iters, args.warmup, layers).items():
                    row = {"experts": E, "tokens": T, "dtype": dt, "layer": name, **r}
                    print(format_row(row), flush=True)
                    out.append(row)
        del layers
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


HEADER = ("| experts | tokens | dtype | layer | ms/iter | x dense | x floor | GFLOP/s | peak MiB | x dense |\n"
          "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")


def format_row(r: dict) -> str:
    ratio = f"{r['time_x']:.3f}" + (f" ({r['time_x_min']:.3f}-{r['time_x_max']:.3f})" if "time_x_min" in r else "")
    floor = f"{r['floor_x']:.3f}" if "floor_x" in r else "-"
    mem = "-" if math.isnan(r["peak_mib"]) else f"{r['peak_mib']:.1f} | {r['mem_x']:.3f}"
    mem = mem if "|" in mem else "- | -"
    return (f"| {r['experts']} | {r['tokens']} | {r['dtype']} | {r['layer']} | {r['ms']:.1f} | {ratio} | {floor} | "
            f"{r['gflops']:.0f} | {mem} |")


def run_processes(args) -> None:
    """Run this benchmark in ``args.processes`` fresh processes, one after another; aggregate."""
    import subprocess
    import sys
    import tempfile

    child = [a for a in sys.argv[1:]]
    for flag in ("--processes", "--json"):
        if flag in child:
            i = child.index(flag)
            del child[i:i + 2]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            path = os.path.join(tmp, f"{i}.json")
            subprocess.run([sys.executable, __file__, *child, "--json", path], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(path) as fh:
                runs.append(json.load(fh))
    print(f"# {args.processes} processes x (median of {args.iters}); torch {torch.__version__}, {args.threads} threads, "
          f"malloc: {'system' if args.system_malloc else 'keep_freed_memory'}; x dense: median (range) over processes")
    print(HEADER)
    out = []
    for rows in zip(*runs):
        ratios = sorted(r["time_x"] for r in rows)
        agg = {**rows[0], "ms": statistics.median(r["ms"] for r in rows), "time_x": statistics.median(ratios),
               "time_x_min": ratios[0], "time_x_max": ratios[-1],
               "gflops": statistics.median(r["gflops"] for r in rows)}
        if "floor_x" in rows[0]:
            agg["floor_x"] = statistics.median(r["floor_x"] for r in rows)
        out.append(agg)
        print(format_row(agg))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("RAPID_DISABLE_PLUGIN_AUTOLOAD", "1")
    main()
