"""The single-process engine: gradient accumulation, precisions, clipping, state round trip."""

import copy

import pytest
import torch
from torch import nn

from rapid.builtin.parallel.single import Single
from rapid.errors import UserError
from rapid.recipe import OptimConfig, RunConfig
from rapid.train import lr_factor, optimizer_factory


class _Recipe:
    def __init__(self, steps=10, **optim):
        self.optim, self.run = OptimConfig(**optim), RunConfig(steps=steps)


def _engine(precision="fp32", clip=0.0, lr=0.1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    strat = Single(Single.Config(precision=precision))
    strat.check(None)
    return strat.wrap(model, optimizer_factory(_Recipe(lr=lr, min_lr=lr / 10, warmup=2)), clip)


def _loss(engine, x):
    with engine.autocast():
        return engine.model(x).float().pow(2).mean()


def test_grad_accumulation_matches_one_big_batch():
    x = torch.randn(8, 4)
    a = _engine()
    a.backward(_loss(a, x))
    b = _engine()
    for half in x.split(4):
        b.backward(_loss(b, half) / 2)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precisions_step_and_reduce_loss(precision):
    eng = _engine(precision, lr=0.05)
    x = torch.randn(32, 4)
    first = float(_loss(eng, x).detach())
    for _ in range(20):
        eng.backward(_loss(eng, x))
        stats = eng.step()
    assert float(_loss(eng, x).detach()) < first and stats["lr"] > 0
    assert all(p.grad is None for p in eng.model.parameters())      # zeroed after step


def test_clip_and_grad_norm():
    """With plain SGD (lr 1) the step is the clipped gradient: its norm is the clip value."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)

    def sgd(m):
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    eng = Single(Single.Config()).wrap(model, sgd, clip=0.5)
    eng.backward(model(torch.randn(8, 4) * 100).pow(2).mean())
    before = [p.detach().clone() for p in model.parameters()]
    stats = eng.step()
    step = torch.cat([(b - p.detach()).flatten() for p, b in zip(model.parameters(), before)])
    assert stats["grad_norm"] > 0.5
    assert float(step.norm()) == pytest.approx(0.5, rel=1e-4)


def test_state_round_trip():
    eng = _engine()
    x = torch.randn(8, 4)
    for _ in range(3):
        eng.backward(_loss(eng, x))
        eng.step()
    state = copy.deepcopy(eng.state_dict())  # as if read back from a checkpoint: no shared tensors
    other = _engine()
    other.model.load_state_dict(eng.model.state_dict())
    other.load_state_dict(state)
    for e in (eng, other):
        e.backward(_loss(e, x))
        e.step()
    for pa, pb in zip(eng.model.parameters(), other.model.parameters()):
        assert torch.equal(pa, pb)


def test_unknown_precision_lists_valid():
    with pytest.raises(UserError, match="precision 'fp8'; valid: fp32, bf16, fp16"):
        Single(Single.Config(precision="fp8")).check(None)
    with pytest.raises(UserError, match="micro_batch must be >= 1"):
        Single(Single.Config(micro_batch=0)).check(None)


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
