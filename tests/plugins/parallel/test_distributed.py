"""torch DDP, FSDP2 and expert parallelism for real: 2 processes, gloo on loopback, started by
`rapid run --nproc 2` (torch's elastic launcher). Tiny model, fp32, dropless, the same global batch:
one process with micro_batch 4 and two with micro_batch 2 see the same samples.

- equivalence: every layout's losses and validation loss match the single-process run within 1e-5
  relative (the issue asks 1e-4). The recipe leaves out the load-balance term: it is a statistic of
  each rank's own micro-batch (as in DeepSpeed and Megatron), not of the global batch, so with it
  layouts differ by that term's gradient (measured: 5e-5 relative in validation loss after 6 steps);
- a worker killed with SIGKILL mid-run, then --resume: the same metrics as the uninterrupted run of
  that layout, bit for bit;
- resharding: an EP=2 checkpoint resumed in one process and a single-process checkpoint resumed
  with EP=2 continue the unresharded curve (1e-5).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import tomli_w

from tests.conftest import REPO, tiny_raw
from tests.e2e.test_train import _text_data

pytestmark = pytest.mark.skipif(os.name != "posix", reason="gloo on loopback, SIGKILL")

LAYOUTS = {
    "single": ["--set", "parallel.micro_batch=4"],
    "torch": ["--nproc", "2", "--set", "parallel.name=torch"],
    "fsdp": ["--nproc", "2", "--set", "parallel.name=fsdp"],
    "torch_ep2": ["--nproc", "2", "--set", "parallel.name=torch", "--set", "parallel.expert_parallel=2"],
    "fsdp_ep2": ["--nproc", "2", "--set", "parallel.name=fsdp", "--set", "parallel.expert_parallel=2"],
}

# Injected into every worker through sitecustomize: SIGKILL rank RAPID_TEST_KILL_RANK after step N.
KILLER = textwrap.dedent("""
    import os
    if os.environ.get("RAPID_TEST_KILL_STEP"):
        import signal
        import rapid, rapid.plugins
        step_to_die = int(os.environ["RAPID_TEST_KILL_STEP"])

        class Killer:
            @rapid.hookimpl
            def rapid_step_end(self, step, metrics):
                if step == step_to_die:
                    os.kill(os.getpid(), signal.SIGKILL)

        real = rapid.plugins.make_plugin_manager
        rapid.plugins.make_plugin_manager = lambda **kw: real(**{**kw, "extra": [*kw.get("extra", ()), Killer()]})
""")


def _rapid(*args, env=None):
    return subprocess.run([sys.executable, "-m", "rapid.cli", "run", *args, "--no-progress"], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every layout trained for 6 steps (checkpoints at 2, 4, 6; validation at 3 and 6)."""
    root = tmp_path_factory.mktemp("dist")
    raw = tiny_raw(run={"steps": 6, "log_every": 1, "eval_every": 3, "save_every": 2, "keep_checkpoints": 0},
                   model={"vocab_size": 300, "dropless": True}, data=_text_data(root),
                   parallel={"micro_batch": 2}, loss={"lm": 1.0, "z_loss": 0.001})
    (root / "r.toml").write_text(tomli_w.dumps(raw))
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(KILLER)
    for name, args in LAYOUTS.items():
        p = _rapid(str(root / "r.toml"), "--out", str(root / name), *args)
        assert p.returncode == 0, (name, p.stderr[-3000:])
    return root


def _close(a, b, rel):
    return abs(a - b) <= rel * abs(b)


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "single"])
def test_layout_matches_one_process(runs, layout):
    one, other = _metrics(runs / "single"), _metrics(runs / layout)
    assert [r["step"] for r in other] == [r["step"] for r in one]
    assert other[0]["lm_loss"] == pytest.approx(one[0]["lm_loss"], rel=1e-6)    # before any update
    for a, b in zip(other, one):
        assert _close(a["lm_loss"], b["lm_loss"], 1e-5), (layout, a["step"], a["lm_loss"], b["lm_loss"])
        if "val_loss" in b:
            assert _close(a["val_loss"], b["val_loss"], 1e-5), (layout, a["step"], a["val_loss"], b["val_loss"])
    assert other[-1]["tokens_per_s"] > 0


def test_checkpoints_record_the_layout(runs):
    manifest = json.loads((runs / "torch_ep2" / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    assert manifest["layout"] == {"strategy": "torch", "world_size": 2, "expert_parallel": 2}
    shards = sorted(p.name for p in (runs / "torch_ep2" / "checkpoints" / "step_00000006").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]                 # each rank wrote its part


@pytest.mark.parametrize("layout", ["torch", "fsdp", "torch_ep2"])
def test_kill_then_resume_equals_uninterrupted(runs, layout, tmp_path):
    out = tmp_path / layout
    env = {"RAPID_TEST_KILL_STEP": "5", "PYTHONPATH": f"{runs / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    killed = _rapid(str(runs / "r.toml"), "--out", str(out), *LAYOUTS[layout], env=env)
    assert killed.returncode != 0 and "worker 0 failed" in killed.stderr, killed.stderr[-2000:]
    assert max(r["step"] for r in _metrics(out)) == 5
    resumed = _rapid(str(runs / "r.toml"), "--out", str(out), "--resume", *LAYOUTS[layout])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000004" in resumed.stderr
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory_bytes")} for r in rows]  # noqa: E731
    assert strip(_metrics(out)) == strip(_metrics(runs / layout))


@pytest.mark.parametrize("source,target", [("torch_ep2", "single"), ("single", "torch_ep2")])
def test_resharded_resume_continues_the_curve(runs, tmp_path, source, target):
    """Save at one layout, resume at the other from step 4: steps 5-6 follow the source run."""
    out = tmp_path / "run"
    shutil.copytree(runs / source, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    p = _rapid(str(runs / "r.toml"), "--out", str(out), "--resume", *LAYOUTS[target])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resharded" in p.stderr
    src, new = _metrics(runs / source), _metrics(out)
    assert [r["step"] for r in new] == [r["step"] for r in src]
    for a, b in zip(new[4:], src[4:]):
        assert _close(a["loss"], b["loss"], 1e-5), (a["step"], a["loss"], b["loss"])
    assert _close(new[-1]["val_loss"], src[-1]["val_loss"], 1e-5)


def test_an_expert_without_tokens_keeps_ddp_in_step(runs, tmp_path):
    """find_unused_parameters is off: with every token routed to expert 0, the other experts must
    still take part in the gradient all-reduce (they get zero gradients), or DDP would hang or fail."""
    p = _rapid(str(runs / "r.toml"), "--out", str(tmp_path / "r"), *LAYOUTS["torch"],
               "--set", "router.name=tests.core.test_hooks:FixedRouter", "--set", "run.steps=3")
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in _metrics(tmp_path / "r")] == [1, 2, 3]


def test_torchrun_started_workers_train_the_same(runs, tmp_path):
    """`rapid run` under torchrun (what the DeepSpeed launcher and srun look like too: rank and world
    from the environment) trains exactly as `--nproc 2` does."""
    out = tmp_path / "r"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "rapid.cli", "run", str(runs / "r.toml"), "--out", str(out), "--no-progress",
                        "--set", "parallel.name=torch"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory_bytes")} for r in rows]  # noqa: E731
    assert strip(_metrics(out)) == strip(_metrics(runs / "torch"))


# Injected through sitecustomize: FAULT=inf puts an inf into one of rank 1's expert gradients at
# step 2 (an fp16 overflow that only that rank sees); FAULT=raise makes rank 1 raise at step 3. The
# probe prints each rank's loss scale and how many parameters moved.
PROBE = textwrap.dedent("""
    import os
    if os.environ.get("RAPID_TEST_FAULT"):
        import torch
        from rapid.builtin.parallel import ddp
        real_step, calls = ddp.DistributedEngine.step, [0]

        def step(self):
            calls[0] += 1
            rank = int(os.environ["RANK"])
            if os.environ["RAPID_TEST_FAULT"] == "raise" and calls[0] == 3 and rank == 1:
                raise RuntimeError("injected failure on rank 1")
            if os.environ["RAPID_TEST_FAULT"] == "inf" and calls[0] == 2 and rank == 1:
                next(p for p in self.expert_params if p.grad is not None).grad.view(-1)[0] = float("inf")
            before = [p.detach().clone() for p in self.inner.parameters()]
            stats = real_step(self)
            moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, self.inner.parameters()))
            scale = self.scaler.get_scale() if self.scaler else None
            print(f"[probe] step {calls[0]} rank {rank} scale {scale} moved {moved}", flush=True)
            return stats
        ddp.DistributedEngine.step = step
""")


def _with_probe(tmp_path, fault):
    site = tmp_path / "probe"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PROBE)
    return {"RAPID_TEST_FAULT": fault, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(runs, tmp_path):
    p = _rapid(str(runs / "r.toml"), "--out", str(tmp_path / "r"), *LAYOUTS["torch_ep2"], "--set", "run.steps=3",
               "--set", "parallel.precision=fp16", env=_with_probe(tmp_path, "inf"))
    assert p.returncode == 0, p.stderr[-3000:]
    probes = re.findall(r"\[probe\] step 2 rank (\d) scale (\S+) moved (\d+)", p.stdout + p.stderr)
    assert sorted(probes) == [("0", "32768.0", "0"), ("1", "32768.0", "0")], probes   # both halved, neither moved


def test_a_failing_worker_is_named(runs, tmp_path):
    p = _rapid(str(runs / "r.toml"), "--out", str(tmp_path / "r"), *LAYOUTS["torch"],
               env=_with_probe(tmp_path, "raise"))
    assert p.returncode == 1
    assert "error: worker 1 failed (exit code 1): RuntimeError: injected failure on rank 1" in p.stderr, p.stderr[-2000:]


def test_a_parameter_without_gradient_is_a_clear_error(runs, tmp_path):
    p = _rapid(str(runs / "r.toml"), "--out", str(tmp_path / "r"), *LAYOUTS["torch"], "--set", "router.gate_weights=one",
               "--set", "loss.z_loss=0.0")
    assert p.returncode == 2
    assert "parameters that get no gradient: blocks.0.moe.router.gate.weight" in p.stderr, p.stderr[-2000:]


def test_hash_router_under_fsdp_and_ep_matches_one_process_and_resumes(runs, tmp_path):
    """A router without parameters (hash, bigram: it also needs each token's predecessor) under FSDP2
    with expert parallelism: every expert stays in the graph, the tables (buffers, replicated) are
    saved with the model, and the run matches one process and resumes bit for bit."""
    hashed = ["--set", "router.name=hash", "--set", "router.variant=bigram"]
    one, two = tmp_path / "one", tmp_path / "two"
    p = _rapid(str(runs / "r.toml"), "--out", str(one), *LAYOUTS["single"], *hashed)
    assert p.returncode == 0, p.stderr[-3000:]
    env = {"RAPID_TEST_KILL_STEP": "5", "PYTHONPATH": f"{runs / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    killed = _rapid(str(runs / "r.toml"), "--out", str(two), *LAYOUTS["fsdp_ep2"], *hashed, env=env)
    assert killed.returncode != 0 and max(r["step"] for r in _metrics(two)) == 5, killed.stderr[-2000:]
    resumed = _rapid(str(runs / "r.toml"), "--out", str(two), "--resume", *LAYOUTS["fsdp_ep2"], *hashed)
    assert resumed.returncode == 0 and "step_00000004" in resumed.stderr, resumed.stderr[-3000:]
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert _close(y["lm_loss"], x["lm_loss"], 1e-5), (x["step"], x["lm_loss"], y["lm_loss"])
    assert _close(b[-1]["val_loss"], a[-1]["val_loss"], 1e-5)
