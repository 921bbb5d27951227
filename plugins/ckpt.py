"""``rapid ckpt``: checkpoint tools, added to the CLI through the ``rapid_add_commands`` hook."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rapid import hookimpl
from rapid.checkpoint import verify
from rapid.errors import UserError


def inspect(path: Path) -> dict:
    """What ``rapid ckpt inspect`` shows. ``path`` is a checkpoint or a run directory (its newest
    checkpoint); verification failure is reported, not raised."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not (path / "manifest.json").exists():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = sorted(root.glob("step_*"))
        if not found:
            raise UserError(f"{path} is neither a checkpoint (no manifest.json) nor a run directory with one")
        path = found[-1]
    try:
        manifest, verified = verify(path), "ok: every file matches its sha256"
    except UserError as exc:
        manifest, verified = {}, f"FAILED: {exc}"
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError):
            pass
    recipe = (path / "recipe.toml").read_text() if (path / "recipe.toml").exists() else ""
    return {"path": str(path), "step": manifest.get("step"), "verified": verified,
            "layout": manifest.get("layout", {}), "params": manifest.get("params", {}),
            "files": {n: f["bytes"] for n, f in manifest.get("files", {}).items()}, "recipe": recipe}


@hookimpl
def rapid_add_commands(app):
    from rich.console import Console
    from rich.table import Table

    ckpt_app = typer.Typer(no_args_is_help=True, help="Checkpoint tools.")
    app.add_typer(ckpt_app, name="ckpt")

    @ckpt_app.command("inspect")
    def ckpt_inspect(path: Path = typer.Argument(..., metavar="PATH", help="a checkpoint (step_*) or a run directory"),
                     as_json: bool = typer.Option(False, "--json", help="print JSON")):
        """Layout, step, recipe, parameter counts and verification of a checkpoint (exit 1 if it fails)."""
        info = inspect(path)
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            raise typer.Exit(0 if info["verified"].startswith("ok") else 1)
        t = Table(title=f"checkpoint {info['path']}", show_header=False)
        for key in ("step", "verified", "layout", "files"):
            t.add_row(key, str(info[key]))
        for key, n in info["params"].items():
            t.add_row(key, f"{n:,}")
        console = Console()
        console.print(t)
        if info["recipe"]:
            console.print(info["recipe"], markup=False, highlight=False)
        if not info["verified"].startswith("ok"):
            raise typer.Exit(1)
