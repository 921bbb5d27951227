"""GPT-MoE shapes, layer layout, pyramid/residual options and parameter counts."""

import pytest
import torch

from rapid.builtin.plan import make_plan
from rapid.moe import count_params
from rapid.recipe import load_recipe, resolve
from rapid.recipe import build_model
from rapid.types import Batch
from tests.conftest import REPO, tiny_raw


def _batch(B=3, S=16, V=300):
    tok = torch.randint(0, V, (B, S))
    return Batch(tok, tok.roll(-1, 1), torch.zeros(B, S, dtype=torch.long))


@pytest.mark.parametrize("residual", [False, True])
def test_forward_shapes_and_aux(builtin_registry, residual):
    r = resolve(tiny_raw(model={"residual": residual}), "t", builtin_registry)
    model = build_model(r, builtin_registry)
    out = model(_batch())
    assert out.logits_BSV.shape == (3, 16, 300)
    assert len(out.aux["load_balance"]) == 2 and len(out.aux["z_loss"]) == 2   # one per MoE layer
    assert [b.moe.spec.num_experts for b in model.blocks] == [2, 4]             # pyramid
    assert (model.blocks[0].moe.residual_mlp is not None) == residual
    out.logits_BSV.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_moe_every_layout(builtin_registry):
    r = resolve(tiny_raw(model={"layers": 6, "moe_every": 3, "experts": 4}), "t", builtin_registry)
    model = build_model(r, builtin_registry)
    assert [b.moe is not None for b in model.blocks] == [False, False, True, False, False, True]


def test_sequence_too_long(builtin_registry):
    from rapid.errors import UserError
    model = build_model(resolve(tiny_raw(), "t", builtin_registry), builtin_registry)
    with pytest.raises(UserError, match="exceeds"):
        model(_batch(S=17))


def test_param_counts_exact(builtin_registry):
    r = resolve(tiny_raw(model={"residual": False}), "t", builtin_registry)
    counts = count_params(build_model(r, builtin_registry), top_k=1)
    D, F, V, S = 32, 128, 300, 16
    expert = (2 + 4) * 2 * D * F
    attn = 2 * 4 * D * D
    router = (2 + 4) * D
    norms = 2 * (2 * 2 * D) + 2 * D
    assert counts["params_expert"] == expert
    assert counts["params_total"] == expert + attn + router + norms + V * D + S * D
    assert counts["params_active"] == counts["params_dense"] + 2 * (2 * D * F)


@pytest.mark.parametrize("name,total,dense,tol", [("gpt_moe_16b", 16e9, 1.3e9, 0.06), ("gpt_moe_13b", 13e9, None, 0.06)])
def test_published_sizes(builtin_registry, name, total, dense, tol):
    plan = make_plan(load_recipe(REPO / "recipes" / f"{name}.toml", registry=builtin_registry), builtin_registry)
    assert abs(plan.params_total - total) / total < tol, plan.params_total
    if dense:
        assert abs(plan.params_dense - dense) / dense < tol, plan.params_dense
    assert plan.params_active < plan.params_total
