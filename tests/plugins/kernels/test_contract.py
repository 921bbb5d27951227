"""The kernel contract over every installed backend (triton under its interpreter), a backend that
breaks it being caught, ``rapid kernels check``, backend selection, and the route -> permute hand-over."""

import importlib.util

import pytest
import torch
import typer
from typer.testing import CliRunner

import rapid
from rapid.builtin.kernels import contract, reference
from rapid.errors import UserError
from rapid.kernels import Kernels
from rapid.plugins import Registry, make_plugin_manager

REG = Registry(make_plugin_manager())
HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = list(dict.fromkeys(b for b, _, _ in REG.kernel_providers()))


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter for this test (on the CPU the triton backend serves nothing without it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_matches_the_reference(backend, dtype, interpret):
    served = [op for op in rapid.kernels.OPS if REG.kernel_choice(op, torch.device("cpu"), contract.DTYPES[dtype],
                                                                  backend)[1]]
    if not served:
        pytest.skip(f"{backend} serves nothing on the CPU: {REG.kernel_unavailable(backend, 'route', torch.device('cpu'), contract.DTYPES[dtype])}")
    findings = contract.check_backend(REG, backend, torch.device("cpu"), contract.DTYPES[dtype])
    assert not findings, "\n".join(map(str, findings))


def test_triton_backend_is_checked_here():
    """The suite's test extra installs triton: its kernels must not silently drop out of the contract."""
    assert HAS_TRITON and "triton" in BACKENDS


class _Broken:
    """The reference, except that grouped_mlp's weight gradient of w1 is off by 1% and unpermute
    ignores the weights: both must be caught."""
    KERNEL_BACKEND = "broken"

    @rapid.hookimpl
    def rapid_kernel(self, op, device, dtype, backend):
        if backend != "broken":
            return None
        if op == "grouped_mlp":
            return _broken_grouped
        if op == "unpermute":
            return lambda y, perm, w: reference.unpermute(y, perm, torch.ones_like(w) * (w != 0))
        return reference.KERNELS[op]


class _ScaleW1Grad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


def _broken_grouped(x, counts, w1, w2, activation="gelu"):
    return reference.grouped_mlp(x, counts, _ScaleW1Grad.apply(w1), w2, activation)


def _broken_registry():
    return Registry(make_plugin_manager(autoload=False, extra=[_Broken()]))


def test_a_backend_that_disagrees_is_found():
    findings = contract.check_backend(_broken_registry(), "broken", torch.device("cpu"), torch.float32)
    ops = {f.op for f in findings}
    assert ops == {"grouped_mlp", "unpermute"}, findings
    assert any("d_w1" in f.problem for f in findings if f.op == "grouped_mlp")
    assert all("d_x" not in f.problem for f in findings)       # only what is wrong is reported


def _cli(registry, *args):
    app = typer.Typer()
    contract.rapid_add_commands(app)
    app.command("noop")(lambda: None)     # a second command keeps `kernels` a sub-command
    return CliRunner().invoke(app, ["kernels", "check", *args], obj=registry)


def test_kernels_check_command_reports_and_fails_on_disagreement():
    ok = _cli(REG, "--backend", "reference", "--dtype", "fp32")
    assert ok.exit_code == 0, ok.output
    assert "reference" in ok.output and "ok" in ok.output
    bad = _cli(_broken_registry(), "--backend", "broken", "--dtype", "fp32")
    assert bad.exit_code == 1
    assert "error: broken: grouped_mlp [" in bad.output and "d_w1: max abs error" in bad.output


def test_kernels_check_bad_input_is_one_error(capsys):
    from rapid.cli import main
    for argv, needle in ((["kernels", "check", "--backend", "fastest"], "unknown kernels backend 'fastest'; installed:"),
                         (["kernels", "check", "--dtype", "fp8"], "unknown dtype 'fp8'; valid: fp32"),
                         (["kernels", "check", "--device", "tpu"], "--device 'tpu'; valid: auto, cpu, cuda"),
                         (["kernels", "check", "--device", "cpu", "--backend", "cuda"],
                          "kernels backend 'cuda' cannot run on cpu/fp32: CUDA kernels run on CUDA devices only")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and needle in err and "Traceback" not in err, err


def test_triton_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    k = Kernels(REG, "triton")
    with pytest.raises(UserError, match="has no 'route' for cpu/float32: Triton runs on the CPU only under its "
                                        "interpreter: set TRITON_INTERPRET=1"):
        k.check(torch.device("cpu"), torch.float32)
    assert REG.kernel_choice("route", torch.device("cpu"), torch.float32, "auto")[0] == "reference"


def test_auto_never_takes_the_interpreter(interpret):
    for op in rapid.kernels.OPS:
        assert REG.kernel_choice(op, torch.device("cpu"), torch.float32, "auto")[0] == "reference"
        assert REG.kernel_choice(op, torch.device("cpu"), torch.float32, "triton")[0] == "triton"


def test_the_choice_is_logged_once(capsys):
    rapid.kernels._announced.clear()
    for _ in range(3):
        Kernels(REG, "auto").check(torch.device("cpu"), torch.float32)
        Kernels(REG, "auto").get("permute", torch.empty(2))
    err = capsys.readouterr().err
    assert err.count("kernels: permute on cpu/float32 -> reference") == 1, err


# ---------------------------------------------------------------- route -> permute hand-over
def _moe(policy="position", router="top1", E=4):
    from rapid.moe import MoE
    from rapid.types import MoESpec
    spec = MoESpec(hidden=16, num_experts=E, top_k=1, capacity_factor=1.0, eval_capacity_factor=1.0,
                   min_capacity=1, drop_policy=policy, dropless=False, vocab_size=64)
    router_cls = REG.get("router", router)
    torch.manual_seed(0)
    moe = MoE(spec, router_cls(router_cls.Config(), spec), 32, Kernels(REG, "auto"))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def _count_sorts(monkeypatch):
    calls = []
    real = torch.argsort

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(torch, "argsort", counting)
    return calls


def test_top1_routing_sorts_once_and_matches_the_generic_path(monkeypatch):
    moe = _moe("position")
    x = torch.randn(40, 16)
    ids = torch.zeros(40, dtype=torch.long)
    calls = _count_sorts(monkeypatch)
    out, routing = moe(x, ids, ids)
    assert routing.order is not None and len(calls) == 1          # capacity and expert order: one sort
    assert (routing.expert_ids_TK < 0).any()                       # capacity dropped some
    monkeypatch.undo()
    x_ND, counts_E, perm = moe.dispatcher.dispatch(x, routing.expert_ids_TK, moe.experts)   # the generic sort
    y = moe.dispatcher.combine(moe.experts(x_ND, counts_E), perm, routing.weights_TK)
    assert torch.allclose(out, y, atol=1e-6)
    assert torch.equal(perm.slot_N, routing.order.slot_N)          # position policy: the same order


@pytest.mark.parametrize("policy", ["random", "probs"])
def test_priority_policies_keep_the_same_tokens_as_apply_capacity(policy):
    from rapid.moe import apply_capacity, drop_priority
    logits = torch.randn(300, 6) + torch.tensor([2.0, 0, 0, 0, 0, 0])
    torch.manual_seed(1)
    r = reference.route(logits, 1, 40, policy)
    torch.manual_seed(1)
    probs = torch.softmax(logits, -1)
    p, top = probs.max(-1, keepdim=True)
    expected = apply_capacity(top, drop_priority(policy, p), 6, 40)
    assert torch.equal(r.expert_ids_TK, expected)
    assert r.order.counts_E.tolist() == torch.bincount(expected[expected >= 0], minlength=6).tolist()


def test_a_router_without_an_order_takes_the_generic_path(monkeypatch):
    moe = _moe(router="hash")
    moe.router.reset_parameters()
    x = torch.randn(40, 16)
    ids = torch.arange(40)
    calls = _count_sorts(monkeypatch)
    out, routing = moe(x, ids, ids)
    assert routing.order is None and len(calls) >= 1 and out.shape == x.shape


# ---------------------------------------------------------------- review regressions
class _PadAwareTop1:
    """A top-1 subclass that drops padding tokens (id 0) after routing: replaced ids, or edited in place."""

    @staticmethod
    def make(in_place: bool):
        from rapid.builtin.routers.top1 import Top1Router

        class PadAware(Top1Router):
            def forward(self, x_TD, *, token_ids_T, domain_ids_T):
                r = super().forward(x_TD, token_ids_T=token_ids_T, domain_ids_T=domain_ids_T)
                pad = (token_ids_T == 0)[:, None]
                if in_place:
                    r.expert_ids_TK.masked_fill_(pad, -1)
                else:
                    r.expert_ids_TK = r.expert_ids_TK.masked_fill(pad, -1)
                r.weights_TK = r.weights_TK.masked_fill(pad, 0.0)
                return r
        return PadAware


@pytest.mark.parametrize("in_place", [False, True])
def test_ids_edited_after_routing_never_use_a_stale_order(in_place):
    from rapid.moe import MoE
    from rapid.types import MoESpec
    spec = MoESpec(hidden=8, num_experts=4, top_k=1, capacity_factor=1.0, eval_capacity_factor=1.0,
                   min_capacity=1, drop_policy="position", dropless=True, vocab_size=10)
    cls = _PadAwareTop1.make(in_place)
    torch.manual_seed(0)
    moe = MoE(spec, cls(cls.Config(), spec), 16, Kernels(REG, "auto"))
    x, tok = torch.randn(6, 8), torch.tensor([0, 0, 3, 4, 5, 6])
    out, routing = moe(x, tok, tok)
    assert torch.all(out[:2] == 0)                          # padding went to no expert
    x_ND, counts_E, perm = moe.dispatcher.dispatch(x, routing.expert_ids_TK, moe.experts)
    assert int(counts_E.sum()) == 4 and not routing.order.describes(routing.expert_ids_TK)


def test_nan_logits_route_to_valid_experts(interpret):
    logits = torch.randn(6, 8)
    logits[2] = float("nan")
    for backend in ("reference", "triton"):
        r = Kernels(REG, backend).route(logits, 2, None, "position")
        assert int(r.top_TK.min()) >= 0 and int(r.top_TK.max()) < 8, backend
        assert r.top_TK[2, 0] != r.top_TK[2, 1], backend                    # two distinct experts
        assert torch.isnan(r.gates_TK[2]).all() and torch.isfinite(r.gates_TK[[0, 1, 3, 4, 5]]).all(), backend
        assert r.order.slot_N.sort().values.tolist() == list(range(12)), backend


class _OldStyleKernels:
    """A kernel plugin written against the three-op hook: its hookimpl takes a subset of the hook's
    arguments (pluggy allows it) and its permute has no ``order`` keyword."""
    KERNEL_BACKEND = "oldstyle"

    @rapid.hookimpl
    def rapid_kernel(self, op, backend):
        if backend != "oldstyle":
            return None
        if op == "permute":
            return lambda x, ids, E: reference.permute(x, ids, E)
        return reference.KERNELS[op]


def test_a_hookimpl_with_fewer_arguments_and_an_old_permute_still_work():
    class Wrapper:
        @rapid.hookimpl(hookwrapper=True)
        def rapid_kernel(self, op):
            yield
    reg = Registry(make_plugin_manager(autoload=False, extra=[_OldStyleKernels(), Wrapper()]))
    name, fn = reg.kernel_choice("permute", torch.device("cpu"), torch.float32, "oldstyle")
    assert name == "oldstyle" and callable(fn)
    k = Kernels(reg, "oldstyle")
    logits = torch.randn(10, 3)
    r = k.route(logits, 1, None, "position")
    x = torch.randn(10, 4)
    x_ND, perm = k.permute(x, r.expert_ids_TK, 3, order=r.order)     # its permute takes no order: sorts
    assert torch.equal(x_ND, x.index_select(0, r.order.token_idx_N))


def test_grouped_mlp_is_chosen_by_the_autocast_dtype():
    seen = []

    class Spy:
        KERNEL_BACKEND = "spy"

        @rapid.hookimpl
        def rapid_kernel(self, op, device, dtype, backend):
            if backend == "spy":
                seen.append((op, dtype))
                return reference.KERNELS[op]
    reg = Registry(make_plugin_manager(autoload=False, extra=[Spy()]))
    k = Kernels(reg, "spy")
    x, w1, w2 = torch.randn(5, 4), torch.randn(2, 4, 8), torch.randn(2, 8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k.grouped_mlp(x, torch.tensor([2, 3]), w1, w2)
    assert ("grouped_mlp", torch.bfloat16) in seen


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_padded_rows_give_the_same_results_with_few_gemm_shapes(monkeypatch, activation):
    """[kernels] pad_rows: every expert product runs over a multiple of 16 rows (a small, stable set
    of shapes for oneDNN's bf16 kernels on AMX CPUs) and the results equal the unpadded ones."""
    x, ids, w, w1, w2 = (t.float() if t.is_floating_point() else t for t in
                         __import__("tests.plugins.kernels.test_kernels", fromlist=["_case"])._case(T=70, K=1))
    results = []
    for pad in (0, 16):
        k = Kernels(REG, "reference", pad_rows=pad)
        xx, a, b = x.clone().requires_grad_(), w1.clone().requires_grad_(), w2.clone().requires_grad_()
        rows = []
        real = torch.mm
        monkeypatch.setattr(torch, "mm", lambda p, q, **kw: rows.append(p.shape[0]) or real(p, q, **kw))
        x_ND, perm = k.permute(xx, ids, 5)
        y = k.grouped_mlp(x_ND, perm.counts_E, a, b, activation)
        out = k.unpermute(y, perm, w)
        grads = torch.autograd.grad(out.square().sum(), (xx, a, b))
        monkeypatch.undo()
        results.append((out, *grads))
        if pad:
            forward_rows = rows[: 2 * int((perm.counts_E > 0).sum())]
            assert all(r % 16 == 0 for r in forward_rows), forward_rows
            assert any(n % 16 for n in perm.counts_E.tolist())          # padding was needed
    for p, q in zip(*results):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-5)


def test_pad_rows_with_a_kernel_that_cannot_pad_is_refused(interpret):
    with pytest.raises(UserError, match=r"\[kernels\] pad_rows = 16: the grouped_mlp chosen for cpu/float32 "
                                        r"\(triton\) does not pad rows"):
        Kernels(REG, "triton", pad_rows=16).check(torch.device("cpu"), torch.float32)
