"""Crash-proof training: the process is killed with SIGKILL between steps and in the middle of
checkpoint writes, resumed each time, and ends bit for bit where an uninterrupted run ends. No
checkpoint directory is ever left unreadable."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import tomli_w

from rapid import checkpoint
from tests.conftest import REPO, tiny_raw
from tests.e2e.test_train import _text_data

pytestmark = pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")

# Runs `rapid run` in a fresh process; FAULT says where the process kills itself:
#   step:N       after step N has been logged
#   shards:N     in the checkpoint save of step N, with a torn (half-written) tensor shard
#   manifest:N   in the checkpoint save of step N, every file written but the manifest
#   rename:N     after step N's checkpoint directory is renamed into place, before `latest` is updated
RUNNER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import rapid
    from rapid import checkpoint
    kind, _, n = os.environ.get("FAULT", "none:0").partition(":")
    n = int(n)
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    class Killer:
        @rapid.hookimpl
        def rapid_step_end(self, step, metrics):
            if kind == "step" and step == n:
                die()

    import torch.distributed.checkpoint as dcp
    real_save, real_dcp_save, real_write = checkpoint.save, dcp.save, checkpoint._write_atomic
    saving = {"step": None}
    def save(root, step, *a, **kw):
        saving["step"] = step
        return real_save(root, step, *a, **kw)
    def dcp_save(state, storage_writer, **kw):
        real_dcp_save(state, storage_writer=storage_writer, **kw)
        if kind == "shards" and saving["step"] == n:
            shard = os.path.join(storage_writer.fs.concat_path(storage_writer.path, "__0_0.distcp"))
            data = open(shard, "rb").read()
            open(shard, "wb").write(data[: len(data) // 2])
            die()
    def write_atomic(path, text):
        if saving["step"] == n and ((kind == "manifest" and path.name == "manifest.json")
                                    or (kind == "rename" and path.name == "latest")):
            die()
        real_write(path, text)
    checkpoint.save, dcp.save, checkpoint._write_atomic = save, dcp_save, write_atomic

    import rapid.cli
    from rapid.plugins import Registry, make_plugin_manager
    rapid.cli._registry = lambda ctx=None: Registry(make_plugin_manager(extra=[Killer()]))
    rapid.cli.main(sys.argv[1:])
""")


def _run(recipe, out, *extra, fault="none:0"):
    env = {**os.environ, "FAULT": fault, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", RUNNER, "run", str(recipe), "--out", str(out), "--no-progress",
                           *extra], capture_output=True, text=True, cwd=REPO, env=env)


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def _all_checkpoints_readable(run_dir):
    for path in (run_dir / "checkpoints").glob("step_*"):
        checkpoint.verify(path)        # raises if any complete-looking checkpoint is damaged


def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path):
    raw = tiny_raw(run={"steps": 12, "log_every": 1, "save_every": 3, "eval_every": 6, "keep_checkpoints": 0},
                   data=_text_data(tmp_path), model={"vocab_size": 300, "drop_policy": "random",
                                                     "capacity_factor": 0.8},
                   router={"jitter": 0.05}, parallel={"grad_accum": 2})
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps(raw))
    full = _run(recipe, tmp_path / "full")
    assert full.returncode == 0, full.stderr

    out = tmp_path / "killed"
    faults = ["step:5", "shards:6", "manifest:9", "rename:9"]
    for i, fault in enumerate(faults):
        p = _run(recipe, out, *(["--resume"] if i else []), fault=fault)
        assert p.returncode == -signal.SIGKILL, (fault, p.stderr)
        _all_checkpoints_readable(out)
    p = _run(recipe, out, "--resume")
    assert p.returncode == 0, p.stderr
    assert "resuming from" in p.stderr and "step_00000009" in p.stderr
    assert _losses(out) == _losses(tmp_path / "full")       # bit for bit, every logged step and val loss
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]   # no leftovers
