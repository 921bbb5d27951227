"""The deepspeed backend for real: DeepSpeed 0.19 on 2 processes (gloo), the tiny model, fp32,
dropless, the same global batch as one process (load-balance term left out: a per-micro-batch
statistic). ZeRO-1, ZeRO-2, ZeRO-2 with expert parallelism, ZeRO-3 on a dense model, offload and
DeepSpeed activation checkpointing against one process; bf16 trains; checkpoints resume under torch
DDP and the reverse; the switches and a DeepSpeed JSON merge, contradictions are refused."""

import json
import os
import shutil

import pytest
import tomli_w

from tests.conftest import tiny_raw
from tests.e2e.test_train import _text_data
from tests.plugins.parallel.test_distributed import _close, _metrics, _rapid

pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install 'rapidmoe[deepspeed]')")
pytestmark = pytest.mark.skipif(os.name != "posix", reason="gloo on loopback")

DS = ["--nproc", "2", "--set", "parallel.name=deepspeed"]
LAYOUTS = {
    "zero1": DS + ["--set", "parallel.zero_stage=1"],
    "zero2": DS + ["--set", "parallel.zero_stage=2"],
    "zero2_ep2": DS + ["--set", "parallel.zero_stage=2", "--set", "parallel.expert_parallel=2"],
    "zero2_offload_ac": DS + ["--set", "parallel.preset=deepspeed_zero2_offload",
                              "--set", "parallel.activation_checkpoint=true"],
}
DENSE = ["--set", "model.moe_every=0", "--set", "model.experts=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    raw = tiny_raw(run={"steps": 6, "log_every": 1, "eval_every": 3, "save_every": 2, "keep_checkpoints": 0},
                   model={"vocab_size": 300, "dropless": True}, data=_text_data(root),
                   parallel={"micro_batch": 2}, loss={"lm": 1.0, "z_loss": 0.001})
    (root / "r.toml").write_text(tomli_w.dumps(raw))
    todo = {"single": ["--set", "parallel.micro_batch=4"], "single_dense": ["--set", "parallel.micro_batch=4", *DENSE],
            "zero3_dense": DS + ["--set", "parallel.zero_stage=3", *DENSE], **LAYOUTS}
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


def test_bf16_trains(runs, tmp_path):
    p = _rapid(str(runs / "r.toml"), "--out", str(tmp_path / "r"), *LAYOUTS["zero2"], "--set", "parallel.precision=bf16")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _metrics(tmp_path / "r")
    assert all(r["loss"] == r["loss"] for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert _close(rows[-1]["val_loss"], _metrics(runs / "single")[-1]["val_loss"], 1e-2)   # bf16 rounding


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


@pytest.mark.parametrize("text,match", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, not list"),
    ('{"zero_optimization": {"stage": 1}}', r"contradicts the switches: zero_optimization.stage = 1 \(the switches say 2\)"),
    ('{"train_micro_batch_size_per_gpu": 8, "fp16": {"enabled": true}}',
     r"train_micro_batch_size_per_gpu = 8 \(the switches say 2\); fp16.enabled = True"),
    ('{"optimizer": {"type": "Adam"}}', "has a 'optimizer' block; rapid's \\[optim\\] table sets"),
])
def test_bad_json(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        merged_config(_config(tmp_path, text, zero_stage=2, micro_batch=2), clip=1.0, world=2)


def test_missing_json():
    with pytest.raises(UserError, match="cannot be read"):
        merged_config(DeepSpeed.Config(config="/no/such/ds.json"), clip=1.0, world=1)
