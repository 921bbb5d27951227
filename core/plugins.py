"""Plugin manager factory and the typed registry every part of rapid goes through.

Builtins register exactly like third-party plugins; then the ``rapid`` entry-point group is loaded
unless ``RAPID_DISABLE_PLUGIN_AUTOLOAD=1``. There is no module-global manager: each run, CLI call or
test builds its own.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Iterable

import pluggy

from rapid import hookspecs
from rapid.errors import UserError, unknown_name

ENTRY_POINT_GROUP = "rapid"
DISABLE_AUTOLOAD_ENV = "RAPID_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "RAPID_BLOCK_PLUGINS"   # comma-separated plugin names never registered

BUILTINS = (
    "rapid.builtin.models.gpt_moe",
    "rapid.builtin.losses",
    "rapid.builtin.routers.top1",
    "rapid.builtin.routers.topk",
    "rapid.builtin.routers.large_margin",
    "rapid.builtin.routers.hash",
    "rapid.builtin.routers.rre",
    "rapid.builtin.routers.expert_choice",
    "rapid.builtin.routers.base",
    "rapid.builtin.routers.uniform",
    "rapid.builtin.parallel.single",
    "rapid.builtin.parallel.ddp",
    "rapid.builtin.parallel.fsdp",
    "rapid.builtin.parallel.deepspeed",
    "rapid.builtin.parallel.local",
    "rapid.builtin.parallel.fairscale",
    "rapid.builtin.parallel.megatron",
    "rapid.builtin.kernels.reference",
    "rapid.builtin.kernels.contract",
    "rapid.builtin.kernels.triton_kernels",
    "rapid.builtin.kernels.cuda_kernels",
    "rapid.builtin.plan",
    "rapid.builtin.ckpt",
    "rapid.builtin.extract",
    "rapid.builtin.sweep",
    "rapid.builtin.listing",
    "rapid.builtin.data.snownlp",
    "rapid.builtin.data.text",
)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus which distribution provided each plugin."""

    def __init__(self):
        super().__init__("rapid")
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, str] = {}  # plugin name -> "distribution version"


def make_plugin_manager(*, autoload: bool | None = None, blocked: Iterable[str] = (),
                        extra: Iterable[Any] = ()) -> PluginManager:
    """Builtins, then ``extra`` plugin objects, then entry points (unless disabled). Plugins named
    in ``blocked`` or in ``$RAPID_BLOCK_PLUGINS`` are never registered."""
    pm = PluginManager()
    env_blocked = [n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()]
    for name in (*blocked, *env_blocked):
        pm.set_blocked(name)
    for modname in BUILTINS:
        if not pm.is_blocked(modname):
            pm.register(importlib.import_module(modname), name=modname)
            pm.distributions[modname] = "rapidmoe (builtin)"
    for plugin in extra:
        pm.register(plugin)
    if autoload is None:
        autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("1", "true", "yes")
    if autoload:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
            try:
                plugin = ep.load()
            except Exception as exc:
                raise UserError(
                    f"plugin {ep.name!r} (distribution {dist}) failed to import: "
                    f"{type(exc).__name__}: {exc}",
                    hint=f"fix or uninstall it, or set {DISABLE_AUTOLOAD_ENV}=1",
                ) from exc
            pm.register(plugin, name=ep.name)
            pm.distributions[ep.name] = dist
    pm.check_pending()
    return pm


@dataclass
class Entry:
    name: str
    obj: Any
    plugin: str
    distribution: str


KINDS = {
    "model": "rapid_register_models",
    "router": "rapid_register_routers",
    "parallel": "rapid_register_parallel",
    "loss": "rapid_register_losses",
    "data": "rapid_register_data_sources",
}


class Registry:
    """Typed access to a plugin manager: the only place that calls ``pm.hook``."""

    def __init__(self, pm: PluginManager | None = None):
        self.pm = pm if pm is not None else make_plugin_manager()
        self._cache: dict[str, dict[str, Entry]] = {}

    def entries(self, kind: str) -> dict[str, Entry]:
        if kind not in self._cache:
            caller = getattr(self.pm.hook, KINDS[kind])
            found: dict[str, Entry] = {}
            for impl in caller.get_hookimpls():  # registration order
                plugin = self.pm.get_name(impl.plugin) or repr(impl.plugin)
                for name, obj in (impl.function() or {}).items():
                    entry = Entry(name, obj, plugin, self.pm.distributions.get(plugin, "(registered in code)"))
                    if name in found:
                        other = found[name]
                        raise UserError(
                            f"{kind} {name!r} is provided twice: by {other.plugin} ({other.distribution}) "
                            f"and by {plugin} ({entry.distribution})",
                            hint="uninstall or block one of them")
                    found[name] = entry
            self._cache[kind] = found
        return self._cache[kind]

    def get(self, kind: str, name: str) -> Any:
        if ":" in name:  # "pkg.module:Attr" for one-off experiments
            modname, _, attr = name.partition(":")
            try:
                obj = getattr(importlib.import_module(modname), attr)
            except Exception as exc:
                raise UserError(f"cannot import {kind} {name!r}: {type(exc).__name__}: {exc}") from None
            if kind == "loss" and not callable(obj) or kind != "loss" and not (
                    isinstance(obj, type) and hasattr(obj, "Config") and (kind != "model" or hasattr(obj, "forward"))):
                raise UserError(f"{kind} {name!r} is not a {kind} plugin class (a class with a Config dataclass)",
                                hint="see the hook specs in rapid.hookspecs")
            return obj
        entries = self.entries(kind)
        if name not in entries:
            raise unknown_name(kind, name, entries)
        return entries[name].obj

    def strategy(self, name: str, config, world_size: int = 1):
        """The parallel strategy ``name`` built for ``world_size`` processes."""
        strategy = self.get("parallel", name)(config, world_size)
        strategy.name = name
        strategy.peers = {n: frozenset(getattr(e.obj, "capabilities", ())) for n, e in self.entries("parallel").items()}
        return strategy

    def presets(self) -> dict[str, tuple[str, dict]]:
        """{preset: (strategy name, switches)} over every registered strategy."""
        out: dict[str, tuple[str, dict]] = {}
        for name, entry in self.entries("parallel").items():
            for preset, switches in getattr(entry.obj, "presets", {}).items():
                if preset in out:
                    raise UserError(f"parallel preset {preset!r} is declared by both {out[preset][0]!r} and {name!r}")
                out[preset] = (name, dict(switches))
        return out

    def kernel_choice(self, op: str, device, dtype, backend: str):
        """(backend name, implementation) of the first ``rapid_kernel`` answer, in pluggy's call
        order (what ``firstresult`` would return), or (None, None)."""
        args = {"op": op, "device": device, "dtype": dtype, "backend": backend}
        for impl in reversed(self.pm.hook.rapid_kernel.get_hookimpls()):   # pluggy calls the last first
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                continue
            fn = impl.function(*(args[name] for name in impl.argnames))   # a subset, as pluggy allows
            if fn is not None:
                return getattr(impl.plugin, "KERNEL_BACKEND", self.pm.get_name(impl.plugin)), fn
        return None, None

    def kernel_unavailable(self, backend: str, op: str, device, dtype) -> str | None:
        """Why ``backend`` cannot serve ``op`` on ``device``/``dtype``, if its plugin says."""
        for impl in self.pm.hook.rapid_kernel.get_hookimpls():
            if getattr(impl.plugin, "KERNEL_BACKEND", None) == backend and hasattr(impl.plugin, "unavailable"):
                return impl.plugin.unavailable(op, device, dtype)
        return None

    def kernel_providers(self) -> list[tuple[str, str, str]]:
        """(backend, plugin, distribution) for every ``rapid_kernel`` implementation; a plugin
        names its backend with a module/class attribute ``KERNEL_BACKEND``."""
        out = []
        for impl in self.pm.hook.rapid_kernel.get_hookimpls():
            plugin = self.pm.get_name(impl.plugin) or repr(impl.plugin)
            out.append((getattr(impl.plugin, "KERNEL_BACKEND", plugin), plugin,
                        self.pm.distributions.get(plugin, "(registered in code)")))
        return out

    def check_run(self, recipe, world_size: int, device) -> None:
        self.pm.hook.rapid_check_run(recipe=recipe, registry=self, world_size=world_size, device=device)

    def step_end(self, step: int, metrics: dict) -> None:
        self.pm.hook.rapid_step_end(step=step, metrics=metrics)

    def add_commands(self, app) -> None:
        self.pm.hook.rapid_add_commands(app=app)
