"""The CUDA backend's sources compile here, without a GPU: nvcc compiles the kernels to an object file
(syntax and template errors, all three dtypes instantiated) and the host compiler checks the torch
binding against this torch's headers. Skipped where nvcc is absent. On a GPU machine the cuda-marked
test runs the whole kernel contract on the compiled extension."""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from rapid.builtin.kernels import cuda_kernels

NVCC = shutil.which("nvcc")


def _cuda_include() -> Path:
    """The toolkit's include directory (nvcc may be a wrapper script outside the toolkit)."""
    out = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", "/dev/null"], capture_output=True, text=True).stderr
    for line in out.splitlines():
        if "INCLUDES=" in line:
            return Path(line.split('"-I')[1].split('"')[0].rstrip("/"))
    return Path("/usr/local/cuda/include")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_kernels_compile_with_nvcc(tmp_path):
    out = tmp_path / "moe_kernels.o"
    p = subprocess.run([NVCC, "-c", "-std=c++17", "-O2", "-Werror", "all-warnings", f"-I{cuda_kernels.CSRC}",
                        str(cuda_kernels.CSRC / "moe_kernels.cu"), "-o", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    symbols = subprocess.run(["nm", "-C", str(out)], capture_output=True, text=True).stdout
    for name in ("rapid_moe::gather_rows<__nv_bfloat16>", "rapid_moe::combine_rows<float>",
                 "rapid_moe::scale_rows_dot<__half>", "rapid_moe::softmax_topk", "rapid_moe::block_scatter"):
        assert name in symbols, name


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (its headers come with it)")
def test_binding_compiles_against_this_torch():
    from torch.utils.cpp_extension import include_paths
    cuda_include = _cuda_include()
    cmd = [shutil.which("c++") or "g++", "-fsyntax-only", "-std=c++20", *(f"-I{p}" for p in include_paths()),
           f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}", f"-I{cuda_kernels.CSRC}",
           "-DTORCH_EXTENSION_NAME=rapid_moe_cuda", str(cuda_kernels.CSRC / "moe_binding.cpp")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]


def test_on_this_machine_the_cuda_backend_says_why_it_is_not_used():
    why = cuda_kernels.unavailable("route", torch.device("cpu"), torch.float32)
    assert why == "CUDA kernels run on CUDA devices only (this is cpu)"
    if torch.version.cuda is None:
        assert "without CUDA" in cuda_kernels.unavailable("route", torch.device("cuda"), torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backend_matches_the_reference_on_gpu():
    from rapid.builtin.kernels import contract
    from rapid.plugins import Registry
    reg = Registry()
    for dtype in (torch.float32, torch.bfloat16):
        for backend in ("cuda", "triton", "reference"):
            findings = contract.check_backend(reg, backend, torch.device("cuda"), dtype)
            assert not findings, "\n".join(map(str, findings))


def test_a_failed_build_is_not_retried(monkeypatch):
    import torch.utils.cpp_extension as ext
    calls = []

    def failing_load(*a, **kw):
        calls.append(1)
        raise RuntimeError("nvcc fatal: unsupported gpu architecture")
    monkeypatch.setattr(ext, "load", failing_load)
    monkeypatch.setattr(cuda_kernels, "_ext", None)
    monkeypatch.setattr(cuda_kernels, "_build_error", None)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="unsupported gpu architecture"):
            cuda_kernels.extension()
    assert len(calls) == 1


def test_the_build_cache_is_kept_apart_per_gpu_architecture(monkeypatch, tmp_path):
    """A module compiled for one GPU has no code for another: each architecture set gets its own
    build directory under $RAPID_CACHE."""
    import torch.utils.cpp_extension as ext
    dirs = []

    def recording_load(name, sources, build_directory, **kw):
        dirs.append(Path(build_directory))
        return object()
    monkeypatch.setattr(ext, "load", recording_load)
    monkeypatch.setenv("RAPID_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for capability in ((9, 0), (8, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0, c=capability: c)
        monkeypatch.setattr(cuda_kernels, "_ext", None)
        monkeypatch.setattr(cuda_kernels, "_build_error", None)
        cuda_kernels.extension()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")        # cpp_extension: the visible GPUs (8.0 here)
    monkeypatch.setattr(cuda_kernels, "_ext", None)
    cuda_kernels.extension()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    monkeypatch.setattr(cuda_kernels, "_ext", None)
    cuda_kernels.extension()
    assert [d.name.rsplit("-", 1)[1] for d in dirs] == ["sm9.0", "sm8.0", "sm8.0", "sm8.0_9.0+PTX"]
    assert all(d.parent == tmp_path / "torch_extensions" and d.is_dir() for d in dirs)
