"""Pure-torch reference kernels: the CPU path and the accuracy oracle for every other backend.

Sort / gather / index_add only: no one-hot ``[T, E, C]`` dispatch tensors, so cost is linear in
tokens. ``grouped_mlp`` is a custom autograd function that keeps only the pre-activation ``h`` for
backward and recomputes the activation there, so an MoE layer holds less activation memory than a
dense FFN over the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rapid import hookimpl
from rapid.kernels import Permutation, compute_dtype

KERNEL_BACKEND = "reference"

_GELU_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}
ACTIVATIONS = tuple(_GELU_APPROX) + ("relu",)


def permute(x_TD: Tensor, expert_ids_TK: Tensor, num_experts: int):
    T, K = expert_ids_TK.shape
    flat = expert_ids_TK.reshape(-1)
    key = torch.where(flat >= 0, flat, num_experts)           # dropped assignments sort last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()
    slot_N = order[: sum(counts)]
    token_idx_N = slot_N // K if K > 1 else slot_N
    x_ND = x_TD.index_select(0, token_idx_N)
    return x_ND, Permutation(token_idx_N, slot_N, counts, T)


def _act(h: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return torch.relu(h)
    return F.gelu(h, approximate=_GELU_APPROX[activation])


def _act_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return grad * (h > 0)
    return torch.ops.aten.gelu_backward(grad, h, approximate=_GELU_APPROX[activation])


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w1_EDF, w2_EFD, counts_E, activation):
        N = x_ND.shape[0]
        h_NF = x_ND.new_empty(N, w1_EDF.shape[2])
        y_ND = x_ND.new_empty(N, w2_EFD.shape[2])
        start = 0
        for e, n in enumerate(counts_E):
            if n:
                rows = slice(start, start + n)
                torch.mm(x_ND[rows], w1_EDF[e], out=h_NF[rows])
                torch.mm(_act(h_NF[rows], activation), w2_EFD[e], out=y_ND[rows])
                start += n
        ctx.save_for_backward(x_ND, h_NF, w1_EDF, w2_EFD)
        ctx.counts_E, ctx.activation = counts_E, activation
        return y_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, h_NF, w1_EDF, w2_EFD = ctx.saved_tensors
        grad_ND = grad_ND.contiguous()
        grad_x = torch.empty_like(x_ND)
        grad_w1 = torch.zeros_like(w1_EDF)   # experts with no rows get zero gradients, not None
        grad_w2 = torch.zeros_like(w2_EFD)
        start = 0
        for e, n in enumerate(ctx.counts_E):
            if n:
                rows = slice(start, start + n)
                h, g = h_NF[rows], grad_ND[rows]
                torch.mm(_act(h, ctx.activation).t(), g, out=grad_w2[e])
                grad_h = _act_backward(g @ w2_EFD[e].t(), h, ctx.activation)
                torch.mm(x_ND[rows].t(), grad_h, out=grad_w1[e])
                torch.mm(grad_h, w1_EDF[e].t(), out=grad_x[rows])
                start += n
        return grad_x, grad_w1, grad_w2, None, None


def grouped_mlp(x_ND: Tensor, counts_E: list[int], w1_EDF: Tensor, w2_EFD: Tensor,
                activation: str = "gelu") -> Tensor:
    dtype = compute_dtype(x_ND)
    with torch.autocast(x_ND.device.type, enabled=False):
        return _GroupedMLP.apply(x_ND.to(dtype), w1_EDF.to(dtype), w2_EFD.to(dtype), counts_E, activation)


def unpermute(y_ND: Tensor, perm: Permutation, weights_TK: Tensor) -> Tensor:
    w_N = weights_TK.reshape(-1).index_select(0, perm.slot_N).to(y_ND.dtype)
    out_TD = y_ND.new_zeros(perm.num_tokens, y_ND.shape[1])
    return out_TD.index_add(0, perm.token_idx_N, y_ND * w_N[:, None])


KERNELS = {"permute": permute, "grouped_mlp": grouped_mlp, "unpermute": unpermute}


@hookimpl(trylast=True)
def rapid_kernel(op, device, dtype, backend):
    if backend in ("auto", KERNEL_BACKEND):
        return KERNELS.get(op)
    return None
