"""The hook contract: every hook documented and prefixed, pick-one hooks firstresult with the
reference trylast, plugins registered and unregistered, clear errors for bad plugins."""

import inspect
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pluggy
import pytest

import rapid
from rapid import hookspecs
from rapid.errors import UserError
from rapid.plugins import Registry, make_plugin_manager
from rapid.types import Router, Routing


def _specs():
    return [(n, f) for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "rapid_spec")]


def test_every_hook_is_prefixed_and_documented():
    specs = _specs()
    assert {n for n, _ in specs} >= {"rapid_register_models", "rapid_register_routers", "rapid_register_parallel",
                                     "rapid_register_losses", "rapid_kernel", "rapid_register_data_sources",
                                     "rapid_step_end", "rapid_add_commands"}
    for name, fn in specs:
        assert name.startswith("rapid_")
        assert inspect.getdoc(fn) and len(inspect.getdoc(fn)) > 40, f"{name} has no contract docstring"
        body = [line for line in inspect.getsource(fn).splitlines() if line.strip()]
        assert body[-1].strip().endswith('"""'), f"{name} must be docstring-only"


def test_kernel_hook_is_firstresult_with_reference_trylast():
    pm = make_plugin_manager(autoload=False)
    assert pm.hook.rapid_kernel.spec.opts["firstresult"]
    ref = [i for i in pm.hook.rapid_kernel.get_hookimpls() if i.plugin_name == "rapid.builtin.kernels.reference"]
    assert ref and ref[0].trylast


class FixedRouter(Router):
    """Every token to expert 0 with weight 1."""

    @dataclass
    class Config:
        pass

    def forward(self, x_TD, *, token_ids_T, domain_ids_T):
        T = x_TD.shape[0]
        return Routing(token_ids_T.new_zeros(T, 1), x_TD.new_ones(T, 1))


class FixedPlugin:
    @rapid.hookimpl
    def rapid_register_routers(self):
        return {"fixed": FixedRouter}


@pytest.fixture
def fixed_plugin():
    pm = make_plugin_manager(autoload=False)
    plugin = FixedPlugin()
    pm.register(plugin, name="fixed-plugin")
    yield pm
    pm.unregister(plugin)
    assert "fixed" not in Registry(pm).entries("router")


def test_registered_plugin_is_visible(fixed_plugin):
    entry = Registry(fixed_plugin).entries("router")["fixed"]
    assert entry.obj is FixedRouter and entry.plugin == "fixed-plugin"


def test_duplicate_names_name_both_providers(fixed_plugin):
    class Again:
        @rapid.hookimpl
        def rapid_register_routers(self):
            return {"fixed": FixedRouter}

    again = Again()
    fixed_plugin.register(again, name="again-plugin")
    try:
        with pytest.raises(UserError, match="fixed-plugin.*again-plugin"):
            Registry(fixed_plugin).entries("router")
    finally:
        fixed_plugin.unregister(again)


def test_unknown_name_lists_valid_ones(builtin_registry):
    with pytest.raises(UserError, match=r"unknown router 'nope'; valid: .*top1"):
        builtin_registry.get("router", "nope")


def test_misspelled_hook_is_caught():
    class Typo:
        @rapid.hookimpl
        def rapid_register_router(self):  # missing "s"
            return {}

    with pytest.raises(pluggy.PluginValidationError, match="rapid_register_router"):
        make_plugin_manager(autoload=False, extra=[Typo()])


def test_blocked_builtin_is_absent():
    reg = Registry(make_plugin_manager(autoload=False, blocked=["rapid.builtin.routers.top1"]))
    assert "top1" not in reg.entries("router")


def test_import_path_name(builtin_registry):
    assert builtin_registry.get("router", "tests.core.test_hooks:FixedRouter") is FixedRouter
    with pytest.raises(UserError, match="cannot import"):
        builtin_registry.get("router", "no_such_module_xyz:Router")


def test_broken_third_party_plugin_gives_one_clear_error(tmp_path):
    """A real distribution whose entry point fails to import: one error naming plugin and dist."""
    dist = tmp_path / "broken_rapid_plugin-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-rapid-plugin\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[rapid]\nbroken = broken_rapid_plugin_mod\n")
    (tmp_path / "broken_rapid_plugin_mod.py").write_text("raise RuntimeError('boom at import')\n")
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        from rapid.cli import main
        main(["plugins"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "'broken'" in proc.stderr and "broken-rapid-plugin 0.3" in proc.stderr and "boom at import" in proc.stderr
    assert "Traceback" not in proc.stderr
    env = {**__import__("os").environ, "RAPID_DISABLE_PLUGIN_AUTOLOAD": "1"}
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr


def test_plugins_can_add_cli_commands():
    import typer
    from typer.testing import CliRunner

    class Hello:
        @rapid.hookimpl
        def rapid_add_commands(self, app):
            @app.command()
            def hello(name: str = "moe"):
                typer.echo(f"hello {name}")

    app = typer.Typer()

    @app.command()
    def other():
        pass

    Registry(make_plugin_manager(autoload=False, extra=[Hello()])).add_commands(app)
    result = CliRunner().invoke(app, ["hello", "--name", "experts"])
    assert result.exit_code == 0 and "hello experts" in result.output


def test_step_end_observers_see_metrics():
    seen = []

    class Observer:
        @rapid.hookimpl
        def rapid_step_end(self, step, metrics):
            seen.append((step, metrics["loss"]))

    Registry(make_plugin_manager(autoload=False, extra=[Observer()])).step_end(3, {"loss": 1.5})
    assert seen == [(3, 1.5)]


@pytest.mark.parametrize("module", ["no_such_library_xyz", "no_such_library_xyz.core"])
def test_a_strategy_whose_library_is_missing_names_the_extra(builtin_registry, module):
    from rapid.types import ParallelStrategy

    class Needy(ParallelStrategy):
        capabilities = frozenset({"fp32"})
        requires = (module, "needy")

    class Recipe:
        pass

    with pytest.raises(UserError, match=rf"needs {module}, which is not installed") as info:
        Needy(Needy.Config()).check(Recipe())
    assert info.value.hint == "pip install 'rapidmoe[needy]'"
