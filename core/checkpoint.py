"""Atomic, verified checkpoints.

Layout: ``checkpoints/step_00000100/{model.safetensors, state.pt, recipe.toml, manifest.json}`` plus
a ``checkpoints/latest`` file naming the newest complete one. A checkpoint is written under a temporary
name and renamed into place only when complete; ``manifest.json`` records every file's size and
sha256 and is checked on load. Weights are safetensors; optimizer/scheduler/RNG/data state is loaded
with ``torch.load(weights_only=True)``: nothing from disk goes through unrestricted pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rapid.errors import UserError

FORMAT = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def split_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): keep one name per storage."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach().contiguous().cpu()
    return unique, aliases


def _fsync_dir(path: Path) -> None:
    """Make a rename or delete inside ``path`` durable (POSIX: fsync the directory itself)."""
    if os.name == "posix":
        _fsync(path)


def save(ckpt_root: Path, step: int, model_state: dict, state: dict, keep: int = 0,
         extra_files: dict[str, str] | None = None, meta: dict | None = None) -> Path:
    """Write ``step_XXXXXXXX`` atomically: a temporary directory, every file fsynced, the manifest
    last, one rename, the parent directory fsynced. ``extra_files`` are small text files (the
    resolved recipe); ``meta`` goes into the manifest (layout, parameter counts)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, aliases = split_aliases(model_state)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
    torch.save(state, tmp / "state.pt")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    files = {}
    for file in sorted(p for p in tmp.iterdir()):
        _fsync(file)
        files[file.name] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    manifest = {"format": FORMAT, "step": step, "files": files, **(meta or {})}
    _write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))
    _fsync_dir(tmp)
    old = None
    if final.exists():  # re-saving the same step: move the old copy aside, never delete it first
        old = ckpt_root / f".old-step_{step:08d}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    _write_atomic(ckpt_root / "latest", final.name)
    _fsync_dir(ckpt_root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep > 0:
        for stale in sorted(ckpt_root.glob("step_*"))[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def verify(path: Path) -> dict:
    """The manifest of ``path`` once every file it lists matches in size and sha256."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {path} has no readable manifest.json ({type(exc).__name__}: {exc})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} has format {manifest.get('format')}; this rapid reads {FORMAT}")
    for name, info in files.items():
        file = path / name
        if not file.exists() or file.stat().st_size != info["bytes"] or _sha256(file) != info["sha256"]:
            raise UserError(f"checkpoint file {file} does not match its manifest (truncated or modified)",
                            hint="resume from an earlier checkpoint or start a fresh run")
    return manifest


def find_resumable(ckpt_root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and why each newer one was skipped."""
    skipped = []
    for path in sorted(ckpt_root.glob("step_*"), reverse=True):
        try:
            verify(path)
            return path, skipped
        except UserError as exc:
            skipped.append(str(exc))
    return None, skipped


def load(path: Path) -> tuple[int, dict, dict]:
    """Verify ``path`` against its manifest, then return (step, model_state, state)."""
    manifest = verify(path)
    try:
        model_state = load_file(str(path / "model.safetensors"))
        with safe_open(str(path / "model.safetensors"), "pt") as fh:
            metadata = fh.metadata() or {}
        for alias, target in json.loads(metadata.get("aliases", "{}")).items():
            model_state[alias] = model_state[target]
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except Exception as exc:  # verified bytes that still do not parse: written by something else
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [""]
        why = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")), lines[0]).split(". ")[0]
        raise UserError(f"checkpoint {path} cannot be loaded: {type(exc).__name__}: {lines[0].split('.')[0]}: {why}",
                        hint="only checkpoints written by rapid load; nothing in them is unpickled") from None
    return manifest["step"], model_state, state


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
