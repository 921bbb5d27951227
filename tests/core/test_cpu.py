"""rapid.cpu: glibc keeps freed memory mapped (no page faults for the next step's tensors), the
training loop's trim returns it only when free chunks outgrow the memory in use, and the ``rapid``
command starts glibc with the tcache off, without which a freed tensor's memory is often not reused
for the next tensor of the same size (the heap grows instead). Allocation behaviour is checked in
fresh interpreters: the settings are process-wide."""

import os
import platform
import subprocess
import sys

import pytest

from rapid import cpu

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

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
again = [faults(touch) for _ in range(4)]
print(first, again)
assert max(again) < 0.05 * first, again                        # freed pages stay mapped: reused
assert release_freed_memory()                                  # 64 MiB free > 0.5 x in use: trimmed
assert faults(touch) > 0.5 * first                             # ... so the next one faults again
held = [torch.ones(200 << 20, dtype=torch.uint8)]              # in use now outweighs what is free
assert not release_freed_memory()
"""


@glibc
@pytest.mark.parametrize("attempt", range(3))
def test_freed_memory_is_reused_with_the_tunables_and_trimmed_only_when_free_outgrows_use(attempt):
    env = {**os.environ, "GLIBC_TUNABLES": cpu.TUNABLES}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_reexec_environment_adds_the_tunables_once():
    if platform.libc_ver()[0] != "glibc":
        assert cpu.reexec_environment({}) is None
        return
    assert cpu.reexec_environment({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": cpu.TUNABLES}
    assert cpu.reexec_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})["GLIBC_TUNABLES"] == \
        f"glibc.malloc.hugetlb=1:{cpu.TUNABLES}"
    assert cpu.reexec_environment({"GLIBC_TUNABLES": cpu.TUNABLES}) is None            # already started tuned
    assert cpu.reexec_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3"}) is None   # the user's choice
    assert cpu.reexec_environment({"RAPID_GLIBC_TUNABLES": "0"}) is None


@glibc
def test_the_command_reexecutes_itself_tuned_and_a_call_from_python_does_not(monkeypatch):
    from rapid import cli
    calls = []

    def execve(path, args, env):
        calls.append((path, args, env))
        raise SystemExit(0)
    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("RAPID_GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(sys, "argv", ["rapid", "run", "r.toml", "--set", "run.steps=3"])
    with pytest.raises(SystemExit):
        cli.main()
    (path, args, env), = calls
    assert path == sys.executable and args == [sys.executable, "-m", "rapid.cli", "run", "r.toml", "--set", "run.steps=3"]
    assert env["GLIBC_TUNABLES"] == cpu.TUNABLES
    with pytest.raises(SystemExit):
        cli.main(["plugins", "--json"])          # in-process: runs here, never replaces the caller
    assert len(calls) == 1
