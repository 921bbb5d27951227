"""``rapid extract``: PanGu-Sigma's sub-model extraction, added to the CLI through the
``rapid_add_commands`` hook.

    rapid extract CHECKPOINT --domains NAME[,NAME] --out DIR

From a checkpoint of a run with the ``rre`` router (a ``step_*`` directory, or a run directory: its
newest checkpoint), DIR gets a run directory holding a standalone checkpoint of the sub-model that
serves only those domains: the shared (dense) layers as they are, and of every MoE layer only the
experts of those domains' groups and their rows of the routing table, expert ids renumbered 0..n-1
(domains in their declared order). Optimizer states are sliced like their parameters, the step,
LR schedule and data position are kept, so it loads like any checkpoint rapid wrote
(``rapid.checkpoint.load``, ``rapid run DIR/recipe.toml --out DIR --resume``). DIR/recipe.toml and
the checkpoint's recipe are the source recipe with ``[model] experts`` and a non-empty
``[router.groups]`` shrunk accordingly and ``[data] keep_domains`` set to the kept domains (the
same data, tokenizer and split as the source run, training on those domains' documents only, their
ids renumbered in that order), so ``rapid plan DIR/recipe.toml`` shows the smaller model and
``rapid run DIR/recipe.toml --out DIR --resume --set run.steps=N`` continues training it. Fed tokens of those domains (their ids in the new ``[data] domains``), the sub-model
computes the full model's logits: rre's capacity is per domain group, so the kept domains drop what
they drop in the full model (``position`` and ``probs`` policies, or ``dropless``; ``random`` draws
differ).
"""

from __future__ import annotations

import json
import pickle
import tomllib
from pathlib import Path
from typing import List

import torch
import typer

from rapid import checkpoint, hookimpl
from rapid.errors import UserError


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint ``path`` as one whole CPU tensor (sharded ones gathered),
    after verifying it against its manifest."""
    import torch.distributed.checkpoint as dcp
    files = checkpoint.verify(path)["files"]
    try:
        metadata = checkpoint.SafeReader(path, files).read_metadata()
    except pickle.UnpicklingError as exc:
        raise UserError(f"checkpoint {path} cannot be read: {exc}") from None
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()}
    with checkpoint._one_process_is_fine():
        dcp.load(tensors, storage_reader=checkpoint.SafeReader(path, files), no_dist=True)
    return tensors


class _Saved:
    """What ``rapid.checkpoint.save`` asks of an engine, for tensors already in hand."""

    def __init__(self, tensors: dict, extra: dict):
        self.tensors, self.extra = tensors, extra

    def checkpoint_state(self):
        return self.tensors, self.extra


def _checkpoint_dir(path: Path) -> Path:
    path = Path(path)
    if (path / "manifest.json").exists():
        return path
    found, skipped = checkpoint.find_resumable(path / "checkpoints") if (path / "checkpoints").is_dir() else (None, [])
    if found is None:
        raise UserError(f"{path} is neither a checkpoint (no manifest.json) nor a run directory with a complete one"
                        + (f" ({skipped[0]})" if skipped else ""))
    return found


def extract(source: Path, domains: list[str], out: Path, registry=None) -> Path:
    """Write the sub-model of ``domains`` (see the module docstring); returns the new checkpoint."""
    from rapid.builtin.routers.rre import RRERouter
    from rapid.moe import MoE, count_params
    from rapid.plugins import Registry
    from rapid.recipe import build_model, resolve

    registry = registry or Registry()
    ckpt = _checkpoint_dir(source)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory", hint="give a new directory")
    try:                      # checked against the manifest with every other file by read_tensors
        raw = tomllib.loads((ckpt / "recipe.toml").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {ckpt}: recipe.toml cannot be read ({exc})") from None
    recipe = resolve(raw, str(ckpt / "recipe.toml"), registry)
    router = recipe.names["router"]
    if not issubclass(registry.get("router", router), RRERouter):
        raise UserError(f"checkpoint {ckpt} was written by a run with router {router!r}; extract needs 'rre' "
                        "(its experts are grouped by domain)")
    declared = tuple(getattr(recipe.data, "keep_domains", ()) or getattr(recipe.data, "domains", ()) or ())
    wanted = list(dict.fromkeys(d.strip() for d in domains if d.strip()))
    unknown = [d for d in wanted if d not in declared]
    if unknown or not wanted:
        raise UserError(f"--domains: {unknown[0]!r} is not a domain of {ckpt}" if unknown else
                        "--domains names no domain", hint=f"its domains: {', '.join(declared)}")
    keep = [d for d in declared if d in wanted]
    tensors = read_tensors(ckpt)
    state = json.loads((ckpt / "state.json").read_text())

    with torch.device("meta"):
        full = build_model(recipe, registry)
    counts, sizes = [], []
    for name, moe in ((n, m) for n, m in full.named_modules() if isinstance(m, MoE)):
        table = f"model.{name}.router.expert_DV"
        if table not in tensors:
            raise UserError(f"checkpoint {ckpt} holds no routing table of MoE layer {name} ({table})",
                            hint="it was written by a rapid whose checkpoints leave out router buffers")
        kept_E, tensors[table] = moe.router.subset(tensors[table], keep)
        for key in [k for k in tensors if k.startswith((f"model.{name}.experts.", f"optim.{name}.experts."))]:
            if tensors[key].dim() > 0:     # expert tensors and their optimizer states; not step counts
                tensors[key] = tensors[key].index_select(0, kept_E)
        counts.append(len(kept_E))
        sizes.append([len(moe.router.group(d)) for d in keep])

    if not counts or "experts" not in raw["model"]:
        raise UserError(f"checkpoint {ckpt}: its model has no MoE layers with an [model] experts count")
    new = {t: dict(v) for t, v in raw.items()}
    new["model"]["experts"] = counts[0] if isinstance(raw["model"]["experts"], int) else counts
    new["data"]["keep_domains"] = keep      # same data, tokenizer and split: only these domains' documents
    if new["router"].get("groups"):
        new["router"]["groups"] = {d: new["router"]["groups"][d] for d in keep}
    sub = resolve(new, str(out / "recipe.toml"), registry)
    with torch.device("meta"):
        small = build_model(sub, registry)
    assert [m.router.sizes for m in small.modules() if isinstance(m, MoE)] == sizes, "group sizes changed"
    shapes = {f"model.{n}": t.shape for n, t in small.state_dict().items()}
    assert all(shapes[k] == t.shape for k, t in tensors.items() if k.startswith("model.")), "shapes changed"

    keys = {k: v for k, v in state.items() if k not in ("engine", "world_size")}
    if isinstance(keys.get("data_id"), dict):
        keys["data_id"] = {**keys["data_id"], "domains": keep}
    keys["extracted"] = {"from": str(ckpt.resolve()), "domains": keep}
    meta = {"layout": {"strategy": "extract", "world_size": 1, "expert_parallel": 1},
            "params": count_params(small, getattr(sub.model, "top_k", 1))}
    path = checkpoint.save(out / "checkpoints", int(state["step"]), _Saved(tensors, state["engine"]), keys,
                           recipe=sub.to_toml(), meta=meta)
    (out / "recipe.toml").write_text(sub.to_toml())
    return path


@hookimpl
def rapid_add_commands(app):
    @app.command("extract")
    def extract_command(
            ctx: typer.Context,
            source: Path = typer.Argument(..., metavar="CHECKPOINT", help="a checkpoint (step_*) or a run directory "
                                          "of a run with the rre router"),
            domains: List[str] = typer.Option(..., "--domains", help="the domains to keep, comma-separated "
                                              "(repeatable)"),
            out: Path = typer.Option(..., "--out", help="a new run directory for the extracted checkpoint")):
        """Sub-model extraction (PanGu-Sigma): the shared layers plus only some domains' experts."""
        path = extract(source, [d for item in domains for d in item.split(",")], out, ctx.obj)
        params = json.loads((path / "manifest.json").read_text())["params"]
        typer.echo(f"extracted {params['params_total']:,} parameters ({params['params_expert']:,} in experts) "
                   f"-> {path}")
