"""Checkpoints: atomic layout, verified on load, tied weights and optimizer state restored in place,
no unrestricted pickle anywhere (DCP shards or metadata)."""

import json
import pickle

import pytest
import torch
from torch import nn

from rapid import checkpoint
from rapid.builtin.parallel.single import Single
from rapid.errors import UserError
from rapid.recipe import OptimConfig, RunConfig
from rapid.train import optimizer_factory


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.ln(self.emb(x)))


class _Recipe:
    optim, run = OptimConfig(lr=0.1, min_lr=0.01, warmup=1), RunConfig(steps=10)


def _engine(seed=0, steps=0):
    torch.manual_seed(seed)
    eng = Single(Single.Config()).wrap(Tied(), optimizer_factory(_Recipe()), clip=1.0)
    for _ in range(steps):
        eng.backward(eng.model(torch.arange(10)).pow(2).mean())
        eng.step()
    return eng


def _save(tmp_path, step=5, keep=0, engine=None):
    engine = engine or _engine(steps=2)
    state = {"step": step, "data": {"samples": 7}}
    return checkpoint.save(tmp_path / "ck", step, engine, state, keep=keep, recipe="[run]\n"), engine


def test_round_trip_restores_model_optimizer_and_schedule(tmp_path):
    path, saved = _save(tmp_path)
    assert path.name == "step_00000005" and (tmp_path / "ck" / "latest").read_text() == path.name
    assert not list((tmp_path / "ck").glob(".tmp*"))
    fresh = _engine(seed=1)
    state = checkpoint.load(path, fresh)
    assert state["step"] == 5 and state["data"] == {"samples": 7}
    for a, b in zip(saved.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
    assert fresh.model.head.weight is fresh.model.emb.weight                # still tied
    for p_saved, p_fresh in zip(saved.model.parameters(), fresh.model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved.optimizer.state[p_saved][key], fresh.optimizer.state[p_fresh][key])
    assert fresh.scheduler.state_dict() == saved.scheduler.state_dict()
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [g["lr"] for g in saved.optimizer.param_groups]
    for e in (saved, fresh):                                               # and they continue alike
        e.backward(e.model(torch.arange(10)).pow(2).mean())
        e.step()
    assert all(torch.equal(a, b) for a, b in zip(saved.model.parameters(), fresh.model.parameters()))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_checkpoint_is_refused(tmp_path, damage):
    path, _ = _save(tmp_path)
    target = path / "__0_0.distcp"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[:-10])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        target.unlink()
    with pytest.raises(UserError, match="does not match its manifest"):
        checkpoint.load(path, _engine())


def _rehash(path):
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"bytes": (path / name).stat().st_size, "sha256": checkpoint._sha256(path / name)}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("where", [".metadata", "__0_0.distcp"])
def test_pickles_that_would_run_code_are_refused(tmp_path, where):
    """The DCP metadata goes through an allow-listed unpickler, the shards through
    torch.load(weights_only=True); the manifest matches, so only the loaders stand in the way."""
    path, _ = _save(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("ran",))

    if where == ".metadata":
        (path / where).write_bytes(pickle.dumps(Evil()))
    else:
        torch.save({"evil": Evil()}, path / where)
    _rehash(path)
    with pytest.raises(UserError, match="cannot be loaded"):
        checkpoint.load(path, _engine())
    assert not marker.exists()


def test_resume_takes_newest_verified_and_says_why_others_were_skipped(tmp_path):
    path5, engine = _save(tmp_path, step=5)
    (tmp_path / "ck" / ".tmp-step_00000010").mkdir()           # a save interrupted mid-way
    (tmp_path / "ck" / "step_00000009").mkdir()                 # no manifest
    path8, _ = _save(tmp_path, step=8, engine=engine)
    (path8 / "state.json").write_text("{}")                     # damaged after the save
    found, skipped = checkpoint.find_resumable(tmp_path / "ck")
    assert found == path5
    assert len(skipped) == 2
    assert "step_00000009 has no readable manifest.json" in skipped[0]
    assert "step_00000008/state.json does not match its manifest" in skipped[1]
    assert checkpoint.find_resumable(tmp_path / "nothing") == (None, [])


def test_resave_same_step_never_deletes_the_old_copy_first(tmp_path, monkeypatch):
    """Re-saving a step moves the old copy aside before the new one is renamed into place: a crash
    between the two leaves the old copy on disk (it was deleted first before)."""
    path, engine = _save(tmp_path, step=5)
    real_rename = checkpoint.os.rename

    def crash_on_the_new_copy(src, dst):
        if str(src).endswith(".tmp-step_00000005"):
            raise OSError("crash")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", crash_on_the_new_copy)
    with pytest.raises(OSError, match="crash"):
        _save(tmp_path, step=5, engine=engine)
    old = tmp_path / "ck" / ".old-step_00000005"
    assert (old / "manifest.json").exists()
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    again, _ = _save(tmp_path, step=5, engine=engine)            # the next save cleans up
    assert again == path and not list((tmp_path / "ck").glob(".*step*"))
    fresh = _engine(seed=3)
    checkpoint.load(path, fresh)
    assert torch.equal(fresh.model.emb.weight, engine.model.emb.weight)


def test_keep_prunes_old(tmp_path):
    engine = _engine()
    for step in (1, 2, 3):
        _save(tmp_path, step=step, keep=2, engine=engine)
    assert sorted(p.name for p in (tmp_path / "ck").glob("step_*")) == ["step_00000002", "step_00000003"]


def test_metadata_declaring_bytes_entries_is_refused(tmp_path):
    """DCP loads a "bytes" entry with torch.load(weights_only=False): a checkpoint whose metadata
    declares one (stored in a file the manifest does not list) must be refused, not executed."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    path, _ = _save(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("ran",))

    torch.save(Evil(), path / "payload.bin")
    metadata = pickle.loads((path / ".metadata").read_bytes())
    key = "model.emb.weight"
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    for index in [i for i in metadata.storage_data if i.fqn == key]:
        del metadata.storage_data[index]
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("payload.bin", 0, (path / "payload.bin").stat().st_size)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    _rehash(path)
    with pytest.raises(UserError, match="declares non-tensor entries"):
        checkpoint.load(path, _engine())
    assert not marker.exists()
