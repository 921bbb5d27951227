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
    tuned = {"GLIBC_TUNABLES": cpu.TUNABLES, "RAPID_GLIBC_TUNABLES": "1"}
    assert cpu.reexec_environment({"PATH": "/bin"}) == {"PATH": "/bin", **tuned}
    assert cpu.reexec_environment({"GLIBC_TUNABLES": ""}) == tuned
    assert cpu.reexec_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})["GLIBC_TUNABLES"] == \
        f"glibc.malloc.hugetlb=1:{cpu.TUNABLES}"
    assert cpu.reexec_environment({"GLIBC_TUNABLES": cpu.TUNABLES}) is None            # already started tuned
    assert cpu.reexec_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3"}) is None   # the user's choice
    assert cpu.reexec_environment({"RAPID_GLIBC_TUNABLES": "0"}) is None               # opted out
    # re-executed once already: never again, even where glibc dropped the variable (file capabilities)
    assert cpu.reexec_environment({"RAPID_GLIBC_TUNABLES": "1"}) is None


@glibc
def test_a_program_reexecutes_itself_once_with_its_own_command_line(tmp_path):
    """``reexec_tuned`` runs the program again as it was started (here ``python -I -c CODE``: the
    flag and the code survive) with the tunables, once."""
    code = ("import os, sys; from rapid import cpu; print('start', flush=True); cpu.reexec_tuned(); "
            "print(os.environ.get('GLIBC_TUNABLES'), sys.flags.isolated)")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RAPID_GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["start", "start", f"{cpu.TUNABLES} 1"]
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "RAPID_GLIBC_TUNABLES": "0"})
    assert off.stdout.split("\n")[:2] == ["start", "None 0"]


@glibc
def test_the_console_script_keeps_its_import_path_after_reexecuting(tmp_path):
    """Started from a directory holding a module named like a standard one, the re-executed
    ``rapid`` still imports the real one (it is run again as its script, not as ``-m``, which would
    put the current directory first on the path)."""
    script = os.path.join(os.path.dirname(sys.executable), "rapid")
    if not os.path.exists(script):
        pytest.skip("no rapid console script next to this interpreter")
    (tmp_path / "random.py").write_text("raise SystemExit('the current directory shadowed random')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RAPID_GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "run" in out.stdout, out.stdout + out.stderr


def test_the_command_reexecutes_and_main_never_does(monkeypatch):
    from rapid import cli
    calls = []
    monkeypatch.setattr(cpu, "reexec_tuned", lambda: calls.append("reexec"))
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append(("main", argv)))
    cli.command()
    assert calls == ["reexec", ("main", None)]
