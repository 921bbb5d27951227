"""``local`` (Megatron-style local DDP through megatron-core's DistributedDataParallel) for real.

In-process, on a 1-process gloo group: the gradients live in one contiguous buffer that every
parameter's ``main_grad`` (and, during the step, ``.grad``) views, nothing is communicated in backward,
exactly one all-reduce (of that buffer) happens per optimizer step, and the buffer is zeroed in place.

2 processes, gloo on loopback (every run in one launch of torch's elastic launcher, in one process
group; the resume through `rapid run --nproc 2`): tiny model, fp32, dropless, the same
global batch (the load-balance loss left out: it is a per-micro-batch statistic, see test_distributed):
- losses and validation loss match one process (micro_batch 4) within 1e-5 relative with micro_batch
  2, with grad_accum 2 x micro_batch 1 (and activation checkpointing), with expert_parallel=2, and with
  expert_parallel=2 on 4 processes (micro_batch 1: each expert's gradient reduced over its 2 replicas);
- bf16 and fp16 train (finite, falling, near the fp32 run but not equal to it);
- a resumed run equals the uninterrupted one exactly; checkpoints move between local, torch and one
  process in both directions and continue the source's curve (1e-5).
"""

import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import tomli_w
import torch
import torch.distributed as dist
from torch import nn

from rapid.errors import UserError
from rapid.types import ParallelConfig
from tests.conftest import REPO, tiny_raw
from tests.e2e.test_train import _text_data

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.skipif(os.name != "posix", reason="gloo on loopback")

STRATEGY = {"local": "local"}
LOCAL = [f"parallel.name={STRATEGY['local']}"]
LAYOUTS = {   # 2 processes, micro_batch 2 unless set
    "local": LOCAL,
    "local_accum": [*LOCAL, "parallel.micro_batch=1", "parallel.grad_accum=2", "parallel.activation_checkpoint=true"],
    "local_ep2": [*LOCAL, "parallel.expert_parallel=2"],
    "local_bf16": [*LOCAL, "parallel.precision=bf16"],
    "local_fp16": [*LOCAL, "parallel.precision=fp16"],
    "torch": ["parallel.name=torch"],
}
RESUMES = {("local", "torch"), ("torch", "local"), ("single", "local")}   # and ("local", "single") in process

# Every 2-process job in one launch (one process group, one startup): a job is (out, source, sets); a
# source is first copied and its step-6 checkpoint dropped, so the job resumes at step 4.
WORKER = """
import json, os, shutil, sys
from pathlib import Path
import torch, torch.distributed as dist
from rapid.recipe import load_recipe
from rapid.train import train

dist.init_process_group("gloo")   # train() keeps a group it did not create
torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))   # as rapid.dist.init
recipe, root = sys.argv[1], Path(sys.argv[2])
for out, source, sets in json.loads(sys.argv[3]):
    if source and dist.get_rank() == 0:
        shutil.copytree(root / source, root / out)
        shutil.rmtree(root / out / "checkpoints" / "step_00000006")
    dist.barrier()
    train(load_recipe(recipe, sets), root / out, resume=bool(source), progress=False)
dist.destroy_process_group()
"""


def _rapid(*args):
    return subprocess.run([sys.executable, "-m", "rapid.cli", "run", *args, "--no-progress"], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _close(a, b, rel):
    return abs(a - b) <= rel * abs(b)


def _resume_from_step_4(source, out):
    shutil.copytree(source, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every layout trained for 6 steps (checkpoints at 2, 4, 6; validation at 3 and 6), then the
    resumes across backends from step 4."""
    from rapid.recipe import load_recipe
    from rapid.train import train
    root = tmp_path_factory.mktemp("local")
    raw = tiny_raw(run={"steps": 6, "log_every": 1, "eval_every": 3, "save_every": 2, "keep_checkpoints": 0},
                   model={"vocab_size": 300, "dropless": True}, data=_text_data(root),
                   parallel={"micro_batch": 2}, loss={"lm": 1.0, "z_loss": 0.001})
    recipe = root / "r.toml"
    recipe.write_text(tomli_w.dumps(raw))
    train(load_recipe(recipe, ["parallel.micro_batch=4"]), root / "single", progress=False)
    jobs = [(name, None, sets) for name, sets in LAYOUTS.items()]
    jobs += [(f"{s}_to_{t}", s, LAYOUTS[t]) for s, t in sorted(RESUMES)]
    (root / "worker.py").write_text(WORKER)
    for nproc, batch in ((2, jobs), (4, [("local_ep2_x4", None, [*LAYOUTS["local_ep2"], "parallel.micro_batch=1"])])):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(nproc), str(root / "worker.py"), str(recipe), str(root), json.dumps(batch)],
                           capture_output=True, text=True, cwd=REPO, timeout=600)
        assert p.returncode == 0, p.stderr[-4000:]
    _resume_from_step_4(root / "local", root / "local_to_single")
    train(load_recipe(recipe, ["parallel.micro_batch=4"]), root / "local_to_single", resume=True, progress=False)
    return root


# ---------------------------------------------------------------- in process: the buffer and its one all-reduce
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 5), nn.Linear(5, 3)])

    def forward(self, x):
        return self.blocks[1](torch.tanh(self.blocks[0](x)))


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _make_optimizer(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)


def test_one_flat_buffer_reduced_once_per_step(one_rank_group):
    from rapid.builtin.parallel.local import LocalDDP
    torch.manual_seed(0)
    model, reference = Toy(), Toy()
    reference.load_state_dict(model.state_dict())
    engine = LocalDDP(ParallelConfig(grad_accum=2), world_size=1).wrap(model, _make_optimizer, clip=0.0)
    (buffer,) = engine.ddp.buffers                       # one buffer, one bucket: one all-reduce
    flat = buffer.grad_data
    params = list(model.parameters())
    assert flat.dim() == 1 and flat.is_contiguous() and flat.numel() == sum(p.numel() for p in params)
    assert all(p.main_grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in params)
    spans = sorted(((p.main_grad.data_ptr() - flat.data_ptr()) // flat.element_size(), p.numel()) for p in params)
    assert [start for start, _ in spans] == [sum(n for _, n in spans[:i]) for i in range(len(spans))]   # tiled

    real, reduced = dist.all_reduce, []
    seen_by_optimizer = {}
    engine.optimizer.register_step_pre_hook(   # what the optimizer gets: views into the buffer
        lambda *_: seen_by_optimizer.update({p: (p.grad.untyped_storage().data_ptr(), p.grad.clone()) for p in params}))
    with mock.patch("torch.distributed.all_reduce", lambda t, *a, **k: (reduced.append(t), real(t, *a, **k))[1]):
        for step_no in range(2):
            for _ in range(2):
                x = torch.randn(4, 6)
                engine.backward(engine.model(x).square().mean() / 2)
                reference(x).square().mean().div(2).backward()
            assert len(reduced) == step_no and all(p.grad is None for p in params)   # nothing sent in backward
            engine.step()
            assert len(reduced) == step_no + 1                                       # once, the whole buffer
            assert (reduced[-1].data_ptr(), reduced[-1].numel()) == (flat.data_ptr(), flat.numel())
            for p, q in zip(params, reference.parameters()):
                ptr, grad = seen_by_optimizer[p]
                assert ptr == flat.untyped_storage().data_ptr()
                torch.testing.assert_close(grad, q.grad)
                with torch.no_grad():
                    q.sub_(0.1 * q.grad)
                q.grad = None
            # zeroed in place: grads dropped, the views intact, the next step accumulates from zero
            assert all(p.grad is None for p in params) and not flat.any()
            assert all(p.main_grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in params)
    for p, q in zip(params, reference.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("switch,what", [({"zero_stage": 1}, "zero_stage=1"), ({"offload": True}, "offload"),
                                         ({"tensor_parallel": 2}, "tensor_parallel=2")])
def test_refused_before_launch(switch, what):
    from rapid.builtin.parallel.local import LocalDDP
    with pytest.raises(UserError, match=f"does not support {what}"):
        LocalDDP(ParallelConfig(**switch), world_size=2).check(SimpleNamespace(model=SimpleNamespace()))


def test_missing_library_names_the_extra():
    from rapid.builtin.parallel.local import LocalDDP
    with mock.patch.dict(sys.modules, {"megatron": None, "megatron.core": None}), \
            pytest.raises(UserError, match="needs megatron.core, which is not installed") as e:
        LocalDDP(ParallelConfig(), world_size=2).check(SimpleNamespace(model=SimpleNamespace()))
    assert "pip install 'rapidmoe[megatron]'" in e.value.hint


# ---------------------------------------------------------------- 2 processes
@pytest.mark.parametrize("layout", ["local", "local_accum", "local_ep2", "local_ep2_x4"])
def test_layout_matches_one_process(runs, layout):
    one, other = _metrics(runs / "single"), _metrics(runs / layout)
    assert [r["step"] for r in other] == [r["step"] for r in one]
    assert other[0]["lm_loss"] == pytest.approx(one[0]["lm_loss"], rel=1e-6)    # before any update
    for a, b in zip(other, one):
        assert _close(a["lm_loss"], b["lm_loss"], 1e-5), (layout, a["step"], a["lm_loss"], b["lm_loss"])
        assert _close(a["grad_norm"], b["grad_norm"], 1e-4), (layout, a["step"], a["grad_norm"], b["grad_norm"])
        if "val_loss" in b:
            assert _close(a["val_loss"], b["val_loss"], 1e-5), (layout, a["step"], a["val_loss"], b["val_loss"])
    assert one[-1]["lm_loss"] < 0.95 * one[0]["lm_loss"]   # the curve compared moves


@pytest.mark.parametrize("layout", ["local_bf16", "local_fp16"])
def test_mixed_precision_trains(runs, layout):
    rows, fp32 = _metrics(runs / layout), _metrics(runs / "local")
    assert all(math.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in rows)
    assert rows[-1]["lm_loss"] < 0.95 * rows[0]["lm_loss"] and rows[-1]["val_loss"] < rows[2]["val_loss"]
    assert 0 < abs(rows[-1]["val_loss"] - fp32[-1]["val_loss"]) < 0.02 * fp32[-1]["val_loss"]   # autocast did run
    assert ("loss_scale" in rows[-1]) == (layout == "local_fp16")


def test_save_then_resume_equals_uninterrupted(runs, tmp_path):
    """Through the command line: `rapid run --nproc 2 --resume` from step 4 repeats steps 5-6 exactly."""
    out = tmp_path / "run"
    _resume_from_step_4(runs / "local", out)
    p = _rapid(str(runs / "r.toml"), "--out", str(out), "--resume", "--nproc", "2", *(f"--set={s}" for s in LOCAL))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step_00000004" in p.stderr
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory_bytes")} for r in rows]  # noqa: E731
    assert strip(_metrics(out)) == strip(_metrics(runs / "local"))


@pytest.mark.parametrize("source,target", [("local", "torch"), ("local", "single"), ("torch", "local"),
                                           ("single", "local")])
def test_checkpoint_moves_between_backends(runs, source, target):
    """Saved under one backend (or world size), resumed under the other at step 4: steps 5-6 follow
    the source run."""
    src, new = _metrics(runs / source), _metrics(runs / f"{source}_to_{target}")
    assert [r["step"] for r in new] == [r["step"] for r in src]
    for a, b in zip(new[4:], src[4:]):
        assert _close(a["loss"], b["loss"], 1e-5), (a["step"], a["loss"], b["loss"])
    assert _close(new[-1]["val_loss"], src[-1]["val_loss"], 1e-5)
    manifest = runs / f"{source}_to_{target}" / "checkpoints" / "step_00000006" / "manifest.json"
    assert json.loads(manifest.read_text())["layout"]["strategy"] == STRATEGY.get(target, target)   # written by target
