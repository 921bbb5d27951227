"""route, permute and unpermute built from six row primitives, shared by the ``triton`` and ``cuda``
kernel backends (each supplies the primitives as a class of static methods, ``rows``; the capacity
and order logic after the top-k is the reference's ``route_from_topk``):

    softmax_topk(logits_TE fp32, k) -> (probs_TE, top_TK long, gates_TK)
    block_histogram(keys long, buckets) -> hist [blocks, buckets]    keys of each block per bucket
    block_scatter(keys, base [blocks, buckets], buckets) -> order    stable: dest[base[b, key] + rank] = i
    gather_rows(src, idx) -> src[idx]
    combine_rows(src, row_of_slot, w_slots | None, T, K) -> out[t] = sum_k w * src[row_of_slot[t, k]]
    scale_rows_dot(g, y, token_of_row, w_row) -> (dy = w * g[token], dw = <g[token], y>)

The expert order is a stable counting sort (histogram, torch.cumsum, scatter): the one sort of the
fused route, none in permute when the order is handed over. Backward passes are gathers driven by
the inverse order (each slot's row), so nothing needs atomics and results are deterministic.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from rapid.builtin.kernels.reference import route_from_topk
from rapid.kernels import Permutation, RouteResult


def stable_order(rows, keys: Tensor, buckets: int) -> tuple[Tensor, Tensor]:
    """(order, counts): a stable sort of ``keys`` (0..buckets-1) and each bucket's size."""
    keys = keys.contiguous()
    hist = rows.block_histogram(keys, buckets)
    counts = hist.sum(0)
    base = (torch.cumsum(counts, 0) - counts)[None, :] + torch.cumsum(hist, 0) - hist   # block b's run of key e
    return rows.block_scatter(keys, base.contiguous(), buckets), counts


def route(rows, logits_TE: Tensor, top_k: int, capacity, drop_policy: str) -> RouteResult:
    probs, top, gates = rows.softmax_topk(logits_TE.detach().float().contiguous(), top_k)
    if logits_TE.requires_grad:      # probabilities and gates stay differentiable functions of the logits
        probs = torch.softmax(logits_TE.float(), dim=-1)
        gates = probs.gather(1, top)
    return route_from_topk(functools.partial(stable_order, rows), probs, top, gates, capacity, drop_policy)


def row_of_slot(perm: Permutation, slots: int) -> Tensor:
    """Inverse of the order: the row of each [T*K] slot, -1 where the slot has none."""
    inv = torch.full((slots,), -1, dtype=torch.int64, device=perm.slot_N.device)
    return inv.index_copy_(0, perm.slot_N, torch.arange(perm.slot_N.numel(), device=inv.device))


class _Gather(torch.autograd.Function):
    """x_ND = x_TD[token_idx_N]; backward: dx[t] = sum over t's slots of d_rows[row_of_slot]."""

    @staticmethod
    def forward(ctx, x_TD, token_idx_N, slot_rows, K, rows):
        ctx.save_for_backward(slot_rows)
        ctx.K, ctx.T, ctx.rows = K, x_TD.shape[0], rows
        return rows.gather_rows(x_TD.contiguous(), token_idx_N)

    @staticmethod
    def backward(ctx, g_ND):
        (slot_rows,) = ctx.saved_tensors
        return ctx.rows.combine_rows(g_ND.contiguous(), slot_rows, None, ctx.T, ctx.K), None, None, None, None


def permute(rows, x_TD: Tensor, expert_ids_TK: Tensor, num_experts: int, order: Permutation | None = None):
    T, K = expert_ids_TK.shape
    if order is None:
        flat = expert_ids_TK.reshape(-1)
        slots, counts = stable_order(rows, torch.where(flat >= 0, flat, num_experts), num_experts + 1)  # dropped last
        counts_E = counts[:num_experts]
        # the row count is the output's shape: one host sync, as any dispatch without a handed-over order
        slot_N = slots[: int(counts_E.sum())]
        order = Permutation(slot_N // K if K > 1 else slot_N, slot_N, counts_E, T)
    return _Gather.apply(x_TD, order.token_idx_N, row_of_slot(order, T * K), K, rows), order


class _Combine(torch.autograd.Function):
    """out[t] = sum_k w[t, k] * y[row_of_slot[t, k]]."""

    @staticmethod
    def forward(ctx, y_ND, w_slots, slot_rows, token_idx_N, slot_N, T, K, rows):
        ctx.save_for_backward(y_ND, w_slots, token_idx_N, slot_N)
        ctx.rows = rows
        return rows.combine_rows(y_ND.contiguous(), slot_rows, w_slots, T, K)

    @staticmethod
    def backward(ctx, g_TD):
        y_ND, w_slots, token_idx_N, slot_N = ctx.saved_tensors
        dy, dw_row = ctx.rows.scale_rows_dot(g_TD.contiguous(), y_ND.contiguous(), token_idx_N,
                                             w_slots.index_select(0, slot_N))
        dw = torch.zeros_like(w_slots).index_copy_(0, slot_N, dw_row.to(w_slots.dtype))
        return dy, dw, None, None, None, None, None, None


def unpermute(rows, y_ND: Tensor, perm: Permutation, weights_TK: Tensor) -> Tensor:
    T, K = weights_TK.shape
    w_slots = weights_TK.reshape(-1).to(y_ND.dtype).contiguous()
    return _Combine.apply(y_ND, w_slots, row_of_slot(perm, T * K), perm.token_idx_N, perm.slot_N, T, K, rows)


def ops(rows) -> dict:
    """The three kernels over ``rows``' primitives, as a backend's ``{op: implementation}``."""
    return {
        "route": lambda logits_TE, top_k, capacity, drop_policy: route(rows, logits_TE, top_k, capacity, drop_policy),
        "permute": lambda x_TD, expert_ids_TK, num_experts, order=None: permute(rows, x_TD, expert_ids_TK,
                                                                                num_experts, order),
        "unpermute": lambda y_ND, perm, weights_TK: unpermute(rows, y_ND, perm, weights_TK),
    }
