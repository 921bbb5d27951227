"""Packing and the global batch stream: the same samples at every data-parallel layout, resumable
from a sample count that does not depend on the layout."""

import numpy as np
import pytest
import torch

from rapid.batches import BatchIterator, PackedSequences, val_batches
from rapid.errors import UserError


def _seqs(n=101, seq_len=10):
    tokens = np.arange(n * seq_len + 1, dtype=np.int32)
    return PackedSequences(tokens, np.zeros(len(tokens), dtype=np.int16), seq_len, "train")


def test_packing():
    seqs = _seqs(100)
    assert seqs.count == 100
    b = seqs.batch(torch.tensor([3]))
    assert b.tokens_BS.tolist() == [list(range(30, 40))] and b.targets_BS.tolist() == [list(range(31, 41))]


def test_too_short_split():
    with pytest.raises(UserError, match="fewer than seq_len"):
        PackedSequences(np.arange(5, dtype=np.int32), np.zeros(5, dtype=np.int16), 10, "validation")


def _stream(seqs, steps, micro_batch, grad_accum=1, dp_size=1):
    """Per step: the first tokens of every sample each rank sees, ranks in order."""
    its = [BatchIterator(seqs, micro_batch, 1, grad_accum, r, dp_size) for r in range(dp_size)]
    return [[int(t) for it in its for _ in range(grad_accum) for t in it.next().tokens_BS[:, 0]]
            for _ in range(steps)]


def test_same_global_batch_at_every_layout():
    seqs = _seqs()
    one = _stream(seqs, 60, 4)                                   # crosses epoch boundaries (101 sequences)
    assert _stream(seqs, 60, 2, dp_size=2) == one                # 2 ranks x micro_batch 2
    assert _stream(seqs, 60, 1, grad_accum=4) == one             # grad_accum 4 x micro_batch 1
    assert _stream(seqs, 60, 1, grad_accum=2, dp_size=2) == one
    epoch = [s for step in one for s in step][:101]
    assert sorted(epoch) == sorted(range(0, 1010, 10))           # an epoch is a permutation


def test_resume_from_sample_count_at_any_layout():
    seqs = _seqs()
    one = _stream(seqs, 10, 4)
    it = BatchIterator(seqs, 4, 1)
    for _ in range(6):
        it.next()
    state = it.state_dict()
    assert state == {"samples": 24}
    resumed = [BatchIterator(seqs, 2, 1, 1, r, 2) for r in range(2)]
    for r in resumed:
        r.load_state_dict(state)
    assert [[int(t) for r in resumed for t in r.next().tokens_BS[:, 0]] for _ in range(4)] == one[6:]


def test_validation_is_split_over_ranks():
    seqs = _seqs(40)
    whole = torch.cat([b.tokens_BS for b in val_batches(seqs, 4, 3)])
    parts = torch.cat([b.tokens_BS for r in range(2) for b in val_batches(seqs, 2, 3, r, 2)])
    assert torch.equal(whole, parts) and whole.shape[0] == 12
    with pytest.raises(UserError, match="fewer than micro_batch x data-parallel size = 80"):
        val_batches(seqs, 40, 3, 0, 2)
