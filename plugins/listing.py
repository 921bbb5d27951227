"""``rapid plugins``: every registered name by kind, added to the CLI through ``rapid_add_commands``
like any third-party command (core's CLI has ``run`` only)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from rapid import hookimpl
from rapid.plugins import KINDS, Registry
from rapid.types import CAPABILITIES


def rows(registry: Registry) -> list[dict]:
    """One row per registered name: kind, name, plugin, distribution (kernel backends and parallel
    presets included)."""
    out = [{"kind": kind, "name": e.name, "plugin": e.plugin, "distribution": e.distribution}
           for kind in KINDS for e in registry.entries(kind).values()]
    out += [{"kind": "kernel", "name": name, "plugin": plugin, "distribution": dist}
            for name, plugin, dist in registry.kernel_providers()]
    parallel = registry.entries("parallel")
    out += [{"kind": "preset", "name": preset, "plugin": parallel[strategy].plugin,
             "distribution": f"{strategy}: " + ", ".join(f"{k}={v}" for k, v in switches.items())}
            for preset, (strategy, switches) in registry.presets().items()]
    return out


def capability_table(registry: Registry) -> str:
    """The Markdown table of what each registered strategy supports (the README embeds it)."""
    table = ["| strategy | " + " | ".join(CAPABILITIES) + " | needs |", "|---" * (len(CAPABILITIES) + 2) + "|"]
    for name, entry in sorted(registry.entries("parallel").items()):
        caps, needs = entry.obj.capabilities, getattr(entry.obj, "requires", None)
        table.append(f"| `{name}` | " + " | ".join("yes" if c in caps else "-" for c in CAPABILITIES)
                     + f" | {f'`rapidmoe[{needs[1]}]`' if needs else '-'} |")
    return "\n".join(table) + "\n"


@hookimpl
def rapid_add_commands(app):
    @app.command()
    def plugins(ctx: typer.Context,
                as_json: bool = typer.Option(False, "--json", help="print JSON"),
                capabilities: bool = typer.Option(False, "--capabilities", help="print what each parallel "
                                                  "strategy supports, as a Markdown table")):
        """Every registered name by kind (presets and kernel backends too), and who provides it."""
        registry = ctx.obj if isinstance(ctx.obj, Registry) else Registry()
        if capabilities:
            typer.echo(capability_table(registry), nl=False)
            return
        found = rows(registry)
        if as_json:
            typer.echo(json.dumps(found, indent=2))
            return
        t = Table(title="rapid plugins")
        for col in ("kind", "name", "plugin", "distribution"):
            t.add_column(col)
        for row in found:
            t.add_row(*row.values())
        Console().print(t)
