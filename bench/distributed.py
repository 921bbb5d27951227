"""Time per training step of the tiny model under each parallel layout, measured in one run:
single (1 process, micro_batch 4), torch DDP x2, FSDP2 x2 and torch + expert parallelism x2 (each
2-process layout with micro_batch 2: the same global batch), plus the all-to-all payload per step
under expert parallelism.

    python bench/distributed.py                 # 60 steps per layout
    python bench/distributed.py --steps 100 --repeats 3

Every layout is a real `rapid run` (gloo on loopback; the 2-process ones started by `--nproc 2`).
A step's time comes from metrics.jsonl (tokens per step / tokens_per_s of each logged window); the
first windows are warm-up. On a 2-core machine the two processes share the cores the single process
has to itself, so this measures the overhead of each layout, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "single": ["--set", "parallel.micro_batch=4"],
    "torch x2": ["--nproc", "2", "--set", "parallel.name=torch"],
    "fsdp x2": ["--nproc", "2", "--set", "parallel.name=fsdp"],
    "torch x2, EP=2": ["--nproc", "2", "--set", "parallel.name=torch", "--set", "parallel.expert_parallel=2"],
}


def run(name: str, args: list[str], steps: int, out: Path) -> dict:
    tokens_per_step = 4 * 128   # micro_batch x data-parallel size = 4 sequences of 128 tokens
    cmd = [sys.executable, "-m", "rapid.cli", "run", str(REPO / "recipes" / "gpt_moe_tiny.toml"), "--out", str(out),
           "--no-progress", "--set", f"run.steps={steps}", "--set", "run.log_every=5", "--set", "run.eval_every=0",
           "--set", "run.eval_at_start=false", "--set", "run.eval_batches=1", "--set", "run.save_every=0",
           "--set", "model.dropless=true", "--set", "parallel.micro_batch=2", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if r.get("tokens_per_s")][2:]          # the first 10 steps are warm-up
    ms = [1000 * tokens_per_step / r["tokens_per_s"] for r in windows]
    a2a = [r["all_to_all_bytes"] for r in windows if "all_to_all_bytes" in r]
    return {"ms_per_step": statistics.median(ms), "all_to_all_bytes": statistics.median(a2a) if a2a else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=1, help="run every layout this many times, round-robin")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, extra in LAYOUTS.items():
                results[name].append(run(name, extra, args.steps, Path(tmp) / f"{i}-{name.replace(' ', '')}"))
    base = statistics.median(r["ms_per_step"] for r in results["single"])
    print(f"# tiny model ({args.steps} steps, global batch 4 x 128 tokens), {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, torch {__import__('torch').__version__}")
    print("| layout | ms/step | x single | all-to-all per step (per rank) |")
    print("|---|---:|---:|---:|")
    for name, rs in results.items():
        ms = statistics.median(r["ms_per_step"] for r in rs)
        a2a = rs[0]["all_to_all_bytes"]
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x | {f'{a2a / 1024:.0f} KiB' if a2a else '-'} |")


if __name__ == "__main__":
    main()
