"""``rapid plugins`` (rapid.builtin.listing): every registered name, added to the CLI by a builtin."""

import json

import typer
from typer.testing import CliRunner

import rapid
from rapid.builtin import listing
from rapid.plugins import KINDS, Registry, make_plugin_manager


def _app(registry):
    app = typer.Typer()
    app.command()(lambda: None)          # a second command, so typer keeps sub-command names
    registry.add_commands(app)
    return app


def test_rows_cover_every_kind_kernel_backend_and_preset(builtin_registry):
    found = {(r["kind"], r["name"]) for r in listing.rows(builtin_registry)}
    for kind in KINDS:
        assert {(kind, n) for n in builtin_registry.entries(kind)} <= found
    assert {("kernel", b) for b, _, _ in builtin_registry.kernel_providers()} <= found
    assert {("preset", p) for p in builtin_registry.presets()} <= found


def test_the_command_lists_a_plugin_registered_in_code():
    class Extra:
        @rapid.hookimpl
        def rapid_register_routers(self):
            from rapid.builtin.routers.top1 import Top1Router
            return {"listed_router": Top1Router}
    registry = Registry(make_plugin_manager(autoload=False, extra=[Extra()]))
    out = CliRunner().invoke(_app(registry), ["plugins", "--json"], obj=registry)
    assert out.exit_code == 0, out.output
    row = next(r for r in json.loads(out.output) if r["name"] == "listed_router")
    assert row["kind"] == "router" and row["distribution"] == "(registered in code)"
    table = CliRunner().invoke(_app(registry), ["plugins", "--capabilities"], obj=registry).output
    assert table == listing.capability_table(registry) and "| `single` |" in table


def test_blocking_the_builtin_removes_the_command():
    registry = Registry(make_plugin_manager(autoload=False, blocked=["rapid.builtin.listing"]))
    out = CliRunner().invoke(_app(registry), ["plugins"], obj=registry)
    assert out.exit_code != 0 and "No such command" in out.output
