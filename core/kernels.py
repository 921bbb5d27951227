"""Kernel ops on the MoE hot path, resolved through the ``rapid_kernel`` hook by tensor device/dtype.

route:       (logits_TE, top_k, capacity, drop_policy) -> RouteResult        softmax, top-k, capacity
permute:     (x_TD, expert_ids_TK, num_experts, order=None) -> (x_ND, Permutation)   rows by expert
grouped_mlp: (x_ND, counts_E, w1_EDF, w2_EFD, activation) -> y_ND              every expert's FFN
unpermute:   (y_ND, Permutation, weights_TK) -> out_TD                         scatter back, weighted sum

``route`` is the fused softmax + top-k + capacity of gated routers: fp32 probabilities, each token's
``top_k`` experts, at most ``capacity`` assignments per expert (an int, a long tensor [E], or None:
dropless) chosen by ``drop_policy`` (``rapid.moe.drop_priority``), and the expert order of the kept
assignments, sorted once. A router reaches it through ``Router.route_topk`` and hands the order on in
``Routing.order``; ``permute`` then gathers rows in that order instead of sorting again. A router that
sets no order (any third-party one) gets the generic path: ``permute`` sorts.

``counts_E`` (rows per expert) is a long tensor on the rows' device: an expert-parallel dispatcher
sends it to other ranks, and a GPU kernel reads it without a host sync (a CPU one may ``tolist()``).

Memory rule: ``grouped_mlp`` may reuse its input's storage in backward (write dx over x_ND), so
its caller must not read x_ND after backward, and an implementation must copy an input that is a
leaf or a view (a caller's own tensor) before doing so. Backward runs once (no ``retain_graph``).

A backend (``rapid_kernel`` implementation) names itself with a module attribute ``KERNEL_BACKEND``
and may define ``unavailable(op, device, dtype) -> str | None``: why it cannot serve a request (the
error an explicit ``[kernels] backend`` gets). ``rapid kernels check`` runs the kernel contract
(``rapid.builtin.kernels.contract``) over every installed backend on the current device.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from rapid import dist as rdist
from rapid.errors import UserError

OPS = ("route", "permute", "grouped_mlp", "unpermute")
_announced: set[tuple] = set()   # (op, device type, dtype, backend) already logged in this process


@dataclass
class Permutation:
    token_idx_N: Tensor   # long [N]: source token of each routed row; rows grouped by expert
    slot_N: Tensor        # long [N]: index of the row's assignment in the flattened [T*K] routing
    counts_E: Tensor      # long [E]: rows per expert, in expert order
    num_tokens: int       # T
    ids_TK: Tensor | None = None   # route: the expert ids this order was made for, and their version
    ids_version: int = -1

    def describes(self, expert_ids_TK: Tensor) -> bool:
        """True if this order was made from exactly these ids, unchanged since (a router that edits
        or replaces ``route_topk``'s ids after routing gets the generic sort, never a stale order)."""
        return self.ids_TK is expert_ids_TK and expert_ids_TK._version == self.ids_version


@dataclass
class RouteResult:
    probs_TE: Tensor       # fp32 softmax of the logits
    top_TK: Tensor         # long: each token's top_k experts before capacity (slot 0 = first choice)
    gates_TK: Tensor       # fp32: their probabilities
    expert_ids_TK: Tensor  # long: top_TK with assignments over capacity set to -1
    order: Permutation     # the kept assignments grouped by expert: what ``permute`` would sort


class Kernels:
    """Per-layer handle on the kernels hook; caches the choice per (op, device type, dtype) and logs
    it once per process."""

    def __init__(self, registry, backend: str = "auto", pad_rows: int = 0):
        valid = ["auto", *dict.fromkeys(b for b, _, _ in registry.kernel_providers())]
        if backend not in valid:
            raise UserError(f"unknown kernels backend {backend!r}; valid: {', '.join(valid)}",
                            hint="`rapid plugins` lists the installed kernel backends")
        self.registry = registry
        self.backend = backend
        self.pad_rows = pad_rows      # [kernels] pad_rows: grouped_mlp pads each expert's rows to a multiple
        self._cache: dict[tuple, object] = {}

    def get(self, op: str, like: Tensor, device_type: str | None = None, dtype: torch.dtype | None = None):
        """The implementation of ``op`` for tensors like ``like`` (or on ``device_type`` with ``dtype``)."""
        device = torch.device(device_type) if device_type else like.device
        dtype = dtype or like.dtype
        key = (op, device.type, dtype)
        hit = self._cache.get(key)
        if hit is None:
            name, fn = self.registry.kernel_choice(op, device, dtype, self.backend)
            if fn is None:
                why = self.registry.kernel_unavailable(self.backend, op, device, dtype)
                raise UserError(f"kernels backend {self.backend!r} has no {op!r} for {device.type}/"
                                f"{str(dtype).removeprefix('torch.')}" + (f": {why}" if why else ""),
                                hint='set [kernels] backend = "auto" to use the best implementation available')
            hit = self._cache[key] = (name, fn)
        if like.device.type != "meta" and (*key, hit[0]) not in _announced:   # first real use, not checks
            _announced.add((*key, hit[0]))
            if rdist.is_main():
                print(f"kernels: {op} on {device.type}/{str(dtype).removeprefix('torch.')} -> {hit[0]}",
                      file=sys.stderr)
        return hit[1]

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Resolve every op for ``device``/``dtype`` now (before a run writes anything)."""
        for op in OPS:
            fn = self.get(op, torch.empty(0, device="meta", dtype=dtype), device.type)
            if op == "grouped_mlp" and self.pad_rows and not _accepts(fn, "pad_rows"):
                raise UserError(f"[kernels] pad_rows = {self.pad_rows}: the grouped_mlp chosen for {device.type}/"
                                f"{str(dtype).removeprefix('torch.')} ({self._cache[('grouped_mlp', device.type, dtype)][0]}) "
                                "does not pad rows", hint='set [kernels] backend = "reference", or pad_rows = 0')

    def route(self, logits_TE: Tensor, top_k: int, capacity, drop_policy: str) -> RouteResult:
        if not 1 <= top_k <= logits_TE.shape[-1]:
            raise ValueError(f"route: top_k = {top_k} with {logits_TE.shape[-1]} experts (1 <= top_k <= experts)")
        return self.get("route", logits_TE)(logits_TE, top_k, capacity, drop_policy)

    def permute(self, x_TD: Tensor, expert_ids_TK: Tensor, num_experts: int, order: Permutation | None = None):
        fn = self.get("permute", x_TD)
        if order is None or not order.describes(expert_ids_TK) or not _takes_order(fn):
            return fn(x_TD, expert_ids_TK, num_experts)    # the generic path: permute sorts
        return fn(x_TD, expert_ids_TK, num_experts, order=order)

    def grouped_mlp(self, x_ND: Tensor, counts_E: Tensor, w1_EDF: Tensor, w2_EFD: Tensor,
                    activation: str = "gelu") -> Tensor:   # chosen by the dtype the products run in (autocast)
        fn = self.get("grouped_mlp", x_ND, dtype=compute_dtype(x_ND))
        if self.pad_rows:
            return fn(x_ND, counts_E, w1_EDF, w2_EFD, activation, pad_rows=self.pad_rows)
        return fn(x_ND, counts_E, w1_EDF, w2_EFD, activation)

    def unpermute(self, y_ND: Tensor, perm: Permutation, weights_TK: Tensor) -> Tensor:
        return self.get("unpermute", y_ND)(y_ND, perm, weights_TK)


_reference: Kernels | None = None


def reference_kernels() -> Kernels:
    """The builtin reference kernels, for code running outside a model (a router on its own)."""
    global _reference
    if _reference is None:
        from rapid.plugins import Registry, make_plugin_manager
        _reference = Kernels(Registry(make_plugin_manager(autoload=False)), "reference")
    return _reference


def _accepts(fn, name: str) -> bool:
    """Whether kernel ``fn`` takes keyword ``name`` (a permute written before the ``route`` op has
    no ``order``: it keeps working, and sorts)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


_order_ok: dict[int, tuple[object, bool]] = {}


def _takes_order(fn) -> bool:
    hit = _order_ok.get(id(fn))
    if hit is None or hit[0] is not fn:       # keyed by identity: implementations need not be hashable
        hit = _order_ok[id(fn)] = (fn, _accepts(fn, "order"))
    return hit[1]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's when it is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
