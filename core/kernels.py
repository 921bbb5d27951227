"""Kernel ops on the MoE hot path, resolved through the ``rapid_kernel`` hook by tensor device/dtype.

permute:     (x_TD, expert_ids_TK, num_experts) -> (x_ND, Permutation)   rows grouped by expert
grouped_mlp: (x_ND, counts_E, w1_EDF, w2_EFD, activation) -> y_ND        every expert's FFN
unpermute:   (y_ND, Permutation, weights_TK) -> out_TD                   scatter back, weighted sum
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rapid.errors import UserError

OPS = ("permute", "grouped_mlp", "unpermute")
BACKENDS = ("auto", "reference", "triton", "cuda")


@dataclass
class Permutation:
    token_idx_N: Tensor   # long [N]: source token of each routed row; rows grouped by expert
    slot_N: Tensor        # long [N]: index of the row's assignment in the flattened [T*K] routing
    counts_E: list[int]   # rows per expert, in expert order
    num_tokens: int       # T


class Kernels:
    """Per-layer handle on the kernels hook; caches the choice per (op, device type, dtype)."""

    def __init__(self, registry, backend: str = "auto"):
        if backend not in BACKENDS:
            raise UserError(f"unknown kernels backend {backend!r}; valid: {', '.join(BACKENDS)}")
        self.registry = registry
        self.backend = backend
        self._cache: dict[tuple, object] = {}

    def get(self, op: str, like: Tensor):
        key = (op, like.device.type, like.dtype)
        fn = self._cache.get(key)
        if fn is None:
            fn = self.registry.kernel(op, like.device, like.dtype, self.backend)
            if fn is None:
                raise UserError(
                    f"no {op!r} kernel for backend {self.backend!r} on {like.device.type}/{like.dtype}",
                    hint='set [kernels] backend = "auto" to use whatever implementation fits')
            self._cache[key] = fn
        return fn

    def permute(self, x_TD: Tensor, expert_ids_TK: Tensor, num_experts: int):
        return self.get("permute", x_TD)(x_TD, expert_ids_TK, num_experts)

    def grouped_mlp(self, x_ND: Tensor, counts_E: list[int], w1_EDF: Tensor, w2_EFD: Tensor,
                    activation: str = "gelu") -> Tensor:
        return self.get("grouped_mlp", x_ND)(x_ND, counts_E, w1_EDF, w2_EFD, activation)

    def unpermute(self, y_ND: Tensor, perm: Permutation, weights_TK: Tensor) -> Tensor:
        return self.get("unpermute", y_ND)(y_ND, perm, weights_TK)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's when it is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
