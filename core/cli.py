"""The ``rapid`` command line (typer). A user error is one line plus a hint, exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from rapid.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rapid: train sparse Mixture-of-Experts GPT models.")
console = Console()
SetOpt = typer.Option(None, "--set", help="override a recipe key: table.key=value (repeatable)")
RecipeArg = typer.Argument(..., metavar="RECIPE", help="recipe TOML file")


@app.callback()
def _commands() -> None:
    # a group even when ``run`` is its only command (every other command comes from a plugin, and
    # a blocked one must not turn ``rapid run RECIPE`` into ``rapid RECIPE``)
    pass


def _registry(ctx: typer.Context | None = None):
    """The invocation's registry: built once by ``main`` and passed as the context object."""
    from rapid.plugins import Registry
    if ctx is not None and isinstance(ctx.obj, Registry):
        return ctx.obj
    return Registry()


@app.command()
def run(ctx: typer.Context,
        recipe: Path = RecipeArg,
        set_: Optional[List[str]] = SetOpt,
        out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<run.name>, or the "
                                           "first free runs/<run.name>-N for a new run)"),
        resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in --out"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace a previous run in --out"),
        nproc: int = typer.Option(1, "--nproc", min=1, help="start N local worker processes (torch's elastic launcher)"),
        oversubscribe: bool = typer.Option(False, "--allow-oversubscribe", help="allow --nproc above the CPU count"),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="show the progress bar"),
        _local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True,
                                                  help="set by the DeepSpeed launcher; LOCAL_RANK is read instead")):
    """Train a recipe: writes DIR/recipe.toml, DIR/metrics.jsonl and DIR/checkpoints/."""
    from rapid import dist
    from rapid.recipe import load_recipe
    from rapid.train import check_run_dir, preflight, train

    registry = _registry(ctx)
    r = load_recipe(recipe, set_ or [], registry)
    run_dir = out or _default_run_dir(r.run.name, resume)
    if nproc > 1:
        if dist.env().world > 1:
            raise UserError("--nproc inside a process that a launcher already started",
                            hint="let torchrun / srun / the DeepSpeed launcher start the processes, without --nproc")
        preflight(r, registry, nproc)           # every check before any process starts
        check_run_dir(run_dir, r, resume, overwrite)
        if resume and not list((run_dir / "checkpoints").glob("step_*/manifest.json")):
            raise UserError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}",
                            hint="run without --resume to start fresh")
        argv = ["run", str(recipe), *(f"--set={s}" for s in set_ or []), "--out", str(run_dir),
                *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else []),
                "--progress" if progress else "--no-progress"]
        raise typer.Exit(dist.launch(argv, nproc, oversubscribe))
    result = train(r, run_dir, resume=resume, overwrite=overwrite, registry=registry,
                   progress=progress and sys.stderr.isatty())
    if dist.env().rank == 0:
        val = f", val_loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        console.print(f"done: {result.steps} steps in {result.seconds:.1f}s, loss {result.final.get('loss', 0):.4f}"
                      f"{val}, {result.tokens_per_s:,.0f} tokens/s -> {run_dir}", soft_wrap=True)


def _default_run_dir(name: str, resume: bool) -> Path:
    """runs/<name>, or, when that holds a run and this is a fresh one, the first free runs/<name>-N."""
    base = Path("runs") / name
    if resume or not (base / "metrics.jsonl").exists() and not (base / "checkpoints").exists():
        return base
    n = 2
    while (base.parent / f"{name}-{n}").exists():
        n += 1
    console.print(f"rapid: {base} holds a run; this one goes to {base.parent / f'{name}-{n}'}", soft_wrap=True)
    return base.parent / f"{name}-{n}"


def main(argv: list[str] | None = None) -> None:
    """Typer runs in standalone mode: usage errors print its usage message and exit 2. A worker
    started by torch's elastic launcher records an unexpected error for the launcher to report."""
    import os
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return _main(argv)
    from torch.distributed.elastic.multiprocessing.errors import record
    try:
        record(_main)(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    sys.stdout.flush()
    sys.stderr.flush()
    # A worker's work is done: skip the interpreter's teardown, where gloo's threads, joined late,
    # sometimes abort the process after a successful run ("terminate called without an active exception").
    os._exit(code)


def _main(argv: list[str] | None = None) -> None:
    try:
        registry = _registry()
        registry.add_commands(app)
        app(args=argv, obj=registry, prog_name="rapid")
    except UserError as exc:
        _fail(exc)


def _fail(exc: UserError) -> None:
    from rich.markup import escape

    from rapid.dist import env
    err, rank = Console(stderr=True), env().rank
    err.print(f"{escape(f'[rank {rank}] ') if rank else ''}[bold red]error:[/] {escape(str(exc))}", highlight=False,
              soft_wrap=True)
    if exc.hint:
        err.print(f"[dim]hint:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def command() -> None:
    """The ``rapid`` program (console script and ``python -m rapid.cli``): re-executed once with
    glibc's malloc tunables (``rapid.cpu.reexec_tuned``), then ``main``. Python callers use ``main``."""
    from rapid.cpu import reexec_tuned
    reexec_tuned()
    main()


if __name__ == "__main__":
    command()
