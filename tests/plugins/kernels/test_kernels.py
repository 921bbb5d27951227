"""Every registered kernel backend that answers on CPU, against a naive per-token loop."""

import pytest
import torch

import rapid
import torch.nn.functional as F

from rapid.kernels import OPS, Kernels
from rapid.plugins import Registry, make_plugin_manager

REG = Registry(make_plugin_manager())
BACKENDS = [b for b, _, _ in REG.kernel_providers()]


ACT = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": torch.relu}


def naive_moe(x_TD, ids_TK, w_TK, w1, w2, activation="gelu"):
    """out[t] = sum_k w[t,k] * FFN_{ids[t,k]}(x[t]), token by token."""
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e >= 0:
                out[t] += w_TK[t, k] * (ACT[activation](x_TD[t] @ w1[e]) @ w2[e])
    return out


def _case(T=37, D=8, F_=16, E=5, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[torch.rand(T, K, generator=g) < 0.2] = -1                 # some dropped slots
    ids[:, :][ids == 3] = -1                                       # expert 3 gets no tokens at all
    w = torch.rand(T, K, generator=g, dtype=torch.float64) * (ids >= 0)
    w1 = torch.randn(E, D, F_, generator=g, dtype=torch.float64)
    w2 = torch.randn(E, F_, D, generator=g, dtype=torch.float64)
    return x, ids, w, w1, w2


def run_kernels(k, x, ids, w, w1, w2, activation="gelu"):
    x_ND, perm = k.permute(x, ids, w1.shape[0])
    y = k.grouped_mlp(x_ND, perm.counts_E, w1, w2, activation)
    return k.unpermute(y, perm, w), perm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,activation", [(1, "gelu"), (2, "gelu"), (2, "gelu_tanh"), (1, "relu")])
def test_forward_and_grads_match_naive_loop(backend, K, activation):
    k = Kernels(REG, backend)
    try:
        k.get("permute", torch.empty(0, dtype=torch.float64))
    except Exception:
        pytest.skip(f"backend {backend!r} has no float64 CPU kernels (the contract tests it in fp32 and bf16)")
    x, ids, w, w1, w2 = _case(K=K)
    leaves = [t.requires_grad_() for t in (x, w, w1, w2)]
    out, perm = run_kernels(k, x, ids, w, w1, w2, activation)
    ref = naive_moe(x, ids, w, w1, w2, activation)
    assert torch.allclose(out, ref, atol=1e-10)
    assert int(perm.counts_E[3]) == 0
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * g).sum(), leaves)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-9)
    assert torch.count_nonzero(grads[2][3]) == 0      # an expert with no rows: zero grad, not None


def test_grouped_backward_cannot_be_retained():
    k = Kernels(REG, "reference")
    x, ids, w, w1, w2 = _case(K=1)
    out, _ = run_kernels(k, x.requires_grad_(), ids, w, w1.requires_grad_(), w2)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot be retained"):
        out.sum().backward()


@pytest.mark.parametrize("kind", ["leaf", "view"])
def test_grouped_mlp_leaves_a_callers_input_intact(kind):
    """Backward may write dx over the kernel's input; a leaf or a view the caller owns is copied first."""
    k = Kernels(REG, "reference")
    x, ids, w, w1, w2 = _case(K=1)
    counts = [7, 0, 10, 20]
    w1, w2 = w1[:4], w2[:4]
    base = torch.randn(40, x.shape[1], dtype=torch.float64, requires_grad=True)
    x_ND = base if kind == "leaf" else base[3:40]
    kept = x_ND.detach().clone()
    y = k.grouped_mlp(x_ND, counts, w1, w2)
    y.sum().backward()
    assert torch.equal(x_ND.detach(), kept) and base.grad is not None


def test_permute_groups_rows_by_expert():
    k = Kernels(REG, "reference")
    x = torch.arange(6.0)[:, None]
    ids = torch.tensor([[2], [0], [-1], [2], [1], [0]])
    x_ND, perm = k.permute(x, ids, 3)
    assert perm.counts_E.tolist() == [2, 1, 2]
    assert x_ND[:, 0].tolist() == [1.0, 5.0, 4.0, 0.0, 3.0]   # stable within each expert


class _CudaOnly:
    """A kernel backend that answers only for CUDA tensors."""
    KERNEL_BACKEND = "cudaonly"

    @rapid.hookimpl
    def rapid_kernel(self, op, device, dtype, backend):
        return (lambda *a: None) if backend in ("auto", "cudaonly") and device.type == "cuda" else None


def test_explicit_backend_without_kernel_is_an_error():
    from rapid.errors import UserError
    reg = Registry(make_plugin_manager(autoload=False, extra=[_CudaOnly()]))
    k = Kernels(reg, "cudaonly")
    with pytest.raises(UserError, match="kernels backend 'cudaonly' has no 'route' for cpu/float32"):
        k.check(torch.device("cpu"), torch.float32)
    Kernels(reg, "auto").check(torch.device("cpu"), torch.float32)      # the reference answers


def test_unknown_backend_lists_valid():
    from rapid.errors import UserError
    with pytest.raises(UserError, match="unknown kernels backend 'fastest'; valid: auto, reference"):
        Kernels(REG, "fastest")


def test_ops_listed():
    assert OPS == ("route", "permute", "grouped_mlp", "unpermute")


def test_bf16_autocast_runs_in_bf16():
    k = Kernels(REG, "reference")
    x, ids, w, w1, w2 = (t.float() if t.is_floating_point() else t for t in _case(K=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_ND, perm = k.permute(x, ids, 5)
        y = k.grouped_mlp(x_ND, perm.counts_E, w1, w2)
    assert y.dtype == torch.bfloat16
    ref = naive_moe(x.double(), ids, torch.ones_like(w).double() * (ids >= 0), w1.double(), w2.double())
    out = k.unpermute(y.float(), perm, (ids >= 0).float())
    assert torch.allclose(out.double(), ref, rtol=0.05, atol=0.3)


def test_route_top_k_breaks_ties_towards_the_lower_expert_id():
    """The reference's top-k: ties go to the lower id (as the triton and cuda kernels do, and unlike
    torch.topk), a NaN row still gives distinct ids, k == E is a permutation, and untied rows give
    torch.topk's answer."""
    from rapid.builtin.kernels.reference import top_k_lowest_id
    p = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.4, 0.1, 0.4, 0.1], [float("nan")] * 4, [0.25] * 4])
    assert top_k_lowest_id(p, 2).tolist() == [[1, 2], [0, 2], [0, 1], [0, 1]]
    assert top_k_lowest_id(p, 1).tolist() == [[1], [0], [0], [0]]
    assert top_k_lowest_id(p, 4)[3].tolist() == [0, 1, 2, 3]
    assert all(sorted(row) == [0, 1, 2, 3] for row in top_k_lowest_id(p, 4).tolist())
    untied = torch.rand(64, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top_k_lowest_id(untied, 3), untied.topk(3, dim=-1).indices)
    r = Kernels(REG, "reference").route(torch.log(p[:2]), 2, None, "position")
    assert r.top_TK.tolist() == [[1, 2], [0, 2]] and torch.allclose(r.gates_TK, p[:2].gather(1, r.top_TK))


def test_route_refuses_top_k_outside_one_to_experts():
    k = Kernels(REG, "reference")
    for top_k in (0, 5):
        with pytest.raises(ValueError, match=f"top_k = {top_k} with 4 experts"):
            k.route(torch.randn(3, 4), top_k, None, "position")
