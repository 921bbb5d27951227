"""Pure-torch reference kernels: the CPU path and the accuracy oracle for every other backend.

Sort / gather / index_add only: no one-hot ``[T, E, C]`` dispatch tensors, so cost is linear in
tokens. ``grouped_mlp`` is a custom autograd function that keeps only the expert inputs and
pre-activations for backward and reuses those buffers there, so an MoE layer holds less activation
memory than a dense FFN over the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rapid import hookimpl
from rapid.kernels import Permutation, RouteResult, compute_dtype
from rapid.moe import drop_priority

KERNEL_BACKEND = "reference"

_GELU_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}


def route(logits_TE: Tensor, top_k: int, capacity, drop_policy: str) -> RouteResult:
    """Softmax, top-k and capacity in one pass (``route_from_topk``, with torch's stable argsort)."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    top_TK = top_k_lowest_id(probs_TE.detach(), top_k)
    return route_from_topk(_argsort_by_key, probs_TE, top_TK, probs_TE.gather(1, top_TK), capacity, drop_policy)


def top_k_lowest_id(probs_TE: Tensor, k: int) -> Tensor:
    """The k largest entries' ids per row, ties going to the lower expert id (what the triton and
    cuda kernels do; ``torch.topk`` breaks ties arbitrarily, and bf16 router logits tie often): k
    rounds of ``max``, which returns the first maximal index. A NaN row gives distinct ids."""
    if k == 1:
        return probs_TE.argmax(dim=-1, keepdim=True)
    p_TE, ids = probs_TE.clone(), []
    for _ in range(k):
        ids.append(p_TE.argmax(dim=-1, keepdim=True))
        p_TE.scatter_(1, ids[-1], float("-inf"))
    return torch.cat(ids, dim=1)


def _argsort_by_key(keys: Tensor, buckets: int) -> tuple[Tensor, Tensor]:
    return torch.argsort(keys, stable=True), torch.bincount(keys, minlength=buckets)


def route_from_topk(sort, probs_TE: Tensor, top_TK: Tensor, gates_TK: Tensor, capacity, drop_policy: str
                    ) -> RouteResult:
    """The capacity and the expert order of a top-k choice, sorting once where the drop policy
    allows: with ``position`` priority (or dropless) one stable sort by expert gives both the slots to
    keep and the order; ``random``/``probs`` priority sorts by priority first (as ``apply_capacity``;
    the kept set is the same for the same priorities). ``sort(keys, buckets) -> (stable order,
    counts)`` is the backend's (torch's argsort here, a counting sort in ``dispatch``)."""
    T, K = top_TK.shape
    flat = top_TK.reshape(-1)
    if capacity is None or drop_policy == "position":
        order, counts_E = sort(flat, probs_TE.shape[1])                       # by expert, then by slot
    else:
        by_priority = torch.argsort(drop_priority(drop_policy, gates_TK).reshape(-1), descending=True, stable=True)
        order, counts_E = sort(flat[by_priority], probs_TE.shape[1])
        order = by_priority[order]
    expert_ids_TK = top_TK
    if capacity is not None:
        sorted_ids = flat[order]
        rank = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts_E, 0) - counts_E)[sorted_ids]
        cap = capacity.to(flat.device)[sorted_ids] if isinstance(capacity, Tensor) else capacity
        order = order[rank < cap]
        counts_E = torch.minimum(counts_E, capacity.to(counts_E)) if isinstance(capacity, Tensor) \
            else counts_E.clamp(max=capacity)
        expert_ids_TK = torch.full_like(flat, -1).index_copy_(0, order, flat.index_select(0, order)).view(T, K)
    token_idx_N = order // K if K > 1 else order
    return RouteResult(probs_TE, top_TK, gates_TK, expert_ids_TK,
                       Permutation(token_idx_N, order, counts_E, T, expert_ids_TK, expert_ids_TK._version))


def permute(x_TD: Tensor, expert_ids_TK: Tensor, num_experts: int, order: Permutation | None = None):
    if order is not None:                                                # route already sorted
        return x_TD.index_select(0, order.token_idx_N), order
    T, K = expert_ids_TK.shape
    flat = expert_ids_TK.reshape(-1)
    key = torch.where(flat >= 0, flat, num_experts)           # dropped assignments sort last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    slot_N = order[: int(counts.sum())]
    token_idx_N = slot_N // K if K > 1 else slot_N
    x_ND = x_TD.index_select(0, token_idx_N)
    return x_ND, Permutation(token_idx_N, slot_N, counts, T)


def _act(h: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return torch.relu(h)
    return F.gelu(h, approximate=_GELU_APPROX[activation])


def _act_into(h: Tensor, activation: str, out: Tensor) -> Tensor:
    if activation == "relu":
        return torch.clamp_min(h, 0, out=out)
    return torch.ops.aten.gelu.out(h, approximate=_GELU_APPROX[activation], out=out)


def _act_backward_(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """Overwrite ``h`` with d act(h) * grad (elementwise, so writing over an input is safe)."""
    if activation == "relu":
        return torch.mul(grad, h > 0, out=h)
    return torch.ops.aten.gelu_backward.grad_input(grad, h, approximate=_GELU_APPROX[activation], grad_input=h)


class _GroupedMLP(torch.autograd.Function):
    """y = act(x @ w1[e]) @ w2[e] over each expert's contiguous rows.

    Saves only x and the pre-activation h (the activation is recomputed). Backward makes one pass
    over the experts, each expert's four products back to back while its rows and weights are in
    cache (with 128 experts the weights, not the FLOPs, are what costs: each is read once per pass):
    dW2 = act(h)^T g, dh = act'(h) * (g w2^T) written over h, dW1 = x^T dh, dx = dh w1^T written over
    x. The one [n_e, F] temporary per expert (act(h), then g w2^T) lives in the part of dW1's buffer
    not written yet, so backward allocates nothing beyond the weight gradients while an expert has
    at most (experts left) x D rows, and the peak stays under a dense FFN's plus the experts' own
    weight gradients. Backward consumes its saved tensors: it runs once per forward (no
    ``retain_graph``)."""

    @staticmethod
    def forward(ctx, x_ND, w1_EDF, w2_EFD, counts_E, activation, pad_rows):
        N = x_ND.shape[0]
        h_NF = x_ND.new_empty(N, w1_EDF.shape[2])
        y_ND = x_ND.new_empty(N, w2_EFD.shape[2])
        w1_fwd, w2_fwd = _forward_layout(w1_EDF), _forward_layout(w2_EFD)
        for e, rows in _expert_rows(counts_E):
            if pad_rows and (rows.stop - rows.start) % pad_rows:
                x = _pad(x_ND[rows], pad_rows)
                h = torch.mm(x, w1_fwd[e])
                h_NF[rows] = h[: rows.stop - rows.start]
                y_ND[rows] = torch.mm(_act(h, activation), w2_fwd[e])[: rows.stop - rows.start]
                continue
            torch.mm(x_ND[rows], w1_fwd[e], out=h_NF[rows])
            torch.mm(_act(h_NF[rows], activation), w2_fwd[e], out=y_ND[rows])
        ctx.save_for_backward(x_ND, h_NF, w1_EDF, w2_EFD)
        ctx.counts_E, ctx.activation, ctx.pad_rows, ctx.consumed = counts_E, activation, pad_rows, False
        return y_ND

    @staticmethod
    def backward(ctx, grad_ND):
        if ctx.consumed:
            raise RuntimeError("grouped_mlp's backward consumes its saved activations; it cannot be retained")
        ctx.consumed = True
        x_ND, h_NF, w1_EDF, w2_EFD = ctx.saved_tensors
        grad_ND = grad_ND.contiguous()
        grad_w1 = torch.empty_like(w1_EDF, memory_format=torch.contiguous_format)   # its tail is scratch space
        grad_w2 = torch.empty_like(w2_EFD, memory_format=torch.contiguous_format)
        unwritten_w1 = grad_w1.view(-1)        # grad_w1[e:], not written yet: expert e's scratch space
        want_dx = ctx.needs_input_grad[0]
        for e, rows in _expert_rows(ctx.counts_E):
            x, h, g = x_ND[rows], h_NF[rows], grad_ND[rows]
            n = h.shape[0]
            padded = bool(ctx.pad_rows and n % ctx.pad_rows)
            if padded:                               # the same products over zero-padded copies
                x, h, g = _pad(x, ctx.pad_rows), _pad(h, ctx.pad_rows), _pad(g, ctx.pad_rows)
            m, F_ = h.shape
            free = unwritten_w1[e * w1_EDF[0].numel():]
            a = free[: m * F_].view(m, F_) if free.numel() >= m * F_ else torch.empty_like(h)
            _act_into(h, ctx.activation, a)
            torch.mm(a.t(), g, out=grad_w2[e])
            _act_backward_(torch.mm(g, w2_EFD[e].t(), out=a), h, ctx.activation)   # h <- dh
            torch.mm(x.t(), h, out=grad_w1[e])                                     # a's space is reused
            if want_dx:
                torch.mm(h, w1_EDF[e].t(), out=x)                                    # x <- dx
                if padded:
                    x_ND[rows] = x[:n]
        for e, n in enumerate(ctx.counts_E):   # experts without rows: zeros (not None: they stay in the graph)
            if not n:
                grad_w1[e].zero_(), grad_w2[e].zero_()
        # x_ND now holds dx (the kernel contract allows it: ``grouped_mlp`` copies leaf and view
        # inputs first). The out= writes bump x_ND's version counter, so any other op that saved
        # x_ND fails loudly in its backward, never silently.
        return x_ND if want_dx else None, grad_w1, grad_w2, None, None, None


def _forward_layout(w_EIO: Tensor) -> Tensor:
    """The same [E, in, out] values, column-major per expert for 16-bit CPU matmuls.

    On CPUs without native bf16 matrix instructions, torch.mm(A, B) in bf16 is ~30x slower when
    both operands are row-major than when B is a transposed view (measured: 2.3 s vs 78 ms for
    600x512 @ 512x2048). The backward products already have a transposed operand; the forward
    ones get it from this copy. fp32 keeps the stored layout (no copy)."""
    if w_EIO.dtype == torch.float32 or w_EIO.device.type != "cpu":
        return w_EIO
    return w_EIO.transpose(1, 2).contiguous().transpose(1, 2)


def _expert_rows(counts_E: list[int]):
    """(expert, row slice) for every expert that has rows."""
    start = 0
    for e, n in enumerate(counts_E):
        if n:
            yield e, slice(start, start + n)
            start += n


def _pad(rows: Tensor, multiple: int) -> Tensor:
    """``rows`` followed by zero rows up to a multiple of ``multiple`` (zero rows add nothing to any
    product here: act(0) = 0 for every activation, and their gradients are zero)."""
    n = rows.shape[0]
    out = rows.new_zeros(-(-n // multiple) * multiple, rows.shape[1])
    out[:n] = rows
    return out


def grouped_mlp(x_ND: Tensor, counts_E: Tensor, w1_EDF: Tensor, w2_EFD: Tensor,
                activation: str = "gelu", pad_rows: int = 0) -> Tensor:
    """``pad_rows`` > 0 runs each expert's products over its rows zero-padded to a multiple of it,
    so the GEMM shapes come from a small stable set ([kernels] pad_rows: for bf16 on CPUs with AMX,
    where oneDNN builds a kernel for every new shape)."""
    counts_E = counts_E.tolist() if isinstance(counts_E, Tensor) else list(counts_E)   # the loops need ints
    x_ND = x_ND.to(compute_dtype(x_ND))
    if x_ND.requires_grad and (x_ND.is_leaf or x_ND._base is not None):
        x_ND = x_ND.clone()   # backward writes dx over its input: never over the caller's tensor
    with torch.autocast(x_ND.device.type, enabled=False):
        return _GroupedMLP.apply(x_ND, w1_EDF.to(x_ND.dtype), w2_EFD.to(x_ND.dtype), counts_E, activation, pad_rows)


class _Unpermute(torch.autograd.Function):
    """out[t] = sum over rows r of token t: w[r] * y[r], without a [N, D] product temporary in
    backward (the weight gradient is a row-wise dot product)."""

    @staticmethod
    def forward(ctx, y_ND, w_N, token_idx_N, num_tokens):
        ctx.save_for_backward(y_ND, w_N, token_idx_N)
        out_TD = y_ND.new_zeros(num_tokens, y_ND.shape[1])
        return out_TD.index_add_(0, token_idx_N, y_ND * w_N[:, None])

    @staticmethod
    def backward(ctx, grad_TD):
        y_ND, w_N, token_idx_N = ctx.saved_tensors
        g_ND = grad_TD.index_select(0, token_idx_N)
        grad_w = torch.linalg.vecdot(g_ND, y_ND) if ctx.needs_input_grad[1] else None
        return g_ND.mul_(w_N[:, None]), grad_w, None, None


def unpermute(y_ND: Tensor, perm: Permutation, weights_TK: Tensor) -> Tensor:
    w_N = weights_TK.reshape(-1).index_select(0, perm.slot_N).to(y_ND.dtype)
    return _Unpermute.apply(y_ND, w_N, perm.token_idx_N, perm.num_tokens)


KERNELS = {"route": route, "permute": permute, "grouped_mlp": grouped_mlp, "unpermute": unpermute}


@hookimpl(trylast=True)
def rapid_kernel(op, device, dtype, backend):
    if backend in ("auto", KERNEL_BACKEND):
        return KERNELS.get(op)
    return None
