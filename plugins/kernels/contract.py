"""The kernel contract: every backend's ops against the pure-torch reference (the oracle).

``check_backend(registry, backend, device, dtype)`` runs each op of ``rapid.kernels.OPS`` that the
backend serves on ``device``/``dtype`` over a set of routing cases (empty experts, one token, uneven
loads, every token on one expert, k = 1 and 2, dropped slots, capacity, dropless, tied probabilities:
``route`` breaks ties towards the lower expert id) and compares
forward outputs and gradients with the reference within a tolerance for the dtype. It returns one
``Finding`` per (op, case) that disagrees or raises; an empty list means the backend conforms.

``rapid kernels check`` runs it for every installed backend on the current device; the test suite
runs it for every backend that answers on the CPU (``tests/plugins/kernels``), so a new kernel
package is covered without writing a test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import typer
from torch import Tensor

from rapid import hookimpl
from rapid.kernels import OPS, Kernels, _accepts

TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-4), torch.bfloat16: (3e-2, 3e-2),
             torch.float16: (1e-2, 1e-2)}   # (rtol, atol relative to the reference's largest value)
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


@dataclass
class Finding:
    backend: str
    op: str
    case: str
    problem: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.op} [{self.case}]: {self.problem}"


@dataclass
class Case:
    name: str
    T: int
    E: int
    K: int
    capacity: int | None     # route's capacity (None: dropless)
    skew: float = 0.0        # logits bias towards expert 0 (uneven loads)
    drop: float = 0.0        # fraction of assignments dropped (-1) for permute/unpermute
    empty: int | None = None  # an expert that gets no rows
    ties: bool = False       # logits from {0, 1, 2}: equal probabilities, broken towards the lower expert id


CASES = [
    Case("k1 uneven with an empty expert", T=37, E=5, K=1, capacity=None, skew=1.5, empty=3),
    Case("k2 dropped slots", T=41, E=6, K=2, capacity=None, drop=0.25),
    Case("one token", T=1, E=4, K=1, capacity=None),
    Case("k2 capacity", T=64, E=4, K=2, capacity=12, skew=1.0),
    Case("every token on one expert", T=16, E=3, K=1, capacity=None, skew=50.0),
    Case("k1 capacity below the load", T=50, E=4, K=1, capacity=5, skew=0.5),
    Case("k2 tied probabilities", T=48, E=6, K=2, capacity=14, ties=True),
]


def _close(a: Tensor, b: Tensor, dtype: torch.dtype) -> str | None:
    """None if ``a`` matches reference ``b`` within the dtype's tolerance, else what differs."""
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)}, reference {tuple(b.shape)}"
    rtol, atol = TOLERANCE.get(dtype, (1e-2, 1e-2))
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
    err = (a - b).abs()
    bad = err > atol * scale + rtol * b.abs()
    if bad.any() or not torch.isfinite(a).all():
        return f"max abs error {float(err.max()):.3g} (allowed {atol * scale:.3g} + {rtol:g} x |reference|)"
    return None


def _routing(case: Case, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(case.T, case.E, generator=g)
    if case.ties:
        logits = logits.mul(1.5).round().clamp(-1, 1) + 1
    logits[:, 0] += case.skew
    if case.empty is not None:
        logits[:, case.empty] = -1e4
    ids = logits.topk(case.K, dim=-1).indices
    if case.drop:
        ids[torch.rand(case.T, case.K, generator=g) < case.drop] = -1
    w = torch.rand(case.T, case.K, generator=g) * (ids >= 0)
    return logits.to(device), ids.to(device), w.to(device)


def check_backend(registry, backend: str, device: torch.device, dtype: torch.dtype,
                  cases: list[Case] = CASES, D: int = 16, F: int = 32) -> list[Finding]:
    """Every op ``backend`` serves on ``device``/``dtype``, against the reference on the same inputs."""
    impl, ref = Kernels(registry, backend), Kernels(registry, "reference")
    findings = []

    def served(op: str) -> bool:
        return registry.kernel_choice(op, device, dtype, backend)[1] is not None

    def run(op: str, case_name: str, fn) -> None:
        try:
            problem = fn()
        except Exception as exc:   # a crashing kernel is a finding, not a crash of the check
            problem = f"raised {type(exc).__name__}: {exc}"
        if problem:
            findings.append(Finding(backend, op, case_name, problem))

    for i, case in enumerate(cases):
        logits, ids, w = _routing(case, device, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(case.T, D, generator=g).to(device, dtype)
        w1 = (torch.randn(case.E, D, F, generator=g) / D ** 0.5).to(device, dtype)
        w2 = (torch.randn(case.E, F, D, generator=g) / F ** 0.5).to(device, dtype)
        if "route" in OPS and served("route"):
            run("route", case.name, lambda: _check_route(impl, ref, logits, case, dtype))
        if served("permute"):
            run("permute", case.name, lambda: _check_permute(impl, ref, x, ids, case, dtype))
        if served("grouped_mlp"):
            for act in ACTIVATIONS:
                run("grouped_mlp", f"{case.name}, {act}",
                    lambda act=act: _check_grouped(impl, ref, x, ids, w1, w2, case, act, dtype))
            if _accepts(impl.get("grouped_mlp", x), "pad_rows"):     # [kernels] pad_rows, where offered
                padded = Kernels(registry, backend, pad_rows=16)
                run("grouped_mlp", f"{case.name}, pad_rows 16",
                    lambda: _check_grouped(padded, ref, x, ids, w1, w2, case, "gelu", dtype))
        if served("unpermute"):
            run("unpermute", case.name, lambda: _check_unpermute(impl, ref, x, ids, w, case, dtype))
    return findings


def _check_route(impl, ref, logits, case, dtype):
    # With tied logits, ``probs`` priority compares probabilities of different rows that are equal in
    # exact arithmetic and that two softmax implementations may round an ulp apart (keeping other
    # slots), so the tie case routes differentiable logits: the training path, whose gates every
    # backend takes from the same differentiable softmax.
    src = logits.clone().requires_grad_() if case.ties else logits
    for policy in ("position", "probs", "random"):
        torch.manual_seed(11)                    # random priorities: the same draws for both
        a = impl.route(src, case.K, case.capacity, policy)
        torch.manual_seed(11)
        b = ref.route(src, case.K, case.capacity, policy)
        if not torch.equal(a.expert_ids_TK.cpu(), b.expert_ids_TK.cpu()):
            return f"{policy}: expert ids differ from the reference's"
        if not torch.equal(a.order.counts_E.cpu(), b.order.counts_E.cpu()):
            return f"{policy}: counts {a.order.counts_E.tolist()}, reference {b.order.counts_E.tolist()}"
        for name in ("probs_TE", "gates_TK"):
            if problem := _close(getattr(a, name), getattr(b, name), torch.float32):
                return f"{policy}: {name}: {problem}"
        la, lb = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        torch.manual_seed(11)
        ga = _grads(impl.route(la, case.K, case.capacity, policy).gates_TK, (la,), 9)[0]
        torch.manual_seed(11)
        gb = _grads(ref.route(lb, case.K, case.capacity, policy).gates_TK, (lb,), 9)[0]
        if problem := _close(ga, gb, torch.float32):
            return f"{policy}: d_logits through the gates: {problem}"
        # the order groups the same slots under each expert (row order inside an expert is free)
        flat = b.expert_ids_TK.reshape(-1).cpu()
        slots_a, slots_b = a.order.slot_N.cpu(), b.order.slot_N.cpu()
        if not torch.equal(flat[slots_a], flat[slots_b]) or not torch.equal(slots_a.sort().values, slots_b.sort().values):
            return f"{policy}: order does not group the kept slots by expert"
        if not torch.equal(a.order.token_idx_N.cpu(), slots_a // case.K):
            return f"{policy}: token_idx_N is not slot_N // k"
    return None


def _check_permute(impl, ref, x, ids, case, dtype):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a_x, a = impl.permute(xa, ids, case.E)
    b_x, b = ref.permute(xb, ids, case.E)
    if a_x.shape == b_x.shape and (problem := _close(_grads(a_x, (xa,), 5)[0], _grads(b_x, (xb,), 5)[0], dtype)):
        return f"d_x: {problem}"
    if not torch.equal(a.counts_E.cpu(), b.counts_E.cpu()):
        return f"counts {a.counts_E.tolist()}, reference {b.counts_E.tolist()}"
    if not torch.equal(a.slot_N.cpu(), b.slot_N.cpu()):
        return "rows are not grouped by expert in slot order (stable)"
    if not torch.equal(a_x.cpu(), b_x.cpu()):
        return "gathered rows differ"
    order_x, order = impl.get("permute", x)(x, ids, case.E, order=b)      # the implementation itself
    if order is not b or not torch.equal(order_x.cpu(), b_x.cpu()):
        return "with a given order: rows are not x[order.token_idx_N]"
    return None


def _grads(out: Tensor, leaves, seed: int):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, leaves, g)


def _check_grouped(impl, ref, x, ids, w1, w2, case, act, dtype):
    _, perm = ref.permute(x, ids, case.E)
    results = []
    for k in (impl, ref):
        rows = x.index_select(0, perm.token_idx_N).detach().requires_grad_()
        a, b = w1.clone().requires_grad_(), w2.clone().requires_grad_()
        kept = rows.detach().clone()
        y = k.grouped_mlp(rows, perm.counts_E, a, b, act)
        grads = _grads(y, (rows, a, b), 7)
        if not torch.equal(rows.detach(), kept):
            return "wrote over its input leaf (must copy a leaf or view first)"
        results.append((y, *grads))
    for name, p, q in zip(("output", "d_x", "d_w1", "d_w2"), *results):
        if problem := _close(p, q, dtype):
            return f"{name}: {problem}"
    return None


def _check_unpermute(impl, ref, x, ids, w, case, dtype):
    _, perm = ref.permute(x, ids, case.E)
    y = torch.randn(perm.token_idx_N.numel(), x.shape[1], generator=torch.Generator().manual_seed(3)).to(x)
    results = []
    for k in (impl, ref):
        yy, ww = y.clone().requires_grad_(), w.clone().requires_grad_()
        out = k.unpermute(yy, perm, ww)
        results.append((out, *_grads(out, (yy, ww), 11)))
    for name, p, q in zip(("output", "d_y", "d_weights"), *results):
        if problem := _close(p, q, dtype):
            return f"{name}: {problem}"
    return None


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def check_all(registry, device: torch.device, dtypes: list[str], backends: list[str] | None = None):
    """(rows for the report, findings) for every installed backend (or ``backends``) on ``device``."""
    from rapid.errors import UserError
    installed = list(dict.fromkeys(b for b, _, _ in registry.kernel_providers()))
    for b in backends or []:
        if b not in installed:
            raise UserError(f"unknown kernels backend {b!r}; installed: {', '.join(installed)}")
    for d in dtypes:
        if d not in DTYPES:
            raise UserError(f"unknown dtype {d!r}; valid: {', '.join(DTYPES)}")
    rows, findings = [], []
    for backend in backends or installed:
        for name in dtypes:
            dtype = DTYPES[name]
            ops = [op for op in OPS if registry.kernel_choice(op, device, dtype, backend)[1] is not None]
            if not ops:
                why = registry.kernel_unavailable(backend, OPS[0], device, dtype) or "serves no op here"
                if backends:                     # asked for by name: that it cannot run is the answer
                    raise UserError(f"kernels backend {backend!r} cannot run on {device.type}/{name}: {why}")
                rows.append((backend, name, "-", f"skipped: {why}"))
                continue
            found = check_backend(registry, backend, device, dtype)
            findings += found
            rows.append((backend, name, ", ".join(ops), "ok" if not found else f"{len(found)} disagreement(s)"))
    return rows, findings


@hookimpl
def rapid_add_commands(app):
    kernels_app = typer.Typer(no_args_is_help=True, help="Kernel backends.")
    app.add_typer(kernels_app, name="kernels")

    @kernels_app.command("check")
    def kernels_check(ctx: typer.Context,
                      device: str = typer.Option("auto", "--device", help="cpu, cuda or auto (cuda when present)"),
                      dtype: list[str] = typer.Option(["fp32", "bf16"], "--dtype", help="fp32, bf16, fp16, fp64 "
                                                      "(repeatable)"),
                      backend: list[str] = typer.Option([], "--backend", help="only this backend (repeatable)")):
        """Run the kernel contract (every op against the pure-torch reference over empty experts, one
        token, uneven loads, k = 1 and 2, capacity) for every installed backend on this device.
        Exit 1 if a backend disagrees with the reference beyond tolerance."""
        from rich.console import Console
        from rich.table import Table

        from rapid.errors import UserError
        if device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device {device!r}; valid: auto, cpu, cuda")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: this torch build sees no CUDA device")
        registry = ctx.obj
        rows, findings = check_all(registry, torch.device(device), dtype, backend or None)
        t = Table(title=f"rapid kernels check ({device})")
        for col in ("backend", "dtype", "ops", "result"):
            t.add_column(col)
        for row in rows:
            t.add_row(*row)
        Console().print(t)
        for f in findings:
            typer.echo(f"error: {f}", err=True)
        if findings:
            raise typer.Exit(1)
