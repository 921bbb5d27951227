"""Kernel ops on the MoE hot path, resolved through the ``rapid_kernel`` hook by tensor device/dtype.

permute:     (x_TD, expert_ids_TK, num_experts) -> (x_ND, Permutation)   rows grouped by expert
grouped_mlp: (x_ND, counts_E, w1_EDF, w2_EFD, activation) -> y_ND        every expert's FFN

``counts_E`` (rows per expert) is a long tensor on the rows' device: an expert-parallel dispatcher
sends it to other ranks, and a GPU kernel reads it without a host sync (a CPU one may ``tolist()``).
unpermute:   (y_ND, Permutation, weights_TK) -> out_TD                   scatter back, weighted sum

Memory rule: ``grouped_mlp`` may reuse its input's storage in backward (write dx over x_ND), so
its caller must not read x_ND after backward, and an implementation must copy an input that is a
leaf or a view (a caller's own tensor) before doing so. Backward runs once (no ``retain_graph``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rapid.errors import UserError

OPS = ("permute", "grouped_mlp", "unpermute")


@dataclass
class Permutation:
    token_idx_N: Tensor   # long [N]: source token of each routed row; rows grouped by expert
    slot_N: Tensor        # long [N]: index of the row's assignment in the flattened [T*K] routing
    counts_E: Tensor      # long [E]: rows per expert, in expert order
    num_tokens: int       # T


class Kernels:
    """Per-layer handle on the kernels hook; caches the choice per (op, device type, dtype)."""

    def __init__(self, registry, backend: str = "auto"):
        valid = ["auto", *dict.fromkeys(b for b, _, _ in registry.kernel_providers())]
        if backend not in valid:
            raise UserError(f"unknown kernels backend {backend!r}; valid: {', '.join(valid)}")
        self.registry = registry
        self.backend = backend
        self._cache: dict[tuple, object] = {}

    def get(self, op: str, like: Tensor, device_type: str | None = None):
        device = torch.device(device_type) if device_type else like.device
        key = (op, device.type, like.dtype)
        fn = self._cache.get(key)
        if fn is None:
            fn = self.registry.kernel(op, device, like.dtype, self.backend)
            if fn is None:
                raise UserError(
                    f"no {op!r} kernel for backend {self.backend!r} on {device.type}/{like.dtype}",
                    hint='set [kernels] backend = "auto" to use whatever implementation fits')
            self._cache[key] = fn
        return fn

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Resolve every op for ``device``/``dtype`` now (before a run writes anything)."""
        for op in OPS:
            self.get(op, torch.empty(0, device="meta", dtype=dtype), device.type)

    def permute(self, x_TD: Tensor, expert_ids_TK: Tensor, num_experts: int):
        return self.get("permute", x_TD)(x_TD, expert_ids_TK, num_experts)

    def grouped_mlp(self, x_ND: Tensor, counts_E: Tensor, w1_EDF: Tensor, w2_EFD: Tensor,
                    activation: str = "gelu") -> Tensor:
        return self.get("grouped_mlp", x_ND)(x_ND, counts_E, w1_EDF, w2_EFD, activation)

    def unpermute(self, y_ND: Tensor, perm: Permutation, weights_TK: Tensor) -> Tensor:
        return self.get("unpermute", y_ND)(y_ND, perm, weights_TK)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's when it is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
