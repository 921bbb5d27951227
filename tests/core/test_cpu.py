"""rapid.cpu: glibc keeps freed memory mapped (no page faults for the next step's tensors), and the
training loop's trim returns it only when free chunks outgrow the memory in use. Run in a fresh
interpreter: the settings are process-wide."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

CODE = r"""
import resource, torch
from rapid.cpu import keep_freed_memory, release_freed_memory

def faults(fn):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

touch = lambda: torch.ones(64 << 20, dtype=torch.uint8)       # 64 MiB, every page written
assert not release_freed_memory()                              # nothing applied yet: never trims
first = faults(touch)
assert faults(touch) > 0.5 * first                             # glibc's default: mmap, unmapped on free
assert keep_freed_memory() and keep_freed_memory()
faults(touch)
again = faults(touch)
print(first, again)
assert again < 0.05 * first                                    # freed pages stay mapped: reused
assert release_freed_memory()                                  # 64 MiB free > 0.5 x in use: trimmed
assert faults(touch) > 0.5 * first                             # ... so the next one faults again
held = [torch.ones(200 << 20, dtype=torch.uint8)]              # in use now outweighs what is free
assert not release_freed_memory()
"""


def test_freed_memory_is_kept_and_trimmed_only_when_free_outgrows_use():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
