"""Triton kernels for the MoE hot path (``[kernels] backend = "triton"``; ``pip install rapidmoe[triton]``).

- ``route``: one program per block of tokens computes the fp32 softmax and the top-k (k rounds of
  argmax), writing probabilities, choices and gates; the expert order is a stable counting sort
  (per-block histograms, a scan, a scatter: no comparison sort), which also yields the counts and
  applies the capacity (``position`` policy; ``random``/``probs`` rank by priority first).
- ``permute`` / ``unpermute``: gathers driven by the order and its inverse (each token's row per
  slot), forward and backward, so no atomics and the results are deterministic.
- ``grouped_mlp``: a grouped GEMM over the experts' contiguous row blocks (tile -> expert from the
  counts on the device: no host sync), forward and backward as a ``torch.autograd.Function``;
  the weight gradients are a per-expert reduction over its rows (an expert without rows gets zeros).

On a GPU ``auto`` takes these kernels. On the CPU they run only under Triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is imported) and only when asked for by name: that is how
the test suite checks them against the reference. Triton 3.9.0's interpreter computes ``tl.dot`` of
bf16 tiles wrongly (max error 3e10 on a 37x20 @ 20x29 product); under the interpreter the tiles are
widened to fp32 before the dot (``UPCAST``), on a GPU they are not.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from rapid import hookimpl
from rapid.builtin.kernels import dispatch
from rapid.kernels import compute_dtype

KERNEL_BACKEND = "triton"


def _interpret() -> bool:
    """Triton's interpreter is on (read at each use: tests switch it with the environment)."""
    return os.environ.get("TRITON_INTERPRET") == "1"

_GELU_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}


def unavailable(op, device, dtype) -> str | None:
    """Why this backend cannot serve ``op`` on ``device``/``dtype`` (None: it can)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install 'rapidmoe[triton]'"
    if device.type == "cpu" and not _interpret():
        return "Triton runs on the CPU only under its interpreter: set TRITON_INTERPRET=1 (slow; for tests)"
    if device.type not in ("cpu", "cuda"):
        return f"no Triton target for device {device.type!r}"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {dtype} (fp32, bf16 and fp16 only)"
    return None


@hookimpl
def rapid_kernel(op, device, dtype, backend):
    if backend not in ("auto", KERNEL_BACKEND) or op not in KERNELS:
        return None
    if backend == "auto" and device.type != "cuda":     # the interpreter is for tests, never a default
        return None
    if unavailable(op, device, dtype):
        return None
    return KERNELS[op]


# ---------------------------------------------------------------- the kernels (built on first use)
_K: dict[bool, dict] = {}   # interpreted or compiled -> the kernels


def _kernels():
    """Defined on first use (importing this module must not need triton: the plugin is always
    listed), once for the interpreter and once for compilation, as the environment says."""
    if _interpret() in _K:
        return _K[_interpret()]
    import triton
    import triton.language as tl

    @triton.jit
    def softmax_topk(logits, probs, top, gates, T, E, K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
        rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)   # 64-bit offsets: rows * E may pass 2^31
        cols = tl.arange(0, BE)
        rmask, cmask = rows < T, cols < E
        m2 = rmask[:, None] & cmask[None, :]
        z = tl.load(logits + rows[:, None] * E + cols[None, :], mask=m2, other=-float("inf")).to(tl.float32)
        z = tl.where(rmask[:, None], z, 0.0)                    # rows past T: finite, never stored
        z = z - tl.max(z, axis=1)[:, None]
        ez = tl.where(m2, tl.exp(z), 0.0)
        p = ez / tl.where(rmask, tl.sum(ez, axis=1), 1.0)[:, None]
        tl.store(probs + rows[:, None] * E + cols[None, :], p, mask=m2)
        # NaN probabilities (NaN logits) rank as -0.5: still distinct, valid ids, and a NaN gate
        work = tl.where(m2, tl.where(p == p, p, -0.5), -1.0)
        for k in tl.static_range(K):        # k rounds of argmax; ties go to the lower expert id
            best = tl.max(work, axis=1)
            idx = tl.min(tl.where(work == best[:, None], cols[None, :], BE), axis=1)
            idx = tl.minimum(idx, E - 1)
            tl.store(top + rows * K + k, idx.to(tl.int64), mask=rmask)
            tl.store(gates + rows * K + k, tl.where(best == -0.5, float("nan"), best), mask=rmask)
            work = tl.where(cols[None, :] == idx[:, None], -2.0, work)

    @triton.jit
    def block_histogram(keys, hist, n, NB: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr):
        """hist[b, e]: how many of block b's keys equal e (keys in 0..NB-1; NB = E + 1 buckets)."""
        b = tl.program_id(0)
        offs = (b * BN + tl.arange(0, BN)).to(tl.int64)
        k = tl.load(keys + offs, mask=offs < n, other=BE)
        buckets = tl.arange(0, BE)
        counts = tl.sum((k[:, None] == buckets[None, :]).to(tl.int64), axis=0)
        tl.store(hist + b * NB + buckets, counts, mask=buckets < NB)

    @triton.jit
    def block_scatter(keys, src_index, base, dest, n, NB: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr):
        """Stable counting sort, last pass: element i of block b goes to base[b, key] + (how many
        earlier elements of the block share its key); dest[pos] = src_index[i]."""
        b = tl.program_id(0)
        offs = (b * BN + tl.arange(0, BN)).to(tl.int64)
        valid = offs < n
        k = tl.load(keys + offs, mask=valid, other=BE)
        onehot = (k[:, None] == tl.arange(0, BE)[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - onehot                  # earlier equal keys in the block
        rank = tl.sum(before * onehot, axis=1)
        start = tl.load(base + b * NB + k, mask=valid, other=0)
        src = tl.load(src_index + offs, mask=valid, other=0)
        tl.store(dest + start + rank, src, mask=valid)

    @triton.jit
    def gather_rows(src, idx, out, n, D, BN: tl.constexpr, BD: tl.constexpr):
        """out[i] = src[idx[i]] (idx < 0: zeros)."""
        rows = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
        i = tl.load(idx + rows, mask=rows < n, other=-1)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            m = (rows[:, None] < n) & (cols[None, :] < D)
            v = tl.load(src + i[:, None] * D + cols[None, :], mask=m & (i[:, None] >= 0), other=0.0)
            tl.store(out + rows[:, None] * D + cols[None, :], v, mask=m)

    @triton.jit
    def combine_rows(src, row_of_slot, weight_of_slot, out, T, D, K: tl.constexpr, WEIGHTED: tl.constexpr,
                     BT: tl.constexpr, BD: tl.constexpr):
        """out[t] = sum_k w[t, k] * src[row_of_slot[t, k]] over the slots that have a row (fp32 sum)."""
        toks = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            m = (toks[:, None] < T) & (cols[None, :] < D)
            acc = tl.zeros((BT, BD), dtype=tl.float32)
            for k in tl.static_range(K):
                r = tl.load(row_of_slot + toks * K + k, mask=toks < T, other=-1)
                v = tl.load(src + r[:, None] * D + cols[None, :], mask=m & (r[:, None] >= 0), other=0.0).to(tl.float32)
                if WEIGHTED:
                    v = v * tl.load(weight_of_slot + toks * K + k, mask=toks < T, other=0.0).to(tl.float32)[:, None]
                acc += v
            tl.store(out + toks[:, None] * D + cols[None, :], acc.to(out.dtype.element_ty), mask=m)

    @triton.jit
    def scale_rows_dot(g, y, token_of_row, w_row, dy, dw, N, D, BN: tl.constexpr, BD: tl.constexpr):
        """Backward of the weighted combine for row r of token t: dy[r] = w[r] * g[t], dw[r] = <g[t], y[r]>."""
        rows = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
        rm = rows < N
        t = tl.load(token_of_row + rows, mask=rm, other=0)
        w = tl.load(w_row + rows, mask=rm, other=0.0).to(tl.float32)
        dot = tl.zeros((BN,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            m = rm[:, None] & (cols[None, :] < D)
            gv = tl.load(g + t[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            yv = tl.load(y + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(dy + rows[:, None] * D + cols[None, :], (gv * w[:, None]).to(dy.dtype.element_ty), mask=m)
            dot += tl.sum(gv * yv, axis=1)
        tl.store(dw + rows, dot, mask=rm)

    @triton.jit
    def grouped_rows_mm(a, b, c, counts, row_start, tile_start, E, N, KD, MD,
                        sbe, sbk, sbn, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
        """c[rows of e] = a[rows of e] @ B_e for every expert e, B_e[k, n] = b[e*sbe + k*sbk + n*sbn]
        (strides give B_e or its transpose). Program (m, n): row tile m of the expert that owns it."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        e = 0
        for j in range(0, E):                                    # the expert whose tiles include pid_m
            e = tl.where(tl.load(tile_start + j) <= pid_m, j, e)
        first = tl.load(tile_start + e)
        cnt = tl.load(counts + e)
        if (pid_m - first) * BM < cnt:
            r0 = tl.load(row_start + e) + (pid_m - first) * BM
            rows = r0 + tl.arange(0, BM)
            rmask = tl.arange(0, BM) < cnt - (pid_m - first) * BM
            cols = pid_n * BN + tl.arange(0, BN)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, KD, BK):
                ks = k0 + tl.arange(0, BK)
                av = tl.load(a + rows[:, None] * KD + ks[None, :], mask=rmask[:, None] & (ks[None, :] < KD), other=0.0)
                bv = tl.load(b + e.to(tl.int64) * sbe + ks[:, None] * sbk + cols[None, :] * sbn,
                             mask=(ks[:, None] < KD) & (cols[None, :] < MD), other=0.0)
                if UPCAST:
                    av, bv = av.to(tl.float32), bv.to(tl.float32)
                acc += tl.dot(av, bv, input_precision="ieee")   # fp32 stays fp32 (no TF32)
            tl.store(c + rows[:, None] * MD + cols[None, :], acc.to(c.dtype.element_ty),
                     mask=rmask[:, None] & (cols[None, :] < MD))

    @triton.jit
    def grouped_wgrad(a, b, c, counts, row_start, KA, KB, BM: tl.constexpr, BN: tl.constexpr,
                      BR: tl.constexpr, UPCAST: tl.constexpr):
        """c[e] = a[rows of e]^T @ b[rows of e] ([KA, KB] per expert; zeros for an expert without rows)."""
        e, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cnt = tl.load(counts + e)
        r0 = tl.load(row_start + e)
        ms = pid_m * BM + tl.arange(0, BM)
        ns = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for i0 in range(0, cnt, BR):
            rs = i0 + tl.arange(0, BR)
            rm = rs < cnt
            at = tl.load(a + (r0 + rs)[None, :] * KA + ms[:, None], mask=rm[None, :] & (ms[:, None] < KA), other=0.0)
            bv = tl.load(b + (r0 + rs)[:, None] * KB + ns[None, :], mask=rm[:, None] & (ns[None, :] < KB), other=0.0)
            if UPCAST:
                at, bv = at.to(tl.float32), bv.to(tl.float32)
            acc += tl.dot(at, bv, input_precision="ieee")
        tl.store(c + e.to(tl.int64) * KA * KB + ms[:, None] * KB + ns[None, :], acc.to(c.dtype.element_ty),
                 mask=(ms[:, None] < KA) & (ns[None, :] < KB))

    _K[_interpret()] = dict(softmax_topk=softmax_topk, block_histogram=block_histogram, block_scatter=block_scatter,
              gather_rows=gather_rows, combine_rows=combine_rows, scale_rows_dot=scale_rows_dot,
              grouped_rows_mm=grouped_rows_mm, grouped_wgrad=grouped_wgrad, cdiv=triton.cdiv,
              next_pow2=triton.next_power_of_2)
    return _K[_interpret()]


def _tiles(device_type: str) -> dict:
    # tl.dot needs every tile dimension >= 16; the interpreter is fastest with small tiles
    if _interpret() or device_type == "cpu":
        return dict(BM=16, BN=16, BK=16, BR=16, BT=16, BD=16, SORT=64)
    return dict(BM=64, BN=64, BK=32, BR=32, BT=32, BD=64, SORT=256)


# ---------------------------------------------------------------- the row primitives for the shared glue
class TritonRows:
    """The primitives ``rapid.builtin.kernels.dispatch`` builds route/permute/unpermute from."""

    @staticmethod
    def softmax_topk(logits_TE: Tensor, top_k: int):
        K, t = _kernels(), _tiles(logits_TE.device.type)
        T, E = logits_TE.shape
        probs = torch.empty(T, E, dtype=torch.float32, device=logits_TE.device)
        top = torch.empty(T, top_k, dtype=torch.int64, device=logits_TE.device)
        gates = torch.empty(T, top_k, dtype=torch.float32, device=logits_TE.device)
        if T:
            K["softmax_topk"][(K["cdiv"](T, t["BT"]),)](logits_TE, probs, top, gates, T, E, K=top_k, BT=t["BT"],
                                                      BE=K["next_pow2"](E))
        return probs, top, gates

    @staticmethod
    def block_histogram(keys: Tensor, buckets: int) -> Tensor:
        K, t = _kernels(), _tiles(keys.device.type)
        n, BN = keys.numel(), t["SORT"]
        blocks = max(K["cdiv"](n, BN), 1)
        hist = torch.zeros(blocks, buckets, dtype=torch.int64, device=keys.device)
        if n:
            K["block_histogram"][(blocks,)](keys, hist, n, NB=buckets, BN=BN, BE=K["next_pow2"](buckets + 1))
        return hist

    @staticmethod
    def block_scatter(keys: Tensor, base: Tensor, buckets: int) -> Tensor:
        K, t = _kernels(), _tiles(keys.device.type)
        n, BN = keys.numel(), t["SORT"]
        order = torch.empty(n, dtype=torch.int64, device=keys.device)
        if n:
            K["block_scatter"][(K["cdiv"](n, BN),)](keys, torch.arange(n, device=keys.device), base, order, n,
                                                    NB=buckets, BN=BN, BE=K["next_pow2"](buckets + 1))
        return order

    @staticmethod
    def gather_rows(src: Tensor, idx: Tensor) -> Tensor:
        K, t = _kernels(), _tiles(src.device.type)
        N, D = idx.numel(), src.shape[1]
        out = src.new_empty(N, D)
        if N:
            K["gather_rows"][(K["cdiv"](N, t["BT"]),)](src, idx, out, N, D, BN=t["BT"], BD=t["BD"])
        return out

    @staticmethod
    def combine_rows(src: Tensor, row_of_slot: Tensor, w_slots: Tensor | None, T: int, K_: int) -> Tensor:
        K, t = _kernels(), _tiles(src.device.type)
        D = src.shape[1]
        out = src.new_empty(T, D)
        if T:
            K["combine_rows"][(K["cdiv"](T, t["BT"]),)](src, row_of_slot, w_slots if w_slots is not None else src,
                                                       out, T, D, K=K_, WEIGHTED=w_slots is not None,
                                                       BT=t["BT"], BD=t["BD"])
        return out

    @staticmethod
    def scale_rows_dot(g: Tensor, y: Tensor, token_of_row: Tensor, w_row: Tensor):
        K, t = _kernels(), _tiles(g.device.type)
        N, D = y.shape
        dy, dw = torch.empty_like(y), torch.empty(N, dtype=torch.float32, device=y.device)
        if N:
            K["scale_rows_dot"][(K["cdiv"](N, t["BT"]),)](g, y, token_of_row, w_row, dy, dw, N, D,
                                                         BN=t["BT"], BD=t["BD"])
        return dy, dw


# ---------------------------------------------------------------- grouped GEMM and the expert FFN
def _offsets(counts_E: Tensor, BM: int):
    counts = counts_E.to(torch.int64)
    row_start = torch.cumsum(counts, 0) - counts
    tiles = (counts + BM - 1) // BM
    tile_start = torch.cumsum(tiles, 0) - tiles
    return counts.contiguous(), row_start.contiguous(), tile_start.contiguous()


def _rows_mm(a_ND: Tensor, w_EKM: Tensor, counts_E: Tensor, transpose: bool = False) -> Tensor:
    """Row blocks of a (grouped by expert) times each expert's matrix (or its transpose)."""
    K_, t = _kernels(), _tiles(a_ND.device.type)
    E = w_EKM.shape[0]
    KD = w_EKM.shape[2] if transpose else w_EKM.shape[1]
    MD = w_EKM.shape[1] if transpose else w_EKM.shape[2]
    N = a_ND.shape[0]
    out = a_ND.new_empty(N, MD)
    if N == 0:
        return out
    counts, row_start, tile_start = _offsets(counts_E, t["BM"])
    sbe, s1, s2 = w_EKM.stride()
    sbk, sbn = (s2, s1) if transpose else (s1, s2)
    grid = (K_["cdiv"](N, t["BM"]) + E, K_["cdiv"](MD, t["BN"]))   # at most one partial tile per expert
    K_["grouped_rows_mm"][grid](a_ND.contiguous(), w_EKM, out, counts, row_start, tile_start, E, N, KD, MD,
                                sbe, sbk, sbn, BM=t["BM"], BN=t["BN"], BK=t["BK"],
                                UPCAST=_interpret() and a_ND.dtype != torch.float32)
    return out


def _wgrad(a_ND: Tensor, b_ND: Tensor, counts_E: Tensor) -> Tensor:
    K_, t = _kernels(), _tiles(a_ND.device.type)
    E, KA, KB = counts_E.numel(), a_ND.shape[1], b_ND.shape[1]
    out = a_ND.new_empty(E, KA, KB)
    counts, row_start, _ = _offsets(counts_E, t["BM"])
    grid = (E, K_["cdiv"](KA, t["BM"]), K_["cdiv"](KB, t["BN"]))
    K_["grouped_wgrad"][grid](a_ND.contiguous(), b_ND.contiguous(), out, counts, row_start, KA, KB,
                              BM=t["BM"], BN=t["BN"], BR=t["BR"], UPCAST=_interpret() and a_ND.dtype != torch.float32)
    return out


def _act(h: Tensor, activation: str) -> Tensor:
    return torch.relu(h) if activation == "relu" else F.gelu(h, approximate=_GELU_APPROX[activation])


def _act_backward(g: Tensor, h: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return g * (h > 0)
    return torch.ops.aten.gelu_backward(g, h, approximate=_GELU_APPROX[activation])


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w1_EDF, w2_EFD, counts_E, activation):
        h_NF = _rows_mm(x_ND, w1_EDF, counts_E)
        y_ND = _rows_mm(_act(h_NF, activation), w2_EFD, counts_E)
        ctx.save_for_backward(x_ND, h_NF, w1_EDF, w2_EFD, counts_E)
        ctx.activation = activation
        return y_ND

    @staticmethod
    def backward(ctx, g_ND):
        x_ND, h_NF, w1_EDF, w2_EFD, counts_E = ctx.saved_tensors
        g_ND = g_ND.contiguous()
        a_NF = _act(h_NF, ctx.activation)
        grad_w2 = _wgrad(a_NF, g_ND, counts_E)
        dh_NF = _act_backward(_rows_mm(g_ND, w2_EFD, counts_E, transpose=True), h_NF, ctx.activation)
        grad_w1 = _wgrad(x_ND, dh_NF, counts_E)
        dx = _rows_mm(dh_NF, w1_EDF, counts_E, transpose=True) if ctx.needs_input_grad[0] else None
        return dx, grad_w1, grad_w2, None, None


def grouped_mlp(x_ND: Tensor, counts_E: Tensor, w1_EDF: Tensor, w2_EFD: Tensor, activation: str = "gelu") -> Tensor:
    counts_E = torch.as_tensor(counts_E, device=x_ND.device)
    x_ND = x_ND.to(compute_dtype(x_ND))
    with torch.autocast(x_ND.device.type, enabled=False):
        return _GroupedMLP.apply(x_ND, w1_EDF.to(x_ND.dtype).contiguous(), w2_EFD.to(x_ND.dtype).contiguous(),
                                 counts_E, activation)


KERNELS = {**dispatch.ops(TritonRows), "grouped_mlp": grouped_mlp}
