"""Builtin loss terms: the language-model loss and the router terms every builtin router emits."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rapid import hookimpl
from rapid.types import Batch, ModelOutput, RouterLoss


def lm_loss(out: ModelOutput, batch: Batch) -> Tensor:
    """Next-token cross-entropy in fp32, averaged over tokens where ``loss_mask`` is 1."""
    logits = out.logits_BSV.float().flatten(0, 1)
    targets = batch.targets_BS.reshape(-1)
    if batch.loss_mask_BS is None:
        return F.cross_entropy(logits, targets)
    mask = batch.loss_mask_BS.reshape(-1).float()
    return (F.cross_entropy(logits, targets, reduction="none") * mask).sum() / mask.sum().clamp_min(1)


@hookimpl
def rapid_register_losses():
    return {"lm": lm_loss, "load_balance": RouterLoss("load_balance"), "z_loss": RouterLoss("z_loss")}
