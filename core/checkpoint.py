"""Atomic, verified checkpoints.

Layout: ``checkpoints/step_00000100/{model.safetensors, state.pt, manifest.json}`` plus a
``checkpoints/latest`` file naming the newest complete one. A checkpoint is written under a temporary
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


def save(ckpt_root: Path, step: int, model_state: dict, state: dict, keep: int = 0) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, aliases = split_aliases(model_state)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
    torch.save(state, tmp / "state.pt")
    files = {}
    for name in ("model.safetensors", "state.pt"):
        _fsync(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    _write_atomic(tmp / "manifest.json", json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    if final.exists():  # re-saving the same step (e.g. a resumed run's final save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_atomic(ckpt_root / "latest", final.name)
    if keep > 0:
        for old in sorted(ckpt_root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_latest(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if pointer.exists():
        path = ckpt_root / pointer.read_text().strip()
        if (path / "manifest.json").exists():
            return path
    complete = sorted(p for p in ckpt_root.glob("step_*") if (p / "manifest.json").exists())
    return complete[-1] if complete else None


def load(path: Path) -> tuple[int, dict, dict]:
    """Verify ``path`` against its manifest, then return (step, model_state, state)."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {path} has no readable manifest.json ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} has format {manifest.get('format')}; this rapid reads {FORMAT}")
    for name, info in manifest["files"].items():
        file = path / name
        if not file.exists() or file.stat().st_size != info["bytes"] or _sha256(file) != info["sha256"]:
            raise UserError(f"checkpoint file {file} does not match its manifest (truncated or modified)",
                            hint="resume from an earlier checkpoint or start a fresh run")
    model_state = load_file(str(path / "model.safetensors"))
    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        metadata = fh.metadata() or {}
    for alias, target in json.loads(metadata.get("aliases", "{}")).items():
        model_state[alias] = model_state[target]
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    return manifest["step"], model_state, state
