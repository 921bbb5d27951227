"""``megatron`` (tensor parallelism through megatron-core) for real: gloo on loopback, tiny model
(2 layers: a dense MLP and an MoE layer, 4 heads), fp32, the same global batch. With TP=2 on 2
processes the data-parallel size is 1, so the reference is one process with the same micro_batch;
with TP=2 x EP=2 on 4 processes it is one process with twice the micro_batch. The load-balance term
is left out of the recipe (a per-micro-batch statistic, see test_distributed).

- TP=2 (dropless, and with random token drops: the ranks of a tensor-parallel group share one random
  stream) and TP=2 x EP=2 on 4 processes match one process within 1e-5 relative in losses,
  validation loss and gradient norm (the issue asks 1e-4; measured: 1.4e-7 at most);
- the checkpoint holds the split weights (and their Adam moments) under their original names at
  their full shape (column-parallel split on dim 0, row-parallel on dim 1); a one-process checkpoint
  resumes under TP=2, a TP=2 one (and a TP=2 x EP=2 one) in one process and under torch DDP, each
  continuing the source's curve (1e-5);
- bf16 with activation checkpointing trains; an fp16 overflow in one rank's shard of a split weight
  skips the step on both ranks;
- the 2-process runs are one launch: one process group, six calls of the training loop, each
  starting megatron's parallel state afresh;
- refusals before launch: tensor_parallel not dividing heads or the world, sequence parallelism and
  the CUDA RNG tracker on CPU, expert parallelism the data-parallel size cannot hold.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import tomli_w
import torch

from rapid.builtin.plan import meta_counts
from rapid.checkpoint import _Unpickler
from rapid.errors import UserError
from rapid.recipe import build_model, load_recipe
from rapid.train import preflight, train
from tests.conftest import REPO, tiny_raw
from tests.e2e.test_train import _text_data

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.skipif(os.name != "posix", reason="gloo on loopback")

M = "megatron"
TP2 = ["--set", f"parallel.name={M}", "--set", "parallel.tensor_parallel=2"]
DROPS = "model.dropless=false"   # capacity 1.25: random drops, 6-9% of the tokens

# Every 2-process run, in one launch and one process group. The fp16_inf job puts an inf into
# rank 1's shard of a split weight's gradient at step 2 and prints what each rank did with the step.
WORKER = textwrap.dedent("""
    import shutil
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from rapid.builtin.parallel import megatron
    from rapid.recipe import load_recipe
    from rapid.train import train

    real_step, calls = megatron.MegatronEngine.step, [0]

    def probed_step(self):
        calls[0] += 1
        if calls[0] == 2 and dist.get_rank() == 1:
            next(p for p in self.names if getattr(p, "tensor_model_parallel", False)).grad.view(-1)[0] = float("inf")
        before = [p.detach().clone() for p in self.inner.parameters()]
        stats = real_step(self)
        moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, self.inner.parameters()))
        print(f"[probe] step {calls[0]} rank {dist.get_rank()} scale {self.scaler.get_scale()} moved {moved} "
              f"skipped {stats['skipped']}", flush=True)
        return stats

    recipe, root = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")          # train() leaves a group it did not create alone
    for job in sys.argv[3:]:                 # out[<run resumed at its step 4],table.key=value,...
        target, *sets = job.split(",")
        out, _, source = target.partition("<")
        if source and dist.get_rank() == 0:
            shutil.copytree(root / source, root / out)
            shutil.rmtree(root / out / "checkpoints" / "step_00000006")
        dist.barrier()
        megatron.MegatronEngine.step = probed_step if out == "fp16_inf" else real_step
        r = load_recipe(recipe, ["parallel.name=megatron",
                                 "parallel.tensor_parallel=2", *sets])
        train(r, root / out, resume=bool(source), progress=False)
    dist.destroy_process_group()
""")


def _rapid(*args):
    return subprocess.run([sys.executable, "-m", "rapid.cli", "run", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """6 steps each (checkpoints at 2, 4, 6; validation at 3 and 6). Here, in-process: one process
    with micro_batch 2 (also with random token drops) and 4. One launch of 2 processes: TP=2; TP=2
    resumed from the one-process run; torch DDP resumed from the TP=2 run; TP=2 with random token
    drops; bf16; fp16 with an overflow. And TP=2 x EP=2 on 4 processes."""
    root = tmp_path_factory.mktemp("megatron")
    raw = tiny_raw(run={"steps": 6, "log_every": 1, "eval_every": 3, "save_every": 2, "keep_checkpoints": 0},
                   model={"vocab_size": 300, "dropless": True, "layers": 2, "heads": 4, "moe_every": 2, "experts": 4},
                   data=_text_data(root), parallel={"micro_batch": 2}, loss={"lm": 1.0, "z_loss": 0.001})
    recipe = root / "r.toml"
    recipe.write_text(tomli_w.dumps(raw))
    for name, sets in (("single", []), ("single4", ["parallel.micro_batch=4"]), ("single_drops", [DROPS])):
        train(load_recipe(recipe, sets), root / name, progress=False)
    (root / "worker.py").write_text(WORKER)
    jobs = ["tp2", "from_single<single",
            "to_torch<tp2,parallel.name=torch,parallel.tensor_parallel=1,parallel.micro_batch=1",
            f"drops,{DROPS}", "bf16,parallel.precision=bf16,parallel.activation_checkpoint=true",
            "fp16_inf,parallel.precision=fp16,run.steps=3"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(root / "worker.py"), str(recipe), str(root), *jobs],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (root / "probe.txt").write_text(p.stdout + p.stderr)
    p = _rapid(recipe, "--out", root / "tp2_ep2", "--nproc", "4", "--allow-oversubscribe", *TP2,
               "--set", "parallel.expert_parallel=2")
    assert p.returncode == 0, p.stderr[-3000:]
    return root


def _close(a, b, rel=1e-5):
    return abs(a - b) <= rel * abs(b)


@pytest.mark.parametrize("layout,reference", [("tp2", "single"), ("drops", "single_drops"), ("tp2_ep2", "single4")])
def test_tensor_parallel_matches_one_process(runs, layout, reference):
    one, other = _metrics(runs / reference), _metrics(runs / layout)
    assert [r["step"] for r in other] == [r["step"] for r in one] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(other, one):
        for key in ("lm_loss", "grad_norm", "val_loss"):   # the global norm: shards summed, replicas once
            if key in b:
                assert _close(a[key], b[key]), (layout, a["step"], key, a[key], b[key])
    vals = [r["val_loss"] for r in one if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0] - 0.05              # it trained


def test_checkpoint_holds_full_weights_under_their_names(runs):
    with open(runs / "tp2" / "checkpoints" / "step_00000006" / ".metadata", "rb") as fh:
        entries = _Unpickler(fh).load().state_dict_metadata
    chunks = lambda key: sorted(tuple(c.offsets) for c in entries[key].chunks)  # noqa: E731
    # hidden 32, ffn 128: column-parallel qkv / fc split on dim 0, row-parallel proj on dim 1
    for name, shape, offsets in (("blocks.0.attn.qkv.weight", (96, 32), [(0, 0), (48, 0)]),
                                 ("blocks.1.attn.proj.weight", (32, 32), [(0, 0), (0, 16)]),
                                 ("blocks.0.mlp.fc.weight", (128, 32), [(0, 0), (64, 0)]),
                                 ("blocks.0.mlp.proj.weight", (32, 128), [(0, 0), (0, 64)])):
        for key in (f"model.{name}", f"optim.{name}.exp_avg", f"optim.{name}.exp_avg_sq"):
            assert tuple(entries[key].size) == shape and chunks(key) == offsets, key
    assert chunks("model.blocks.0.ln1.weight") == [(0,)]                    # replicated: saved once
    assert tuple(entries["model.blocks.1.moe.experts.w1_EDF"].size) == (4, 32, 128)


def _continues(resumed, source):
    """Steps 5 and 6 of a run resumed from step 4 follow the source run's."""
    src, new = _metrics(source), _metrics(resumed)
    assert [r["step"] for r in new] == [r["step"] for r in src]
    for a, b in zip(new[4:], src[4:]):
        assert _close(a["loss"], b["loss"]) and _close(a["grad_norm"], b["grad_norm"]), (a, b)
    assert _close(new[-1]["val_loss"], src[-1]["val_loss"])


def test_one_process_checkpoint_resumes_under_tensor_parallel(runs):
    _continues(runs / "from_single", runs / "single")


def test_tensor_parallel_checkpoint_resumes_under_torch_ddp(runs):
    _continues(runs / "to_torch", runs / "tp2")


@pytest.mark.parametrize("layout,sets", [("tp2", []), ("tp2_ep2", ["parallel.micro_batch=4"])])
def test_tensor_parallel_checkpoint_resumes_in_one_process(runs, tmp_path, layout, sets):
    shutil.copytree(runs / layout, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000006")
    train(load_recipe(runs / "r.toml", sets), tmp_path / "run", resume=True, progress=False)
    _continues(tmp_path / "run", runs / layout)


def test_bf16_with_activation_checkpointing_trains(runs):
    rows, fp32 = _metrics(runs / "bf16"), _metrics(runs / "tp2")
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["skipped_steps"] == 0
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert _close(rows[-1]["val_loss"], fp32[-1]["val_loss"], 1e-2)


def test_fp16_overflow_in_one_shard_skips_the_step_on_both_ranks(runs):
    probes = re.findall(r"\[probe\] step (\d) rank (\d) scale (\S+) moved (\d+) skipped (\w+)",
                        (runs / "probe.txt").read_text())
    step2 = sorted(p[1:] for p in probes if p[0] == "2")
    assert step2 == [("0", "32768.0", "0", "True"), ("1", "32768.0", "0", "True")], probes   # halved, nothing moved
    assert [r["skipped_steps"] for r in _metrics(runs / "fp16_inf")] == [0, 1, 1]


@pytest.fixture
def recipe_file(tmp_path):
    raw = tiny_raw(model={"layers": 2, "heads": 4, "moe_every": 2, "experts": 4}, data=_text_data(tmp_path))
    (tmp_path / "r.toml").write_text(tomli_w.dumps(raw))
    return tmp_path / "r.toml"


@pytest.mark.parametrize("world,sets,message", [
    (2, ["model.heads=3", "model.hidden=48"], "tensor_parallel=2 must divide [model] heads=3 and hidden=48"),
    (3, [], "tensor_parallel=2 does not divide the world size 3"),
    (2, ["parallel.sequence_parallel=true"], "sequence_parallel = true is not supported: megatron-core allocates"),
    (2, ["parallel.rng_tracker=true"], "rng_tracker = true is not supported: megatron-core allocates"),
    (2, ["parallel.expert_parallel=2"], "expert_parallel=2 must divide the data-parallel size world / "
                                        "tensor_parallel = 2 / 2 = 1"),
    (4, ["parallel.expert_parallel=2", "model.experts=3"], "does not divide the expert count of every MoE layer"),
])
def test_refused_before_launch(recipe_file, registry, world, sets, message):
    recipe = load_recipe(recipe_file, [f"parallel.name={M}", "parallel.tensor_parallel=2", *sets], registry)
    with pytest.raises(UserError) as exc:
        preflight(recipe, registry, world)
    assert message in str(exc.value), str(exc.value)


def test_a_refusal_is_one_line_with_exit_code_2(recipe_file):
    p = _rapid(recipe_file, "--nproc", "2", *TP2, "--set", "parallel.sequence_parallel=true")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "error: megatron: [parallel] sequence_parallel = true is not supported" in p.stderr


def test_memory_plan_divides_what_tensor_parallelism_splits(recipe_file, registry):
    recipe = load_recipe(recipe_file, [f"parallel.name={M}"], registry)
    counts = meta_counts(recipe, registry)
    with torch.device("meta"):
        model = build_model(recipe, registry)
    split = sum(p.numel() for n, p in model.named_parameters() if re.search(r"(attn\.(qkv|proj)|mlp\.(fc|proj))\.", n))
    plans = {}
    for tp in (1, 2):
        strategy = registry.strategy(M, type(recipe.parallel)(tensor_parallel=tp), 2)
        strategy.check(recipe)
        plans[tp] = strategy.memory_plan(counts)
    assert split > 0 and plans[1]["params"] == 4 * counts["params_total"]
    assert {k: plans[1][k] - plans[2][k] for k in plans[1]} == {"params": 2 * split, "grads": 2 * split,
                                                                "optimizer": 4 * split}
