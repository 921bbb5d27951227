"""The MoE layer's kernels on a GPU: every kernel backend (reference, triton, cuda, and auto's pick,
which uses torch._grouped_mm where the GPU has it) against a dense FFN of the same shape over the
same tokens, forward + backward, bf16, measured in one run.

    python bench/kernels_gpu.py                                   # 16k-128k tokens, 8-64 experts
    python bench/kernels_gpu.py --tokens 16384 --experts 8 --iters 10

The layer: router logits -> route (fp32 softmax, top-1, capacity factor 1.25) -> permute ->
grouped_mlp (d 1024, ff 4096, gelu) -> unpermute, weights random; each iteration draws new inputs
(routing changes every step). Reported per point: ms per forward+backward (CUDA events, median),
the ratio to the dense FFN, and achieved TFLOP/s (the dense FFN's 6 * 2 * T * d * ff FLOPs over
each time: dense-equivalent, so capacity drops count as work). Inputs are drawn outside the timed region. Backends that cannot run here are listed with the reason and skipped.

The contract check runs first: a backend that disagrees with the reference is not timed.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

D, FF, CF = 1024, 4096, 1.25


def dense_step(x, w1, w2, g):
    y = F.gelu(x @ w1) @ w2
    y.backward(g)


def moe_step(k, x, gate, w1, w2, g, E):
    logits = x.float() @ gate
    T = x.shape[0]
    cap = int(-(-T // E) * CF)
    r = k.route(logits, 1, cap, "position")
    x_ND, perm = k.permute(x, r.expert_ids_TK, E, order=r.order)
    y = k.grouped_mlp(x_ND, perm.counts_E, w1, w2, "gelu")
    out = k.unpermute(y, perm, r.gates_TK * (r.expert_ids_TK >= 0))
    out.backward(g)


def timed(fn, make_inputs, iters: int) -> float:
    """Median ms of ``fn(*make_inputs())``; the inputs are drawn before each timed call."""
    times = []
    for _ in range(iters):
        args = make_inputs()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--backends", nargs="+", default=["reference", "triton", "cuda", "auto"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels_gpu.py needs a CUDA device")
    from rapid.builtin.kernels import contract
    from rapid.kernels import Kernels
    from rapid.plugins import Registry

    reg = Registry()
    dev, dt = torch.device("cuda"), torch.bfloat16
    installed = ["auto", *dict.fromkeys(name for name, _, _ in reg.kernel_providers())]
    unknown = [b for b in args.backends if b not in installed]
    if unknown:
        raise SystemExit(f"unknown backend(s) {', '.join(unknown)}; installed: {', '.join(installed)}")
    backends = []
    for b in args.backends:
        why = None if b == "auto" else reg.kernel_unavailable(b, "permute", dev, dt)
        if why:
            print(f"# {b}: skipped ({why})")
            continue
        if b != "auto":
            bad = contract.check_backend(reg, b, dev, dt)
            if bad:
                print(f"# {b}: skipped, disagrees with the reference: {bad[0]}")
                continue
        backends.append(b)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, d {D}, ff {FF}, top-1, cf {CF}, "
          f"median of {args.iters}")
    print("| tokens | experts | layer | ms | x dense | TFLOP/s |")
    print("|---:|---:|---|---:|---:|---:|")
    for T in args.tokens:
        flops = 6 * 2 * T * D * FF
        w1d = (torch.randn(D, FF, device=dev, dtype=dt) * 0.02).requires_grad_()
        w2d = (torch.randn(FF, D, device=dev, dtype=dt) * 0.02).requires_grad_()

        def inputs():
            return (torch.randn(T, D, device=dev, dtype=dt, requires_grad=True),
                    torch.randn(T, D, device=dev, dtype=dt))
        def dense(x, g):
            w1d.grad = w2d.grad = None
            dense_step(x, w1d, w2d, g)
        for _ in range(args.warmup):
            dense(*inputs())
        base = timed(dense, inputs, args.iters)
        print(f"| {T} | - | dense | {base:.2f} | 1.000 | {flops / base / 1e9:.1f} |", flush=True)
        for E in args.experts:
            gate = torch.randn(D, E, device=dev) * 0.02
            w1 = (torch.randn(E, D, FF, device=dev, dtype=dt) * 0.02).requires_grad_()
            w2 = (torch.randn(E, FF, D, device=dev, dtype=dt) * 0.02).requires_grad_()
            for b in backends:
                k = Kernels(reg, b)

                def step(x, g):
                    w1.grad = w2.grad = None
                    moe_step(k, x, gate, w1, w2, g, E)
                try:
                    for _ in range(args.warmup):
                        step(*inputs())
                    ms = timed(step, inputs, args.iters)
                except Exception as exc:       # a backend that fails at this size: say so, go on
                    print(f"| {T} | {E} | {b} | failed: {type(exc).__name__}: {str(exc)[:80]} | | |", flush=True)
                    continue
                print(f"| {T} | {E} | {b} | {ms:.2f} | {ms / base:.3f} | {flops / ms / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
