"""End to end at small shapes: the tiny model at hidden 256 with 8 experts per MoE layer against the
same model with dense FFNs (the same active FLOPs), tokens/s of `rapid run`, measured side by side.

    python bench/moe_vs_dense.py                    # 3 rounds x (moe, dense), 80 steps each
    python bench/moe_vs_dense.py --rounds 5 --steps 120
    python bench/moe_vs_dense.py --profile          # where one step's time goes, both models

Each round runs both models, in alternating order, as fresh `rapid run` processes on the cached
corpus (no validation, no checkpoint); a run's tokens/s is the mean of its logged windows after the
first (warm-up). Reported: each model's median tokens/s and the median of the per-round ratios.

``--profile`` builds both models in this process (random tokens, the recipe's optimizer) and prints
the top operators of 5 profiled training steps, grouped as matmul / attention / routing + dispatch /
optimizer / other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "gpt_moe_tiny.toml"
MODELS = {"moe": ["model.hidden=256", "model.experts=8"],
          "dense": ["model.hidden=256", "model.moe_every=0", "model.experts=1"]}


def run(name: str, steps: int, log_every: int, out: Path) -> float:
    sets = [*MODELS[name], f"run.steps={steps}", f"run.log_every={log_every}", "run.eval_batches=0",
            "run.eval_at_start=false", "run.save_every=0", "run.save_final=false"]
    cmd = [sys.executable, "-m", "rapid.cli", "run", str(RECIPE), "--out", str(out), "--overwrite", "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return statistics.mean(tps[1:]) if len(tps) > 1 else tps[0]


def profile() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from rapid.cpu import keep_freed_memory
    from rapid.plugins import Registry
    from rapid.recipe import build_model, load_recipe
    from rapid.train import optimizer_factory, preflight
    from rapid.types import Batch

    keep_freed_memory()
    groups = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear"),
              "attention": ("scaled_dot_product", "flash_attention"),
              "routing + dispatch": ("sort", "argsort", "bincount", "index_select", "index_add", "index_copy",
                                     "topk", "max", "softmax", "cumsum", "scatter", "gather", "item", "_local_scalar"),
              "optimizer": ("Optimizer", "adamw", "_fused_adamw", "foreach", "_foreach")}
    for name, sets in MODELS.items():
        reg = Registry()
        r = load_recipe(RECIPE, sets, reg)
        strategy, device, loss_fn = preflight(r, reg, 1)
        torch.manual_seed(0)
        model = build_model(r, reg, ("a",))
        model.reset_parameters()
        opt, _ = optimizer_factory(r)(model)
        B, S, V = r.parallel.micro_batch, r.model.seq_len, r.model.vocab_size

        def step():
            tok = torch.randint(0, V, (B, S))
            b = Batch(tok, torch.roll(tok, -1, 1), torch.zeros(B, S, dtype=torch.long))
            loss, _ = loss_fn(model(b), b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(5):
            step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        shares = {g: 0.0 for g in (*groups, "other")}
        for e in events:
            g = next((g for g, keys in groups.items() if any(k.lower() in e.key.lower() for k in keys)), "other")
            shares[g] += e.self_cpu_time_total
        print(f"## {name}: {total / 5 / 1e3:.1f} ms per step (profiled)")
        for g, t in shares.items():
            print(f"  {g:20s} {t / 5 / 1e3:7.1f} ms  {100 * t / total:5.1f}%")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.profile:
        return profile()
    results = {name: [] for name in MODELS}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            order = list(MODELS) if i % 2 == 0 else list(reversed(MODELS))
            got = {name: run(name, args.steps, args.log_every, Path(tmp) / name) for name in order}
            for name, tps in got.items():
                results[name].append(tps)
            ratios.append(got["moe"] / got["dense"])
            print(f"# round {i + 1}: moe {got['moe']:.0f} tokens/s, dense {got['dense']:.0f}, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"# gpt_moe_tiny at hidden 256, {args.steps} steps per run, {args.rounds} rounds, "
          f"RAPID_CACHE={os.environ.get('RAPID_CACHE', '~/.cache/rapid')}")
    print("| model | tokens/s (median) | x dense (median of rounds, range) |")
    print("|---|---:|---:|")
    print(f"| dense FFN | {statistics.median(results['dense']):.0f} | 1.000 |")
    print(f"| MoE, 8 experts | {statistics.median(results['moe']):.0f} | {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f}) |")


if __name__ == "__main__":
    main()
