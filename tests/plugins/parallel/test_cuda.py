"""What the backends can only do on CUDA, run where CUDA is (``-m cuda``; skipped elsewhere): NCCL
DDP and expert parallelism, DeepSpeed fp16 with dynamic loss scaling (and its resume), fairscale's
FullyShardedDataParallel, megatron tensor parallelism in bf16 on GPUs. Each is a real `rapid run` of
the tiny model: it must train (finite, falling loss) and resume its own checkpoint bit for bit."""

import shutil

import pytest
import torch
import tomli_w

from tests.conftest import tiny_raw
from tests.e2e.test_train import _text_data
from tests.plugins.parallel.test_distributed import _metrics, _rapid

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA device")]

TWO = ["--nproc", "2"]
LAYOUTS = {
    "torch_nccl_ep2": (2, TWO + ["--set", "parallel.name=torch", "--set", "parallel.expert_parallel=2",
                                 "--set", "parallel.precision=bf16"]),
    "deepspeed_fp16_zero2": (2, TWO + ["--set", "parallel.name=deepspeed", "--set", "parallel.zero_stage=2",
                                       "--set", "parallel.precision=fp16"]),
    "deepspeed_fp16_zero0_1gpu": (1, ["--set", "parallel.name=deepspeed", "--set", "parallel.precision=fp16"]),
    "fairscale_fsdp": (2, TWO + ["--set", "parallel.name=fairscale", "--set", "parallel.zero_stage=3"]),
    "megatron_tp2_bf16": (2, TWO + ["--set", "parallel.name=megatron", "--set", "parallel.tensor_parallel=2",
                                    "--set", "parallel.precision=bf16"]),
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    raw = tiny_raw(run={"steps": 8, "log_every": 1, "eval_every": 4, "save_every": 4, "keep_checkpoints": 0,
                        "device": "cuda"},
                   model={"vocab_size": 300, "dropless": True}, data=_text_data(root), parallel={"micro_batch": 4})
    (root / "r.toml").write_text(tomli_w.dumps(raw))
    return root / "r.toml"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trains_and_resumes_on_cuda(recipe, tmp_path, layout):
    gpus, args = LAYOUTS[layout]
    if GPUS < gpus:
        pytest.skip(f"needs {gpus} GPUs (one per process for NCCL), this machine has {GPUS}")
    full = tmp_path / "full"
    p = _rapid(str(recipe), "--out", str(full), *args)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [r for r in _metrics(full) if "loss" in r]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e4 for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    p = _rapid(str(recipe), "--out", str(resumed), "--resume", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory_bytes")} for r in rs]  # noqa: E731
    assert strip(_metrics(resumed)) == strip(_metrics(full))


def test_cuda_only_features_are_not_refused_on_cuda(recipe, tmp_path):
    """fairscale FSDP and DeepSpeed fp16 pass the capability checks that refuse them on the CPU."""
    from rapid.plugins import Registry
    from rapid.recipe import load_recipe
    reg = Registry()
    for sets in (["parallel.name=fairscale", "parallel.zero_stage=3"], ["parallel.name=deepspeed",
                                                                           "parallel.precision=fp16"]):
        r = load_recipe(recipe, sets, reg)
        reg.strategy(r.names["parallel"], r.parallel, 2).check(r)
