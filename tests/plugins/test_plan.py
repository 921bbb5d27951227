"""rapid.builtin.plan: the runtime probe's cache key names the installed code the same way in every
process (it was built from a set of paths, whose order follows Python's per-process string hashing,
so half of all processes missed the cache and measured the probe again)."""

import subprocess
import sys


def test_the_code_version_is_the_same_in_every_process():
    code = "from rapid.builtin.plan import _code_version; print(_code_version())"
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin:/bin"}).stdout.strip()
            for seed in range(1, 7)}
    assert len(seen) == 1 and len(next(iter(seen))) == 16, seen
