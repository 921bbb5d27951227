"""Token streams -> packed sequences -> the same global batches at every world size."""

from __future__ import annotations

import numpy as np
import torch

from rapid.errors import UserError
from rapid.types import Batch


class PackedSequences:
    """Non-overlapping windows of ``seq_len + 1`` tokens over a document stream. The streams stay
    in their stored dtypes (int32 tokens, int16 domains: no int64 copy of a whole corpus); each
    batch is widened to int64 as it is cut."""

    def __init__(self, tokens: np.ndarray, domains: np.ndarray, seq_len: int, what: str):
        self.tokens, self.domains, self.seq_len = torch.from_numpy(tokens), torch.from_numpy(domains), seq_len
        self.count = (len(tokens) - 1) // seq_len
        if self.count < 1:
            raise UserError(f"{what} split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}",
                            hint="lower [model] seq_len or [data] val_fraction, or add text")

    def batch(self, indices: torch.Tensor) -> Batch:
        offsets = indices[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        window = self.tokens[offsets].long()
        return Batch(window[:, :-1], window[:, 1:], self.domains[offsets[:, :-1]].long())


class BatchIterator:
    """The training stream: seeded epoch-wise shuffles of the packed sequences, read as one global
    sequence of samples. A step's global batch is the next ``micro_batch * grad_accum * dp`` samples;
    data-parallel rank r takes the r-th contiguous slice of it, micro-batch by micro-batch. So one
    process with micro_batch 4 and two with micro_batch 2 train on the same samples, and the state
    (samples consumed, counted at step boundaries) is the same whatever the layout."""

    def __init__(self, seqs: PackedSequences, micro_batch: int, seed: int, grad_accum: int = 1,
                 dp_rank: int = 0, dp_size: int = 1):
        self.seqs, self.micro_batch, self.seed = seqs, micro_batch, seed
        self.grad_accum, self.dp_rank, self.dp_size = grad_accum, dp_rank, dp_size
        self.samples, self._micro = 0, 0             # samples consumed before the current step
        self._epoch, self._perm = -1, None

    def _sequence(self, sample: int) -> int:
        epoch, i = divmod(sample, self.seqs.count)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.seqs.count, generator=gen)
        return int(self._perm[i])

    def next(self) -> Batch:
        mb = self.micro_batch
        first = self.samples + (self.dp_rank * self.grad_accum + self._micro) * mb
        batch = self.seqs.batch(torch.tensor([self._sequence(first + j) for j in range(mb)]))
        self._micro += 1
        if self._micro == self.grad_accum:
            self._micro, self.samples = 0, self.samples + mb * self.grad_accum * self.dp_size
        return batch

    def state_dict(self) -> dict:
        return {"samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.samples, self._micro = int(state["samples"]), 0


def val_batches(seqs: PackedSequences, micro_batch: int, count: int, dp_rank: int = 0, dp_size: int = 1
                ) -> list[Batch]:
    """This rank's share of the validation set: the first ``micro_batch * dp_size * count`` sequences
    (fewer if the split is small), ``count`` micro-batches per rank, every rank the same number."""
    per_rank = min(count, seqs.count // (micro_batch * dp_size))
    if per_rank < 1:
        raise UserError(f"validation split has {seqs.count} sequences, fewer than micro_batch x data-parallel "
                        f"size = {micro_batch * dp_size}", hint="raise [data] val_fraction or lower micro_batch")
    idx = torch.arange(micro_batch * per_rank) + dp_rank * micro_batch * per_rank
    return [seqs.batch(chunk) for chunk in idx.split(micro_batch)]
