"""Checkpoints: atomic layout, verified on load, tied weights restored, no unrestricted pickle."""

import json

import pytest
import torch

from rapid import checkpoint
from rapid.errors import UserError


def _save(tmp_path, step=5, keep=0):
    w = torch.randn(4, 3)
    model = {"emb.weight": w, "head.weight": w, "ln.bias": torch.zeros(3)}   # head tied to emb
    state = {"engine": {"optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]}},
             "rng": {"torch": torch.get_rng_state()}, "data": {"position": 7}, "step": step}
    return checkpoint.save(tmp_path / "ck", step, model, state, keep=keep), model, state


def test_round_trip_with_tied_weights(tmp_path):
    path, model, saved = _save(tmp_path)
    assert path.name == "step_00000005" and (tmp_path / "ck" / "latest").read_text() == path.name
    assert not list((tmp_path / "ck").glob(".tmp*"))
    step, loaded, state = checkpoint.load(path)
    assert step == 5 and set(loaded) == set(model)
    assert torch.equal(loaded["head.weight"], model["emb.weight"])
    assert state["data"]["position"] == 7
    assert torch.equal(state["rng"]["torch"], saved["rng"]["torch"])
    assert torch.equal(state["engine"]["optimizer"]["state"][0]["exp_avg"], torch.ones(2))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_checkpoint_is_refused(tmp_path, damage):
    path, _, _ = _save(tmp_path)
    target = path / "model.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[:-10])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        target.unlink()
    with pytest.raises(UserError, match="does not match its manifest"):
        checkpoint.load(path)


def test_pickled_objects_are_refused(tmp_path):
    """state.pt is loaded with weights_only=True: an object whose unpickling would run code is
    refused (with a manifest that matches, so only the loader stands in the way)."""
    path, _, _ = _save(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("ran",))

    torch.save({"evil": Evil()}, path / "state.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"bytes": (path / "state.pt").stat().st_size,
                                     "sha256": checkpoint._sha256(path / "state.pt")}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="cannot be loaded: UnpicklingError: Weights only load failed"):
        checkpoint.load(path)
    assert not marker.exists()


def test_resume_takes_newest_verified_and_says_why_others_were_skipped(tmp_path):
    path5, _, _ = _save(tmp_path, step=5)
    (tmp_path / "ck" / ".tmp-step_00000010-123").mkdir()        # a save interrupted mid-way
    (tmp_path / "ck" / "step_00000009").mkdir()                 # no manifest
    path8, _, _ = _save(tmp_path, step=8)
    (path8 / "state.pt").write_bytes(b"garbage")                # damaged after the save
    found, skipped = checkpoint.find_resumable(tmp_path / "ck")
    assert found == path5
    assert len(skipped) == 2
    assert "step_00000009 has no readable manifest.json" in skipped[0]
    assert "step_00000008/state.pt does not match its manifest" in skipped[1]
    assert checkpoint.find_resumable(tmp_path / "nothing") == (None, [])


def test_resave_same_step_replaces_atomically(tmp_path):
    path, _, _ = _save(tmp_path, step=5)
    again, model, _ = _save(tmp_path, step=5)
    assert again == path and not list((tmp_path / "ck").glob(".*step*"))
    _, loaded, _ = checkpoint.load(path)
    assert torch.equal(loaded["emb.weight"], model["emb.weight"])


def test_keep_prunes_old(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step=step, keep=2)
    assert sorted(p.name for p in (tmp_path / "ck").glob("step_*")) == ["step_00000002", "step_00000003"]


def test_inspect_reports_step_layout_and_verification(tmp_path):
    path, _, _ = _save(tmp_path, step=5)
    info = checkpoint.inspect(tmp_path / "ck")
    assert info["step"] == 5 and info["verified"].startswith("ok") and info["path"] == str(path)
    (path / "model.safetensors").write_bytes(b"x")
    assert checkpoint.inspect(path)["verified"].startswith("FAILED")
    with pytest.raises(UserError, match="neither a checkpoint"):
        checkpoint.inspect(tmp_path)
