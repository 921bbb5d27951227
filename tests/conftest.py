import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before anything imports triton (deepspeed does): its
    # standard library (tl.sum, tl.cumsum, ...) is defined at import, interpreted or compiled. The
    # triton kernel backend is then tested on the CPU; it still serves nothing unless asked by name.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rapid.plugins import Registry, make_plugin_manager

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """One tokenizer/corpus cache for the whole session, never the user's ~/.cache."""
    os.environ["RAPID_CACHE"] = str(tmp_path_factory.mktemp("rapid-cache"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def registry():
    """Builtins plus whatever is installed through entry points (as users get it)."""
    return Registry(make_plugin_manager())


@pytest.fixture
def builtin_registry():
    return Registry(make_plugin_manager(autoload=False))


def tiny_raw(**tables):
    """A very small recipe as a dict; tables override the defaults key by key."""
    raw = {
        "run": {"name": "t", "steps": 4, "log_every": 1, "eval_every": 0, "eval_batches": 2, "seed": 3},
        "model": {"vocab_size": 300, "seq_len": 16, "hidden": 32, "layers": 2, "heads": 2, "moe_every": 1,
                  "experts": [2, 4], "capacity_factor": 1.25},
        "parallel": {"micro_batch": 4},
        "optim": {"lr": 3e-3, "warmup": 2},
    }
    for table, keys in tables.items():
        raw.setdefault(table, {}).update(keys)
    return raw
