"""The single-process engine: gradient accumulation, precisions, clipping, state round trip."""

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


def test_unsupported_precision_is_refused():
    with pytest.raises(UserError, match="does not support precision 'fp8'"):
        Single(Single.Config(precision="fp8")).check(None)


def test_lr_schedule_peaks_once_and_ends_at_min_lr():
    f = [lr_factor(i, 10, 100, 0.1) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] < 1.0 and f.count(max(f)) == 1                 # the peak is held for one step
    assert f[54] == pytest.approx(0.55)                         # half way through the decay
    assert f[99] == pytest.approx(0.1) and min(f) == f[99]      # min_lr at the last step
    assert lr_factor(0, 0, 5, 0.1) == 1.0 and lr_factor(4, 0, 5, 0.1) == pytest.approx(0.1)


def test_engine_uses_the_schedule_step_by_step():
    eng = _engine(lr=0.1)   # warmup 2, 10 steps, min_lr 0.01
    x = torch.randn(8, 4)
    lrs = []
    for _ in range(10):
        eng.backward(_loss(eng, x))
        lrs.append(eng.step()["lr"])
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1) and lrs[2] < 0.1
    assert lrs[-1] == pytest.approx(0.01)


def test_non_finite_gradients_skip_the_step():
    eng = _engine(lr=0.1)
    before = [p.detach().clone() for p in eng.model.parameters()]
    eng.backward(_loss(eng, torch.full((8, 4), float("nan"))))
    stats = eng.step()
    assert stats["skipped"] and all(torch.equal(a, b) for a, b in zip(before, eng.model.parameters()))
    eng.backward(_loss(eng, torch.randn(8, 4)))
    assert eng.step()["lr"] == pytest.approx(0.05)                # the schedule did not move either


def test_fp16_overflow_is_skipped_by_the_loss_scaler():
    eng = _engine("fp16", lr=0.1)
    before = [p.detach().clone() for p in eng.model.parameters()]
    eng.backward(_loss(eng, torch.full((8, 4), 1e30)))       # inf in fp16
    stats = eng.step()
    assert stats["skipped"] and stats["loss_scale"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, eng.model.parameters()))


def test_a_refused_switch_names_the_strategies_that_support_it(builtin_registry):
    from rapid.types import ParallelConfig
    strategy = builtin_registry.strategy("torch", ParallelConfig(zero_stage=2))
    with pytest.raises(UserError) as info:
        strategy.check(None)
    assert "does not support zero_stage=2" in str(info.value)
    assert info.value.hint.startswith("strategies that do: deepspeed, fairscale;"), info.value.hint
