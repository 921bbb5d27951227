"""The deepspeed backend for real: DeepSpeed 0.19 on 2 processes (gloo), the tiny model, fp32,
dropless, the same global batch as one process (load-balance term left out: a per-micro-batch
statistic). No ZeRO, ZeRO-1, ZeRO-2, ZeRO-2 with expert parallelism, ZeRO-3 on a dense model, offload
and DeepSpeed activation checkpointing against one process; bf16 trains; every stage and precision
resumes its own checkpoint bit for bit, and checkpoints resume under torch DDP and the reverse; a
non-finite step is skipped without ZeRO too; a second run in the process starts clean; the switches
and a DeepSpeed JSON merge, contradictions and malformed blocks are refused."""

import json
import os
import re
import shutil
import textwrap

import pytest
import tomli_w

from tests.conftest import tiny_raw
from tests.e2e.test_train import _text_data
from tests.plugins.parallel.test_distributed import _close, _metrics, _rapid

pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install 'rapidmoe[deepspeed]')")
pytestmark = pytest.mark.skipif(os.name != "posix", reason="gloo on loopback")

DS = ["--nproc", "2", "--set", "parallel.name=deepspeed"]
LAYOUTS = {
    "zero0": DS,
    "zero1": DS + ["--set", "parallel.zero_stage=1"],
    "zero2": DS + ["--set", "parallel.zero_stage=2"],
    "zero2_ep2": DS + ["--set", "parallel.zero_stage=2", "--set", "parallel.expert_parallel=2"],
    "zero2_offload_ac": DS + ["--set", "parallel.preset=deepspeed_zero2_offload",
                              "--set", "parallel.activation_checkpoint=true"],
}
DENSE = ["--set", "model.moe_every=0", "--set", "model.experts=1"]
BF16 = {"zero0_bf16": DS + ["--set", "parallel.precision=bf16"],
        "zero2_bf16": LAYOUTS["zero2"] + ["--set", "parallel.precision=bf16"]}
DS_RUNS = {**LAYOUTS, **BF16, "zero3_dense": DS + ["--set", "parallel.zero_stage=3", *DENSE]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    raw = tiny_raw(run={"steps": 6, "log_every": 1, "eval_every": 3, "save_every": 2, "keep_checkpoints": 0},
                   model={"vocab_size": 300, "dropless": True}, data=_text_data(root),
                   parallel={"micro_batch": 2}, loss={"lm": 1.0, "z_loss": 0.001})
    (root / "r.toml").write_text(tomli_w.dumps(raw))
    todo = {"single": ["--set", "parallel.micro_batch=4"], "single_dense": ["--set", "parallel.micro_batch=4", *DENSE],
            **DS_RUNS}
    for name, args in todo.items():
        p = _rapid(str(root / "r.toml"), "--out", str(root / name), *args)
        assert p.returncode == 0, (name, p.stderr[-3000:])
    return root


@pytest.mark.parametrize("layout,baseline", [*((k, "single") for k in LAYOUTS), ("zero3_dense", "single_dense")])
def test_deepspeed_matches_one_process(runs, layout, baseline):
    one, ds = _metrics(runs / baseline), _metrics(runs / layout)
    assert [r["step"] for r in ds] == [r["step"] for r in one]
    for a, b in zip(ds, one):
        assert _close(a["lm_loss"], b["lm_loss"], 1e-5), (layout, a["step"], a["lm_loss"], b["lm_loss"])
        assert _close(a["grad_norm"], b["grad_norm"], 1e-4), (layout, a["step"], a["grad_norm"], b["grad_norm"])
        if "val_loss" in b:
            assert _close(a["val_loss"], b["val_loss"], 1e-5), (layout, a["val_loss"], b["val_loss"])


@pytest.mark.parametrize("layout", BF16)
def test_bf16_trains(runs, layout):
    rows = _metrics(runs / layout)
    assert all(r["loss"] == r["loss"] for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert _close(rows[-1]["val_loss"], _metrics(runs / "single")[-1]["val_loss"], 1e-2)   # bf16 rounding


def test_bf16_without_zero_trains_as_with_zero2(runs):
    """Without ZeRO, DeepSpeed's FP16_UnfusedOptimizer creates the AdamW's state with a step on zero
    gradients (weight decay applied, a step counted: 1% higher validation loss after 6 steps); undone."""
    for a, b in zip(_metrics(runs / "zero0_bf16"), _metrics(runs / "zero2_bf16")):
        assert _close(a["lm_loss"], b["lm_loss"], 1e-5), (a["step"], a["lm_loss"], b["lm_loss"])


@pytest.mark.parametrize("source,target", [("zero2", ["--nproc", "2", "--set", "parallel.name=torch"]),
                                           ("single", LAYOUTS["zero2_ep2"])])
def test_resume_across_backends(runs, tmp_path, source, target):
    """A DeepSpeed checkpoint (fp32 masters and Adam states gathered per parameter) resumes under
    torch DDP, and a one-process checkpoint under DeepSpeed with expert parallelism: steps 5-6 follow."""
    out = tmp_path / "r"
    shutil.copytree(runs / source, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    p = _rapid(str(runs / "r.toml"), "--out", str(out), "--resume", *target)
    assert p.returncode == 0, p.stderr[-3000:]
    for a, b in zip(_metrics(out)[4:], _metrics(runs / source)[4:]):
        assert _close(a["loss"], b["loss"], 1e-5), (a["step"], a["loss"], b["loss"])


STRIP = ("tokens_per_s", "peak_memory_bytes")


# Injected through sitecustomize. RAPID_TEST_DS_PROBE=inf: an inf in one gradient of rank 1 at step 2
# (after DeepSpeed reduced them: only that rank sees it), and each rank prints how many parameters its
# step moved. Always: whether the engine still holds the checkpoint's gathered tensors after a load.
PROBE = textwrap.dedent("""
    import os
    if os.environ.get("RAPID_TEST_DS_PROBE"):
        import torch
        from rapid.builtin.parallel import deepspeed
        engine, calls = deepspeed.DeepSpeedEngine, [0]
        real_step, real_load = engine.step, engine.load_extra_state

        def step(self):
            calls[0] += 1
            rank = int(os.environ["RANK"])
            if os.environ["RAPID_TEST_DS_PROBE"] == "inf" and calls[0] == 2 and rank == 1:
                next(p for p in self.names if p.grad is not None).grad.view(-1)[0] = float("inf")
            before = [p.detach().clone() for p in self.inner.parameters()]
            stats = real_step(self)
            moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, self.inner.parameters()))
            print(f"[probe] step {calls[0]} rank {rank} moved {moved} skipped {stats['skipped']}", flush=True)
            return stats

        def load_extra_state(self, extra):
            real_load(self, extra)
            print(f"[probe] after the load, gathered tensors held: {self._template is not None}", flush=True)
        engine.step, engine.load_extra_state = step, load_extra_state
""")


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(PROBE)
    return lambda what: {"RAPID_TEST_DS_PROBE": what,
                         "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.mark.parametrize("layout", ["zero0", "zero0_bf16", "zero2_bf16", "zero2_offload_ac", "zero3_dense"])
def test_resume_equals_uninterrupted(runs, tmp_path, probe, layout):
    """Resumed from step 4 in the layout that wrote it, steps 5-6 are those of the uninterrupted run
    bit for bit: fp32 masters (DeepSpeed's copies in bf16) and Adam states, also where a resume creates
    them on ZeRO's flat partitions (offload keeps gradient buffers there, ZeRO-3 empties its groups);
    the gathered copies are not kept after the load. (ZeRO-2 with expert parallelism:
    test_resume_across_backends loads into it.)"""
    out = tmp_path / "r"
    shutil.copytree(runs / layout, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    p = _rapid(str(runs / "r.toml"), "--out", str(out), "--resume", *DS_RUNS[layout], env=probe("load"))
    assert p.returncode == 0 and "step_00000004" in p.stderr, p.stderr[-3000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in STRIP} for r in rows]  # noqa: E731
    assert strip(_metrics(out)) == strip(_metrics(runs / layout))
    assert re.findall(r"gathered tensors held: (\w+)", p.stdout + p.stderr) == ["False", "False"]


def test_fp32_without_zero_skips_a_non_finite_step_on_every_rank(runs, tmp_path, probe):
    p = _rapid(str(runs / "r.toml"), "--out", str(tmp_path / "r"), *LAYOUTS["zero0"], "--set", "run.steps=3",
               env=probe("inf"))
    assert p.returncode == 0, p.stderr[-3000:]
    probes = re.findall(r"\[probe\] step 2 rank (\d) moved (\d+) skipped (\w+)", p.stdout + p.stderr)
    assert sorted(probes) == [("0", "0", "True"), ("1", "0", "True")], probes
    rows = _metrics(tmp_path / "r")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert rows[2]["lr"] == rows[1]["lr"] != rows[0]["lr"]            # the schedule waited a step


def test_user_json_is_merged(runs, tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"steps_per_print": 1000, "zero_optimization": {"stage": 2, "overlap_comm": False}}))
    p = _rapid(str(runs / "r.toml"), "--out", str(tmp_path / "r"), *LAYOUTS["zero2"], "--set", f"parallel.config={cfg}",
               "--set", "run.steps=2")
    assert p.returncode == 0, p.stderr[-3000:]


# ------------------------------------------------------------------ the switches and the JSON, in process
from rapid.builtin.parallel.deepspeed import DeepSpeed, merged_config  # noqa: E402
from rapid.errors import UserError  # noqa: E402


def _config(tmp_path, text, **switches):
    path = tmp_path / "ds.json"
    path.write_text(text)
    return DeepSpeed.Config(config=str(path), **switches)


def test_switches_own_their_keys(tmp_path):
    merged = merged_config(_config(tmp_path, '{"zero_optimization": {"overlap_comm": true}, "steps_per_print": 5}',
                                   zero_stage=2, micro_batch=3, grad_accum=2, offload=True), clip=0.5, world=2)
    assert merged["zero_optimization"] == {"overlap_comm": True, "stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert merged["train_batch_size"] == 12 and merged["gradient_clipping"] == 0.5
    assert merged["steps_per_print"] == 5                       # not a switch: the JSON's value
    # offload = false owns offload_optimizer too: the user's settings stay, it offloads nothing
    merged = merged_config(_config(tmp_path, '{"zero_optimization": {"offload_optimizer": {"pin_memory": true}}}',
                                   zero_stage=2), clip=1.0, world=2)
    assert merged["zero_optimization"]["offload_optimizer"] == {"pin_memory": True, "device": "none"}


@pytest.mark.parametrize("text,match", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, not list"),
    ('{"zero_optimization": {"stage": 1}}', r"contradicts the switches: zero_optimization.stage = 1 \(the switches say 2\)"),
    ('{"train_micro_batch_size_per_gpu": 8, "fp16": {"enabled": true}}',
     r"train_micro_batch_size_per_gpu = 8 \(the switches say 2\); fp16.enabled = True"),
    ('{"optimizer": {"type": "Adam"}}', "has a 'optimizer' block; rapid's \\[optim\\] table sets"),
    ('{"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}',
     r"zero_optimization.offload_optimizer.device = 'cpu' \(the switches say 'none'\)"),
    ('{"zero_optimization": {"cpu_offload": true}}', "has zero_optimization.cpu_offload; the offload switch owns"),
    ('{"bf16": true}', r"ds.json': bf16 must be a JSON object \(a block of settings\), not bool true"),
    ('{"zero_optimization": {"offload_optimizer": "cpu"}}',
     "zero_optimization.offload_optimizer must be a JSON object \\(a block of settings\\), not str \"cpu\""),
])
def test_bad_json(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        merged_config(_config(tmp_path, text, zero_stage=2, micro_batch=2), clip=1.0, world=2)


def test_missing_json():
    with pytest.raises(UserError, match="cannot be read"):
        merged_config(DeepSpeed.Config(config="/no/such/ds.json"), clip=1.0, world=1)


def test_fp16_loss_scaler_state_keeps_the_hysteresis():
    """DeepSpeed's fp16 scaler under ZeRO (hysteresis 2) halves the scale at the second overflow; the
    first leaves cur_hysteresis at 1, which a checkpoint must keep, or a resumed run halves a step late.
    (fp16 itself needs a GPU: DeepSpeed's CPU accelerator refuses it.)"""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from rapid.builtin.parallel.deepspeed import load_scaler_state, scaler_state
    make = lambda: DynamicLossScaler(2.0**16, 1000, 1, delayed_shift=2, consecutive_hysteresis=False)  # noqa: E731
    run, resumed = make(), make()
    run.cur_iter, run.last_overflow_iter, run.cur_hysteresis = 7, 6, 1        # after an overflow at iteration 6
    load_scaler_state(resumed, json.loads(json.dumps(scaler_state(run))))   # through state.json
    assert vars(resumed) == vars(run)


def test_a_second_run_in_the_process_starts_clean(tmp_path, monkeypatch):
    """close() releases DeepSpeed's process groups and communication backend and restores the
    environment wrap set for its 1-process group: a second run (else: "Group ... is not registered")
    trains exactly as the first."""
    import importlib

    from deepspeed.utils import groups
    from rapid.train import train_raw
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    raw = tiny_raw(run={"steps": 2}, data=_text_data(tmp_path),
                   parallel={"name": "deepspeed", "micro_batch": 2, "zero_stage": 2})
    first = train_raw(raw, tmp_path / "a", progress=False)
    assert importlib.import_module("deepspeed.comm.comm").cdb is None and groups._WORLD_GROUP is None
    assert not any(key in os.environ for key in keys)
    second = train_raw(raw, tmp_path / "b", progress=False)
    strip = lambda row: {k: v for k, v in row.items() if k not in STRIP}  # noqa: E731
    assert strip(second.final) == strip(first.final)
