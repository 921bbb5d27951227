"""CUDA C++ kernels for the MoE hot path (``[kernels] backend = "cuda"``).

``route`` (fused softmax + top-k and a stable counting sort for the expert order), ``permute`` and
``unpermute`` (gathers, forward and backward) are CUDA C++ in ``csrc/`` (plain CUDA kernels in
``moe_kernels.cu``, the torch binding in ``moe_binding.cpp``), compiled with
``torch.utils.cpp_extension.load`` when the backend is first checked on a machine with nvcc and a
CUDA build of torch (a failed build makes the backend unavailable, with the compiler's message), and
cached in ``$RAPID_CACHE/torch_extensions/<torch version>-cu<CUDA version>-sm<architectures>`` (the
architectures compiled for: ``$TORCH_CUDA_ARCH_LIST``, else the visible GPUs'). ``grouped_mlp`` is
``torch._grouped_mm`` where the GPU runs it (bf16 on compute capability 9.0 and newer); elsewhere
``auto`` takes Triton's grouped GEMM, and an explicit ``cuda`` runs cuBLAS products per expert
(``torch.mm``, one host sync for the counts).

CI has nvcc but no GPU: ``tests/plugins/kernels/test_cuda_sources.py`` compiles the ``.cu`` file with
nvcc to an object file and checks the binding's syntax with the host compiler.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from rapid import hookimpl
from rapid.builtin.kernels import dispatch
from rapid.kernels import compute_dtype

KERNEL_BACKEND = "cuda"
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "moe_binding.cpp", CSRC / "moe_kernels.cu"]
_GELU_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}
_ext = None
_build_error: str | None = None    # a failed build is remembered: never compiled again in this process


def _has_grouped_mm(device, dtype) -> bool:
    return (hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16 and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def unavailable(op, device, dtype) -> str | None:
    if device.type != "cuda":
        return f"CUDA kernels run on CUDA devices only (this is {device.type})"
    if torch.version.cuda is None:
        return f"this torch is a build without CUDA ({torch.__version__})"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found (set CUDA_HOME): the kernels are compiled at first use"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {dtype} (fp32, bf16 and fp16 only)"
    try:
        extension()
    except Exception as exc:      # a compiler or version mismatch: say so at selection, not mid-run
        return f"building the CUDA extension failed: {type(exc).__name__}: {str(exc)[-500:]}"
    return None


@hookimpl(tryfirst=True)
def rapid_kernel(op, device, dtype, backend):
    if backend not in ("auto", KERNEL_BACKEND) or op not in KERNELS or unavailable(op, device, dtype):
        return None
    if op == "grouped_mlp" and backend == "auto" and not _has_grouped_mm(device, dtype):
        return None      # auto: Triton's grouped GEMM beats cuBLAS per expert (and its host sync)
    return KERNELS[op]


def extension():
    """The compiled extension (built once per machine, then loaded from the cache)."""
    global _ext, _build_error
    if _build_error is not None:
        raise RuntimeError(_build_error)
    if _ext is None:
        from torch.utils.cpp_extension import load
        try:
            build = (Path(os.environ.get("RAPID_CACHE", Path.home() / ".cache" / "rapid")) / "torch_extensions"
                     / f"{torch.__version__}-cu{torch.version.cuda}-sm{_architectures()}")   # never another torch's or GPU's
            build.mkdir(parents=True, exist_ok=True)
            _ext = load("rapid_moe_cuda", [str(s) for s in SOURCES], extra_include_paths=[str(CSRC)],
                        extra_cflags=["-O3", "-std=c++20"], extra_cuda_cflags=["-O3", "-std=c++20"],
                        build_directory=str(build), verbose=False)
        except Exception as exc:
            _build_error = f"{type(exc).__name__}: {exc}"
            raise
    return _ext


def _architectures() -> str:
    """What ``cpp_extension`` compiles for: ``$TORCH_CUDA_ARCH_LIST``, else every visible GPU's
    compute capability (a module built for one GPU has no code for another: a cache shared between
    machines must not hand it over)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs in ("", "native"):          # cpp_extension: the visible GPUs
        archs = " ".join(sorted({"{}.{}".format(*torch.cuda.get_device_capability(i))
                                 for i in range(torch.cuda.device_count())}))
    return re.sub(r"[^0-9A-Za-z.+]+", "_", archs) or "none"


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


class CudaRows:
    """The primitives ``rapid.builtin.kernels.dispatch`` builds route/permute/unpermute from."""

    @staticmethod
    def softmax_topk(logits_TE, top_k):
        return tuple(extension().softmax_topk(logits_TE, top_k, _stream(logits_TE)))

    @staticmethod
    def block_histogram(keys, buckets):
        return extension().block_histogram(keys, buckets, _stream(keys))

    @staticmethod
    def block_scatter(keys, base, buckets):
        return extension().block_scatter(keys, base, buckets, _stream(keys))

    @staticmethod
    def gather_rows(src, idx):
        return extension().gather_rows(src, idx.contiguous(), _stream(src))

    @staticmethod
    def combine_rows(src, row_of_slot, w_slots, T, K):
        return extension().combine_rows(src, row_of_slot.contiguous(), w_slots, T, K, _stream(src))

    @staticmethod
    def scale_rows_dot(g, y, token_of_row, w_row):
        return tuple(extension().scale_rows_dot(g, y, token_of_row.contiguous(), w_row.contiguous(), _stream(g)))


# ---------------------------------------------------------------- grouped GEMM: torch._grouped_mm
def _act(h: Tensor, activation: str) -> Tensor:
    return torch.relu(h) if activation == "relu" else F.gelu(h, approximate=_GELU_APPROX[activation])


def grouped_mlp(x_ND: Tensor, counts_E: Tensor, w1_EDF: Tensor, w2_EFD: Tensor, activation: str = "gelu") -> Tensor:
    """Each expert's FFN over its row block with two ``torch._grouped_mm`` calls (offsets = the
    cumulative counts, on the device: no host sync; autograd differentiates them), or, where the GPU
    has no grouped GEMM for the dtype, cuBLAS products per expert (the reference's loop)."""
    if not _has_grouped_mm(x_ND.device, compute_dtype(x_ND)):
        from rapid.builtin.kernels.reference import grouped_mlp as per_expert
        return per_expert(x_ND, counts_E, w1_EDF, w2_EFD, activation)
    x_ND = x_ND.to(compute_dtype(x_ND))
    offs = torch.cumsum(torch.as_tensor(counts_E, device=x_ND.device), 0).to(torch.int32)
    with torch.autocast("cuda", enabled=False):
        h_NF = torch._grouped_mm(x_ND, w1_EDF.to(x_ND.dtype), offs=offs)
        return torch._grouped_mm(_act(h_NF, activation), w2_EFD.to(x_ND.dtype), offs=offs)


KERNELS = {**dispatch.ops(CudaRows), "grouped_mlp": grouped_mlp}
