"""Atomic, verified checkpoints that do not depend on the layout that wrote them.

    checkpoints/step_00000100/
        .metadata, __<rank>_0.distcp   torch.distributed.checkpoint: ``model.<name>``, ``optim.<name>.<state>``
        state.json                     step, LR schedule, data position, scheduler / loss-scaler state, layout
        rng_rank<r>.safetensors        each rank's RNG state (restored when the layout is unchanged)
        recipe.toml                    the resolved recipe
        manifest.json                  every file's size and sha256, written last
    checkpoints/latest                 the newest complete one

Tensors are keyed by full parameter name; sharded ones are saved as DTensors over their global shape
(FSDP shards, experts at their global index), so a checkpoint written by any world size and expert-
parallel size loads into any other, optimizer state included. Every rank writes its own shards into
one temporary directory; when all are fsynced, rank 0 writes the manifest and renames the directory
into place. Nothing is unpickled without restriction: shards load with ``torch.load(weights_only=True)``
and the DCP metadata through an allow-listed unpickler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rapid.errors import UserError

FORMAT = 2


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


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns whenever it runs without a process group; for rapid that is a normal case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(ckpt_root: Path, step: int, engine, state: dict, keep: int = 0, recipe: str = "",
         meta: dict | None = None) -> Path:
    """Write ``step_XXXXXXXX`` (collective: every rank calls it). ``state`` is JSON-able (step,
    data position, ...); the engine adds its tensors and scheduler state; ``meta`` goes into the
    manifest (layout, parameter counts)."""
    import torch.distributed.checkpoint as dcp
    rank, world = _rank_world()
    final, tmp = ckpt_root / f"step_{step:08d}", ckpt_root / f".tmp-step_{step:08d}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in [*ckpt_root.glob(".tmp-step_*"), *ckpt_root.glob(".old-step_*")]:
            shutil.rmtree(stale, ignore_errors=True)  # saves that were interrupted before
        tmp.mkdir()
    _barrier()
    tensors, extra = engine.checkpoint_state()
    with _one_process_is_fine():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=not dist.is_initialized())
    save_file(_rng_state(), str(tmp / f"rng_rank{rank}.safetensors"))
    _fsync(tmp / f"rng_rank{rank}.safetensors")
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({**state, "engine": extra, "world_size": world}, indent=1))
        (tmp / "recipe.toml").write_text(recipe)
        for name in ("state.json", "recipe.toml"):
            _fsync(tmp / name)
    _barrier()
    files = _hash_share(tmp, sorted(p.name for p in tmp.iterdir()))
    if rank == 0:
        manifest = {"format": FORMAT, "step": step, "files": files, **(meta or {})}
        _write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))
        _fsync(tmp)
        old = None
        if final.exists():   # re-saving a step: move the old copy aside, never delete it first
            old = ckpt_root / f".old-step_{step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(ckpt_root)
        _write_atomic(ckpt_root / "latest", final.name)
        _fsync(ckpt_root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if keep > 0:
            for stale in sorted(ckpt_root.glob("step_*"))[:-keep]:
                shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def _hash_share(path: Path, names: list[str]) -> dict:
    """{name: {bytes, sha256}} for ``names``, hashed by all ranks in turn (collective)."""
    rank, world = _rank_world()
    mine = {n: {"bytes": (path / n).stat().st_size, "sha256": _sha256(path / n)}
            for i, n in enumerate(names) if i % world == rank}
    return {k: v for part in _gather(mine) for k, v in part.items()}


REQUIRED_FILES = (".metadata", "state.json", "recipe.toml")


def _read_manifest(path: Path) -> dict:
    """manifest.json, checked for shape: format, a step matching the directory, plain file names
    (the required ones among them) with sizes and hashes."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {path} has no readable manifest.json ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"checkpoint {path} has format {found}; this rapid reads {FORMAT}")
    files = manifest.get("files")
    ok = isinstance(files, dict) and all(
        isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\\" not in n and isinstance(f, dict)
        and isinstance(f.get("bytes"), int) and isinstance(f.get("sha256"), str) for n, f in files.items())
    if not ok:
        raise UserError(f"checkpoint {path}: manifest.json is malformed (files must map plain file names to "
                        "their bytes and sha256)")
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise UserError(f"checkpoint {path}: manifest.json does not list {', '.join(missing)}")
    if not isinstance(manifest.get("step"), int) or path.name != f"step_{manifest['step']:08d}":
        raise UserError(f"checkpoint {path}: manifest.json says step {manifest.get('step')!r}")
    return manifest


def verify(path: Path) -> dict:
    """The manifest of ``path`` once every file it lists matches in size and sha256 (collective:
    the ranks share the hashing)."""
    manifest = _read_manifest(path)     # every rank reads the same file: all raise or none
    files = manifest["files"]
    present = [n for n in files if (path / n).is_file() and (path / n).stat().st_size == files[n]["bytes"]]
    actual = _hash_share(path, present)
    bad = [n for n in files if actual.get(n, {}).get("sha256") != files[n]["sha256"]]
    if bad:
        raise UserError(f"checkpoint file {path / bad[0]} does not match its manifest (truncated or modified)",
                        hint="resume from an earlier checkpoint or start a fresh run")
    try:
        state = json.loads((path / "state.json").read_text())
        assert isinstance(state["step"], int) and isinstance(state["data"], dict) and isinstance(state["engine"], dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"checkpoint {path}: state.json lacks step, data or engine state") from None
    return manifest


def find_resumable(ckpt_root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and why each newer one was skipped (collective)."""
    skipped = []
    for path in sorted(ckpt_root.glob("step_*"), reverse=True):
        try:
            verify(path)
            return path, skipped
        except UserError as exc:
            skipped.append(str(exc))
    return None, skipped


def load(path: Path, engine) -> dict:
    """Verify ``path``, fill the engine's model and optimizer in place (resharding to this layout)
    and return the JSON state. RNG states are restored when the world size is unchanged."""
    import torch.distributed.checkpoint as dcp
    manifest = verify(path)
    state = json.loads((path / "state.json").read_text())
    tensors, _ = engine.checkpoint_state()
    try:
        with _one_process_is_fine():
            dcp.load(tensors, storage_reader=SafeReader(path, manifest["files"]), no_dist=not dist.is_initialized())
    except (Exception, dcp.api.CheckpointException) as exc:  # verified bytes that do not fit this model
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        why = next((ln for ln in lines if "size" in ln.lower() or "missing" in ln.lower() or "declares" in ln
                    or "WeightsUnpickler" in ln or "not allowed" in ln), lines[0])
        raise UserError(f"checkpoint {path} cannot be loaded into this model: {why[:300]}",
                        hint="resume with the recipe the checkpoint was written with") from None
    engine.load_extra_state(state["engine"])
    rank, world = _rank_world()
    rng = path / f"rng_rank{rank}.safetensors"
    if state.get("world_size") == world and rng.exists():
        saved = load_file(str(rng))
        torch.set_rng_state(saved["torch"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    return state


# ---------------------------------------------------------------- reading DCP metadata safely
_SAFE = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
         ("copyreg", "_reconstructor"), ("builtins", "object"), ("torch", "Size"),
         ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class _Unpickler(pickle.Unpickler):
    """Only the classes a DCP ``.metadata`` file is made of: DCP's own, torch sizes, dtypes,
    layouts and memory formats."""

    def find_class(self, module: str, name: str):
        obj = None
        if (module, name) in _SAFE or module.startswith("torch.distributed.checkpoint."):
            obj = super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            obj = getattr(torch, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")
        return obj


def _reader_class():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

    class Reader(dcp.FileSystemReader):
        files: frozenset[str] = frozenset()

        def read_metadata(self, *args, **kwargs):
            with open(Path(self.path) / ".metadata", "rb") as fh:
                metadata = _Unpickler(fh).load()
            # rapid saves tensors only: DCP would torch.load a "bytes" entry with weights_only=False
            bad = [k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
            files = {info.relative_path for info in metadata.storage_data.values()}
            if bad or not files <= self.files:
                raise pickle.UnpicklingError(f"the metadata declares non-tensor entries ({', '.join(bad[:3])}) or "
                                             f"files outside the manifest ({', '.join(sorted(files - self.files))})")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


def SafeReader(path: Path, files):
    """torch.distributed.checkpoint's file reader with an allow-listed metadata unpickler that
    accepts tensor entries only, stored in ``files`` (the tensor shards the manifest verified)."""
    reader = _reader_class()(str(path))
    reader.files = frozenset(n for n in files if n.endswith(".distcp"))
    return reader
