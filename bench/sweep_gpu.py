"""The GPU slice of PAI's GPT-MoE 13B switch sweep, in one command on a GPU machine:
recipes/sweeps/gpt_moe_13b_switches.toml (hidden 1024, 16 heads, 128 experts every other layer,
seq 2048, bf16) with fewer layers, so that one GPU holds it, over PAI's grid (torch vs local data
parallelism x activation checkpointing x ZeRO-2 x micro-batch 4/8/16/32). ZeRO-2 points of torch and
local are recorded as unsupported (rapid's torch and local strategies do not shard); `--zero-via
fairscale` adds fairscale (OSS + ShardedDDP), Rapidformer's ZeRO-2.

    python bench/sweep_gpu.py                      # 4 layers, all GPUs of the machine
    python bench/sweep_gpu.py --layers 2 --nproc 1 --steps 10

It prints the sweep's Markdown table (ms/iter, tokens/s, max reserved memory, the plan's estimate,
MFU, OOM cells) and the fastest layout; the files are under --out (results.jsonl/md/csv/png).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=max(1, torch.cuda.device_count()))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--zero-via", choices=["none", "fairscale"], default="none")
    ap.add_argument("--out", default=str(REPO / "runs" / "sweep-13b-gpu"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/sweep_gpu.py needs CUDA; on the CPU run: rapid sweep recipes/sweeps/gpt_moe_tiny_switches.toml")
    names = "torch,local" + (",fairscale" if args.zero_via == "fairscale" else "")
    cmd = [sys.executable, "-m", "rapid.cli", "sweep", str(REPO / "recipes/sweeps/gpt_moe_13b_switches.toml"),
           "--set", f"model.layers={args.layers}", "--set", "run.device=cuda", "--nproc", str(args.nproc),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", args.out,
           "--grid", f"parallel.name={names}", "--grid", "parallel.activation_checkpoint=true,false",
           "--grid", "parallel.zero_stage=0,2", "--grid", "parallel.micro_batch=4,8,16,32"]
    raise SystemExit(subprocess.call(cmd, cwd=REPO))


if __name__ == "__main__":
    main()
