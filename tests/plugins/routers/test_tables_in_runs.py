"""Routing tables in real runs: the training loop hands the corpus's token counts to ``hash``
(frequency), and every engine saves persistent buffers with the parameters, so a resumed or reloaded
model routes with its checkpoint's tables, not freshly drawn ones."""

import numpy as np
import pytest
import torch

from rapid import checkpoint
from rapid.builtin.extract import read_tensors
from rapid.plugins import Registry, make_plugin_manager
from rapid.recipe import build_model, resolve
from rapid.train import _corpus, optimizer_factory, train_raw
from tests.conftest import tiny_raw
from tests.e2e.test_train import StopAt, _metrics, _text_data


def _tables(model):
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("router", [{"name": "hash", "variant": "bigram"}, {"name": "rre"}])
def test_checkpoint_restores_tables_not_fresh_draws(tmp_path, builtin_registry, router):
    raw = tiny_raw(router=router, data={"domains": ["a", "b"]}, model={"experts": [2, 4], "top_k": 1})
    recipe = resolve(raw, "<t>", builtin_registry)
    engines = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(recipe, builtin_registry)
        model.reset_parameters()
        engines.append(builtin_registry.strategy("single", recipe.parallel).wrap(model, optimizer_factory(recipe), 1.0))
    a, b = engines
    saved = _tables(a.inner)
    assert len(saved) >= 2 and any(not torch.equal(saved[n], t) for n, t in _tables(b.inner).items())
    keys = set(a.checkpoint_state()[0])
    assert {f"model.{n}" for n in saved} <= keys
    path = checkpoint.save(tmp_path / "ck", 1, a, {"format": checkpoint.FORMAT, "step": 1, "data": {}})
    checkpoint.load(path, b)
    for n, t in _tables(b.inner).items():
        assert torch.equal(t, saved[n]), n


def test_frequency_hash_run_uses_the_corpus_counts_and_resumes_exactly(tmp_path, builtin_registry):
    raw = tiny_raw(run={"steps": 6, "log_every": 1, "save_every": 3}, data=_text_data(tmp_path),
                   router={"name": "hash", "variant": "frequency"}, model={"top_k": 1, "experts": [2, 3]})
    full = train_raw(raw, tmp_path / "full", progress=False)
    recipe = resolve(raw, "<t>", builtin_registry)
    counts = np.bincount(_corpus(recipe, builtin_registry).train_tokens, minlength=300)
    tensors = read_tensors(tmp_path / "full" / "checkpoints" / "step_00000006")
    for layer, E in enumerate((2, 3)):
        table = tensors[f"model.blocks.{layer}.moe.router.table_V"]
        load = np.bincount(table.numpy(), weights=counts, minlength=E)
        # greedy on the corpus's counts: loads differ by at most the largest count given to one expert
        assert load.max() - load.min() <= counts.max(), (layer, load)
        unseen = np.bincount(table.numpy()[counts == 0], minlength=E)
        assert unseen.max() - unseen.min() <= 1
        assert load.max() - load.min() < 0.1 * counts.sum()

    crash = StopAt(5)
    pm = make_plugin_manager(autoload=False)
    pm.register(crash)
    with pytest.raises(StopAt.Crash):
        train_raw(raw, tmp_path / "resumed", registry=Registry(pm), progress=False)
    resumed = train_raw(raw, tmp_path / "resumed", resume=True, progress=False)
    assert [r["loss"] for r in _metrics(tmp_path / "full")] == [r["loss"] for r in _metrics(tmp_path / "resumed")]
    assert full.val_loss == resumed.val_loss
