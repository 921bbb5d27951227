"""One process: activation checkpointing and gradient accumulation change how a step is computed,
not what it computes."""

import pytest
import torch

from rapid.builtin.parallel.single import apply_activation_checkpointing
from rapid.recipe import build_model, resolve
from rapid.train import train_raw
from rapid.types import Batch
from tests.conftest import tiny_raw
from tests.e2e.test_train import _metrics, _text_data


def test_activation_checkpointing_gives_equal_gradients(builtin_registry):
    recipe = resolve(tiny_raw(model={"dropless": True}, router={"jitter": 0.1}), "t", builtin_registry)
    tok = torch.randint(0, 300, (4, 16))
    batch = Batch(tok, tok.roll(-1, 1), torch.zeros_like(tok))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(recipe, builtin_registry)
        if checkpointing:
            apply_activation_checkpointing(model)
        torch.manual_seed(1)                       # the same jitter draws, recomputed in backward
        out = model(batch)
        (out.logits_BSV.float().pow(2).mean() + sum(out.aux["load_balance"])).backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-7, rtol=1e-5), name


def test_grad_accum_4_by_1_equals_1_by_4(tmp_path):
    """The same samples per step: micro_batch 1 accumulated 4 times trains like micro_batch 4 (the
    load-balance term is left out: it is a statistic of each micro-batch, not of the step)."""
    base = dict(run={"steps": 4, "log_every": 1, "eval_every": 4}, data=_text_data(tmp_path),
                model={"vocab_size": 300, "dropless": True}, loss={"lm": 1.0, "z_loss": 0.001})
    train_raw(tiny_raw(parallel={"micro_batch": 4, "grad_accum": 1}, **base), tmp_path / "a", progress=False)
    train_raw(tiny_raw(parallel={"micro_batch": 1, "grad_accum": 4}, **base), tmp_path / "b", progress=False)
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], rel=1e-5)
