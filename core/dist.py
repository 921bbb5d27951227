"""Processes: who am I (rank, world), the process group, and ``rapid run --nproc N``.

A worker learns its place from the environment its launcher set: torchrun and the DeepSpeed launcher
set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; srun sets SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID (MASTER_ADDR and MASTER_PORT are exported by the batch script). ``--nproc N`` starts N
local workers through torch's elastic launcher. The backend is NCCL on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rapid.errors import UserError


_GROUPS = itertools.count()


@dataclass(frozen=True)
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1


def env() -> Env:
    """This process's place, from the launcher's environment variables (1 process without any)."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        world = int(e["WORLD_SIZE"])
        return Env(int(e["RANK"]), world, int(e.get("LOCAL_RANK", 0)), int(e.get("LOCAL_WORLD_SIZE", world)))
    if "SLURM_PROCID" in e and int(e.get("SLURM_NTASKS", 1)) > 1:
        nodes = int(e.get("SLURM_NNODES", 1))
        world = int(e["SLURM_NTASKS"])
        return Env(int(e["SLURM_PROCID"]), world, int(e.get("SLURM_LOCALID", 0)), world // nodes)
    return Env()


def init(device_type: str) -> Env:
    """Join the process group when there is more than one process (idempotent)."""
    me = env()
    if me.world > 1 and not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise UserError(f"{me.world} processes but {key} is not set",
                                hint="export MASTER_ADDR and MASTER_PORT (torchrun and rapid --nproc set them)")
        os.environ.setdefault("RANK", str(me.rank))
        os.environ.setdefault("WORLD_SIZE", str(me.world))
        if device_type == "cuda":
            torch.cuda.set_device(me.local_rank)
        store, rank, world = next(dist.rendezvous("env://"))
        # a fresh key space per group: a second run in this process would read the first one's addresses
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world,
                                store=dist.PrefixStore(f"rapid/{next(_GROUPS)}", store))
        if device_type == "cpu":   # share the cores, as torchrun's OMP_NUM_THREADS=1 would too coarsely
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // me.local_world))
    return me


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def launch(argv: list[str], nproc: int, allow_oversubscribe: bool = False) -> int:
    """Run ``rapid`` with ``argv`` in ``nproc`` local workers (torch.distributed.launcher, the API
    behind torchrun). A worker's failure stops the others; returns the exit code to use."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cpus = os.cpu_count() or 1
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc} but this machine has {torch.cuda.device_count()} CUDA devices")
    if not torch.cuda.is_available() and nproc > cpus and not allow_oversubscribe:
        raise UserError(f"--nproc {nproc} is more than this machine's {cpus} CPU cores",
                        hint="--allow-oversubscribe runs them anyway (slowly)")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"rapid-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "rapid.cli", *argv)
    except ChildFailedError as exc:
        def message(failure) -> str:
            text = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
            return "" if text.startswith("To enable traceback") else (text.splitlines() or [""])[0]

        # the cause, not a rank that only lost its peer: the earliest failure that is not a lost connection
        failures = sorted(exc.failures.items(), key=lambda kv: kv[1].timestamp)
        rank, failure = next(((r, f) for r, f in failures if not any(
            s in message(f) for s in ("Connection closed by peer", "remote worker"))), failures[0])
        code = failure.exitcode
        if code != 2:  # 2: a UserError, already printed by the worker as one line
            message = message(failure)
            print(f"error: worker {rank} failed (exit code {code}){': ' + message if message else ''}; "
                  "its output is above", file=sys.stderr)
        return code if code and code > 0 else 1
    return 0
